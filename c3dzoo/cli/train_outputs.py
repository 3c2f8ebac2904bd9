"""What ``c3dzoo train`` writes besides checkpoints: metrics.csv, the curves PNG, and the final
validation's per-class accuracy (CSV) and confusion matrix (PNG)."""

from __future__ import annotations

import csv
import math
import os
from typing import List

from c3dzoo import evaluation

from ._common import CommandError

METRICS = ("epoch", "lr", "train_loss", "train_top1", "train_top5", "val_loss", "val_top1", "val_top5",
           "epoch_seconds", "train_clips_per_s", "data_wait_pct")


CURVES_PNG = "curves.png"
CONFUSION_PNG = "confusion.png"  # of the final validation, with PER_CLASS_CSV
PER_CLASS_CSV = "per_class.csv"
MAX_PER_CLASS_PRINTED = 20  # more classes: the summary names the worst few


def open_metrics(path: str, append: bool):
    """metrics.csv opened for new rows; an older file with other columns is rewritten with
    today's header first (its rows keep their values, new columns left empty)."""
    if append:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), tuple(reader.fieldnames or ())
        if header != METRICS:
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=METRICS, restval="", extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
    return open(path, "a" if append else "w", newline="")


def plot_curves(metrics_path: str, png_path: str, growth: List[dict]) -> None:
    """Loss and top-1/top-5 (train and val) per epoch from metrics.csv, as a PNG; a dotted line
    marks each epoch where the model grew. Written atomically like the checkpoints."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    from matplotlib.ticker import MaxNLocator

    with open(metrics_path, newline="") as f:
        rows = list(csv.DictReader(f))

    def column(key):
        return [float(r[key]) if r.get(key) not in (None, "") else float("nan") for r in rows]

    epochs = [int(r["epoch"]) for r in rows]
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_axes, acc_axes = figure.subplots(1, 2)
    for key, style in (("train_loss", "-"), ("val_loss", "--")):
        loss_axes.plot(epochs, column(key), style, marker="o", label=key.replace("_", " "))
    for key, style in (("train_top1", "-"), ("train_top5", "-"), ("val_top1", "--"), ("val_top5", "--")):
        acc_axes.plot(epochs, column(key), style, marker="o", label=key.replace("_", " "))
    for axes, ylabel in ((loss_axes, "cross-entropy"), (acc_axes, "accuracy (%)")):
        for grown_at in sorted({step["epoch"] for step in growth}):
            axes.axvline(grown_at - 0.5, color="grey", linestyle=":", linewidth=1)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend()
    acc_axes.set_ylim(0, 100)
    title = os.path.basename(os.path.dirname(os.path.abspath(metrics_path)))
    figure.suptitle(f"{title}" + (" (dotted: --grow)" if growth else ""))
    tmp = png_path + ".tmp.png"
    try:
        figure.savefig(tmp, dpi=100)
        os.replace(tmp, png_path)
    except OSError as exc:
        raise CommandError(f"cannot write {png_path}: {exc}") from None


def write_final_report(validation, class_names, out: str, plot: bool) -> List[str]:
    """Per-class accuracy of the final validation: a line, PER_CLASS_CSV and (with matplotlib)
    the confusion matrix as CONFUSION_PNG, next to metrics.csv. Returns the files written."""
    confusion = validation.confusion.numpy()
    per_class = evaluation.per_class_accuracy(confusion)
    names = list(class_names)

    more = f" (all in {PER_CLASS_CSV})" if len(names) > MAX_PER_CLASS_PRINTED else ""
    print(f"final val top-1 per class{more}: {evaluation.per_class_line(names, per_class, MAX_PER_CLASS_PRINTED)}")
    path = os.path.join(out, PER_CLASS_CSV)
    try:
        with open(path + ".tmp", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(("class", "clips", "correct", "top1"))
            for i, name in enumerate(names):
                writer.writerow((name, int(confusion[i].sum()), int(confusion[i, i]),
                                 "" if math.isnan(per_class[i]) else f"{100 * per_class[i]:.2f}"))
        os.replace(path + ".tmp", path)
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc}") from None
    written = [PER_CLASS_CSV]
    if plot:
        png = os.path.join(out, CONFUSION_PNG)
        tmp = png + ".tmp.png"
        try:
            evaluation.save_confusion_matrix_png(confusion, tmp, names, title="final validation")
            os.replace(tmp, png)
        except OSError as exc:
            raise CommandError(f"cannot write {png}: {exc}") from None
        written.append(CONFUSION_PNG)
    return written
