"""Evaluation reports: top-1/top-5, per-class accuracy, confusion matrices (numpy) and PNG plots
of a confusion matrix and of training/validation curves (matplotlib, the ``plot`` extra); video
scores from several views of each video (``average_views``: multi-clip, multi-crop testing)."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import os
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "PlotUnavailable", "average_views", "per_class_line", "topk_accuracy", "confusion_matrix", "per_class_accuracy", "Report", "evaluate",
    "save_confusion_matrix_png", "save_curves_png",
]

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed (one-line message saying how to install it)."""


def _scores(scores: ArrayLike) -> torch.Tensor:
    s = torch.as_tensor(np.asarray(scores) if not isinstance(scores, torch.Tensor) else scores)
    if s.dim() != 2 or s.shape[1] < 1:
        raise ValueError(f"expected scores N × classes, got shape {tuple(s.shape)}")
    return s.detach().cpu().double()


def _labels(labels: ArrayLike, n: Optional[int] = None) -> np.ndarray:
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    if n is not None and y.shape[0] != n:
        raise ValueError(f"{n} rows of scores but {y.shape[0]} labels")
    return y.astype(np.int64)


def average_views(logits: torch.Tensor, views: int) -> torch.Tensor:
    """Class probabilities of videos from the logits of their views: ``(N·views) × C`` logits, the
    views of a video consecutive, give ``N × C`` float32 probabilities, the mean of the views'
    softmax (the usual multi-view test score: C3D, torchvision's and MMAction2's recipes)."""
    if views < 1:
        raise ValueError(f"views must be at least 1, got {views}")
    if logits.dim() != 2 or logits.shape[0] % views:
        raise ValueError(f"expected (videos x {views} views) x classes logits, got shape {tuple(logits.shape)}")
    return logits.float().softmax(1).view(-1, views, logits.shape[1]).mean(1)


def topk_accuracy(scores: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 5)) -> Dict[int, float]:
    """{k: fraction of rows whose label is among the k highest scores}; k is capped at the number
    of classes (top-5 of 4 classes is top-4, i.e. 1.0)."""
    s = _scores(scores)
    y = torch.from_numpy(_labels(labels, s.shape[0]))
    if s.shape[0] == 0:
        raise ValueError("no samples to evaluate")
    ranked = s.topk(min(max(ks), s.shape[1]), dim=1).indices
    hits = ranked == y[:, None]
    return {k: hits[:, :min(k, s.shape[1])].any(1).double().mean().item() for k in ks}


def confusion_matrix(labels: ArrayLike, predictions: ArrayLike, num_classes: int) -> np.ndarray:
    """num_classes × num_classes int64 counts; row = true class, column = predicted class."""
    y = _labels(labels)
    p = _labels(predictions, y.shape[0])
    for name, values in (("label", y), ("prediction", p)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} {values.min() if values.min() < 0 else values.max()} is out of "
                             f"range for {num_classes} classes")
    return np.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Recall of each class (diagonal / row sum); NaN for a class without samples."""
    confusion = np.asarray(confusion)
    totals = confusion.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(confusion) / np.maximum(totals, 1), np.nan)


def per_class_line(class_names: Sequence[str], accuracy: np.ndarray, most: Optional[int] = None) -> str:
    """``name 83 %, ...`` for every class, or, beyond ``most`` classes, the five lowest
    (``lowest 5 of 400: ...``); a class without samples reads n/a."""
    def shown(i):
        return f"{class_names[i]} {'n/a' if np.isnan(accuracy[i]) else f'{100 * accuracy[i]:.0f} %'}"

    if most is None or len(class_names) <= most:
        return ", ".join(shown(i) for i in range(len(class_names)))
    worst = sorted((i for i in range(len(class_names)) if not np.isnan(accuracy[i])), key=lambda i: accuracy[i])
    return f"lowest 5 of {len(class_names)}: " + ", ".join(shown(i) for i in worst[:5])


@dataclasses.dataclass
class Report:
    """Accuracy figures of one evaluation (fractions in [0, 1])."""

    top1: float
    top5: float
    top5_k: int  # the k actually used for "top-5" (fewer with fewer classes)
    per_class: np.ndarray
    confusion: np.ndarray
    class_names: List[str]
    samples: int

    def summary(self) -> str:
        return f"top-1 {100 * self.top1:.1f} %  top-{self.top5_k} {100 * self.top5:.1f} %  ({self.samples} clips)"

    def per_class_line(self, most: Optional[int] = None) -> str:
        return per_class_line(self.class_names, self.per_class, most)

    def as_dict(self) -> dict:
        return {"top1": self.top1, f"top{self.top5_k}": self.top5, "samples": self.samples,
                "per_class_accuracy": {n: (None if np.isnan(a) else float(a))
                                       for n, a in zip(self.class_names, self.per_class)},
                "class_names": list(self.class_names), "confusion_matrix": self.confusion.tolist()}


def evaluate(scores: ArrayLike, labels: ArrayLike, class_names: Optional[Sequence[str]] = None) -> Report:
    """Top-1, top-5, per-class accuracy and confusion matrix of N × C ``scores`` against ``labels``."""
    s = _scores(scores)
    num_classes = s.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} score columns")
    acc = topk_accuracy(s, labels, (1, 5))
    confusion = confusion_matrix(labels, s.argmax(1).numpy(), num_classes)
    return Report(acc[1], acc[5], min(5, num_classes), per_class_accuracy(confusion), confusion, names,
                  int(s.shape[0]))


def _pyplot():
    if importlib.util.find_spec("matplotlib") is None:
        raise PlotUnavailable("writing PNG plots needs matplotlib, which is not installed "
                              "(pip install 'c3dzoo[plot]')")
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def save_confusion_matrix_png(confusion: np.ndarray, path: str, class_names: Optional[Sequence[str]] = None,
                              *, normalize: bool = True, title: str = "confusion matrix") -> None:
    """A heat map of ``confusion`` (rows: true class; with ``normalize``, each row as fractions of
    that class, so classes of different sizes compare), counts written in cells for up to 30
    classes. Raises PlotUnavailable without matplotlib."""
    confusion = np.asarray(confusion)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"expected a square confusion matrix, got shape {confusion.shape}")
    n = confusion.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} class names for a {n} × {n} confusion matrix")
    plt = _pyplot()
    rows = confusion.sum(1, keepdims=True)
    shown = confusion / np.maximum(rows, 1) if normalize else confusion
    side = min(20.0, 3.0 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    try:
        image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04,
                     label="fraction of the true class" if normalize else "clips")
        ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize="small")
        ax.set_yticks(range(n), names, fontsize="small")
        ax.set(xlabel="predicted", ylabel="true", title=title)
        if n <= 30:
            threshold = (1.0 if normalize else max(shown.max(), 1)) / 2  # half the colour scale
            for i in range(n):
                for j in range(n):
                    if confusion[i, j]:
                        ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize="x-small",
                                color="white" if shown[i, j] > threshold else "black")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


_CURVES = {"loss": ("train_loss", "val_loss"), "accuracy (%)": ("train_top1", "val_top1", "val_top5")}


def _read_metrics(metrics: Union[str, "os.PathLike[str]", Sequence[dict]]) -> List[dict]:
    if isinstance(metrics, (str, os.PathLike)):
        if not os.path.isfile(metrics):
            raise ValueError(f"metrics file not found: {os.fspath(metrics)}")
        with open(metrics, newline="") as f:
            return list(csv.DictReader(f))
    return list(metrics)


def save_curves_png(metrics: Union[str, "os.PathLike[str]", Sequence[dict]], path: str) -> None:
    """Training/validation curves by epoch: loss and accuracy panels from ``c3dzoo train``'s
    metrics.csv (or rows of dicts with its columns: epoch, train_loss, val_loss, train_top1,
    val_top1, val_top5; absent columns are left out). Raises PlotUnavailable without matplotlib."""
    rows = _read_metrics(metrics)
    if not rows:
        raise ValueError("no metrics rows to plot")
    if "epoch" not in rows[0]:
        raise ValueError(f"metrics have no 'epoch' column (columns: {', '.join(rows[0])})")
    panels = {title: [c for c in columns if c in rows[0]] for title, columns in _CURVES.items()}
    panels = {t: c for t, c in panels.items() if c}
    if not panels:
        raise ValueError(f"metrics have none of the columns {', '.join(c for cs in _CURVES.values() for c in cs)}")
    plt = _pyplot()
    epochs = [float(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    try:
        for ax, (title, columns) in zip(axes[0], panels.items()):
            for column in columns:
                values = [float(r[column]) if r.get(column) not in (None, "") else np.nan for r in rows]
                ax.plot(epochs, values, marker="o", label=column)
            ax.set(xlabel="epoch", title=title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
