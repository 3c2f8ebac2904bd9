"""Net2Net evidence on the built-in synthetic data: does growing a trained narrow C3D-BN reach a
target validation accuracy sooner than training the large one from scratch?

Per seed, two arms on the same data order, learning rate and batch size:

* ``grown``: a narrow C3D-BN (``--narrow-width``) trains ``--grow-at`` steps, then
  ``net2net.wider`` grows every conv and fc6/fc7 to the channel counts of a freshly built large
  model (``--large-width``), optionally ``net2net.deeper`` inserts one identity conv, the SGD
  momentum state is remapped by net2net, and training continues to ``--max-steps`` steps in all.
* ``scratch``: the large C3D-BN trains ``--max-steps`` steps from a random init.

Validation top-1 (eval mode) every ``--eval-every`` steps. "Seconds" is training time only (forward,
backward, optimizer step, and for ``grown`` the growth itself, narrow phase included); evaluation
is not counted. Growth is checked to preserve the function: eval logits of an exact copy grown with
noise 0 against the logits before growth (relative max error <= 1e-4, asserted); the symmetry-
breaking noise actually used (``--noise``, as in the paper) changes the logits a little, and that
change is recorded too.

    python bench/net2net_evidence.py --seeds 0,1,2 --out bench/results/net2net-cpu

The defaults fit one seed (both arms) in about 2.5 minutes on one CPU thread. At these sizes neither
arm reached 0.70 val top-1 within 400 steps in a calibration run (seed 0: scratch 0.435, grown
0.18), so the default ``--target`` is 0.40; the JSON keeps every curve point for other thresholds.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from c3dzoo import net2net  # noqa: E402
from c3dzoo.data.synthetic import SyntheticVideoDataset  # noqa: E402
from c3dzoo.models.c3d_family import c3d_bn  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default %(default)s)")
    p.add_argument("--target", type=float, default=0.40, help="val top-1 to reach (default %(default)s)")
    p.add_argument("--max-steps", type=int, default=600, help="training steps per arm, in all (default %(default)s)")
    p.add_argument("--grow-at", type=int, default=300, help="narrow steps before growing (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between evaluations (default %(default)s)")
    p.add_argument("--narrow-width", type=float, default=0.0625)
    p.add_argument("--large-width", type=float, default=0.125)
    p.add_argument("--deeper", default="none", help="conv to insert an identity layer after at growth "
                   "(e.g. conv3a), or 'none' (default %(default)s)")
    p.add_argument("--noise", type=float, default=0.02,
                   help="symmetry-breaking noise of wider, × std(weight) (default %(default)s)")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--warmup", type=int, default=20, help="linear LR warm-up steps, then constant")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--train-samples", type=int, default=1024)
    p.add_argument("--val-samples", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default %(default)s)")
    p.add_argument("--out", required=True, help="output directory")
    return p.parse_args(argv)


def render(ds: SyntheticVideoDataset):
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys)


def batch_order(seed: int, n: int, batch: int, steps: int) -> List[torch.Tensor]:
    """The index batches of ``steps`` steps: a fresh permutation per epoch (drop last)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    out: List[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out.extend(perm[i:i + batch] for i in range(0, n - batch + 1, batch))
    return out[:steps]


@torch.no_grad()
def evaluate(model, xv, yv, batch: int = 100) -> float:
    was = model.training
    model.eval()
    correct = sum((model(xv[i:i + batch]).argmax(1) == yv[i:i + batch]).sum().item()
                  for i in range(0, len(xv), batch))
    model.train(was)
    return correct / len(xv)


@torch.no_grad()
def eval_logits(model, x):
    was = model.training
    model.eval()
    out = model(x)
    model.train(was)
    return out


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def make_optimizer(model, lr):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)


def lr_at(step: int, args) -> float:
    return args.lr * min(1.0, (step + 1) / max(1, args.warmup))


def grow(model, large, optimizer, args, seed: int, xcheck, xdeep) -> Dict:
    """Widen every widenable conv and fc6/fc7 of ``model`` to ``large``'s widths (and optionally
    deepen), rewriting ``optimizer``; returns the function-preservation record."""
    targets = {name: net2net._units(large.get_submodule(name)) for name in net2net.widenable_layers(model)}
    before = eval_logits(model, xcheck)

    # exact growth on a copy (noise 0, same mapping g): the function-preservation check
    exact = copy.deepcopy(model)
    g = torch.Generator().manual_seed(20_000 + seed)
    for name, width in targets.items():
        net2net.wider(exact, name, width, noise=0.0, generator=g)
    if args.deeper != "none":
        net2net.deeper(exact, args.deeper, data=xdeep)
    exact_err = rel_err(eval_logits(exact, xcheck), before)
    assert exact_err <= 1e-4, f"net2net growth changed eval logits by {exact_err:.3g} (relative)"
    del exact

    g = torch.Generator().manual_seed(20_000 + seed)
    for name, width in targets.items():
        net2net.wider(model, name, width, noise=args.noise, generator=g, optimizer=optimizer)
    if args.deeper != "none":
        net2net.deeper(model, args.deeper, optimizer=optimizer, data=xdeep)
    noisy_err = rel_err(eval_logits(model, xcheck), before)
    grown_shapes = {n: net2net._units(model.get_submodule(n)) for n in targets}
    assert grown_shapes == targets, (grown_shapes, targets)
    n_opt = sum(len(gr["params"]) for gr in optimizer.param_groups)
    assert n_opt == len(list(model.parameters())), "optimizer does not hold exactly the grown parameters"
    assert {id(p) for gr in optimizer.param_groups for p in gr["params"]} == {id(p) for p in model.parameters()}
    return dict(widths=targets, deeper=args.deeper, exact_rel_err=exact_err, exact_ok=exact_err <= 1e-4,
                noisy_rel_err=noisy_err, noise=args.noise,
                params_after=sum(p.numel() for p in model.parameters()),
                params_large=sum(p.numel() for p in large.parameters()))


def run_arm(arm: str, seed: int, args, data) -> Dict:
    xt, yt, xv, yv = data
    shape = (args.frames, args.size, args.size)
    torch.manual_seed(seed)
    large = c3d_bn(args.num_classes, width_mult=args.large_width, input_size=shape)
    if arm == "grown":
        torch.manual_seed(1_000 + seed)
        model = c3d_bn(args.num_classes, width_mult=args.narrow_width, input_size=shape)
    else:
        model = large
    model.train()
    optimizer = make_optimizer(model, args.lr)
    order = batch_order(seed, len(xt), args.batch_size, args.max_steps)
    curve = [dict(step=0, seconds=0.0, top1=evaluate(model, xv, yv), width=_width(model))]
    seconds = 0.0
    growth = None
    hit_step = hit_seconds = None
    for step in range(args.max_steps):
        if arm == "grown" and step == args.grow_at:
            t0 = time.perf_counter()
            growth = grow(model, large, optimizer, args, seed, xv[:64], xt[order[step]])
            seconds += time.perf_counter() - t0
            growth.update(step=step, seconds=seconds)
            curve.append(dict(step=step, seconds=seconds, top1=evaluate(model, xv, yv), width=_width(model),
                              event="grown"))
        idx = order[step]
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        if not torch.isfinite(loss):
            raise RuntimeError(f"{arm} seed {seed}: non-finite loss at step {step + 1}")
        loss.backward()
        optimizer.step()
        seconds += time.perf_counter() - t0
        done = step + 1
        if done % args.eval_every == 0 or done == args.max_steps:
            top1 = evaluate(model, xv, yv)
            curve.append(dict(step=done, seconds=seconds, top1=top1, loss=loss.item(), width=_width(model)))
            if hit_step is None and top1 >= args.target:
                hit_step, hit_seconds = done, seconds
            print(f"  seed {seed} {arm:7s} step {done:4d} {seconds:6.1f}s val top-1 {top1:.3f}"
                  f" loss {loss.item():.3f}", flush=True)
    return dict(steps_to_target=hit_step, seconds_to_target=hit_seconds, final_top1=curve[-1]["top1"],
                total_seconds=seconds, growth=growth, curve=curve)


def _width(model) -> int:
    return model.conv1.out_channels


def fmt(values: List[Optional[float]], digits: int) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return f"not reached (0/{len(values)})"
    sd = statistics.stdev(got) if len(got) > 1 else 0.0
    s = f"{statistics.mean(got):.{digits}f} ± {sd:.{digits}f}"
    return s if len(got) == len(values) else s + f" ({len(got)}/{len(values)} reached)"


def plot(results, args, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = {"grown": "tab:blue", "scratch": "tab:orange"}
    markers = "osD^v<>p*h"
    for k, (seed, arms) in enumerate(results.items()):
        for arm, r in arms.items():
            xs = [c["seconds"] for c in r["curve"]]
            ys = [c["top1"] for c in r["curve"]]
            ax.plot(xs, ys, color=colours[arm], alpha=0.8, marker=markers[k % len(markers)], markersize=4, label=f"{arm} (seed {seed})",
                    linestyle="-" if arm == "scratch" else "--")
            if r["growth"]:
                ax.axvline(r["growth"]["seconds"], color=colours[arm], alpha=0.25, linestyle=":")
    ax.axhline(args.target, color="grey", linestyle=":", label=f"target {args.target:.2f}")
    ax.set_xlabel("training wall time, s (CPU, evaluation excluded)")
    ax.set_ylabel("val top-1")
    ax.set_title(f"Net2Net on synthetic motion clips: C3D-BN w{args.narrow_width:g} → w{args.large_width:g} "
                 f"at step {args.grow_at} vs w{args.large_width:g} from scratch")
    ax.title.set_fontsize(9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not 0 < args.grow_at < args.max_steps:
        raise SystemExit("--grow-at must be between 0 and --max-steps")
    os.makedirs(args.out, exist_ok=True)
    results: Dict[str, Dict] = {}
    for seed in seeds:
        t0 = time.perf_counter()
        train = SyntheticVideoDataset(args.num_classes, args.train_samples, args.frames, args.size, seed, "train")
        val = SyntheticVideoDataset(args.num_classes, args.val_samples, args.frames, args.size, seed, "val")
        data = (*render(train), *render(val))
        results[str(seed)] = {arm: run_arm(arm, seed, args, data) for arm in ("grown", "scratch")}
        print(f"seed {seed}: {time.perf_counter() - t0:.0f}s wall (including rendering and evaluation)", flush=True)

    settings = {k: v for k, v in vars(args).items()}
    settings.update(torch=torch.__version__, device="cpu", optimizer="SGD nesterov momentum 0.9, no weight decay",
                    lr_schedule=f"linear warm-up {args.warmup} steps then constant {args.lr}",
                    seconds="training time only (eval excluded); grown includes narrow phase and growth")
    with open(os.path.join(args.out, "net2net.json"), "w") as f:
        json.dump(dict(settings=settings, results=results), f, indent=1)
    with open(os.path.join(args.out, "net2net.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "arm", "steps_to_target", "seconds_to_target", "final_top1", "total_seconds",
                    "growth_exact_rel_err", "growth_noisy_rel_err"])
        for seed, arms in results.items():
            for arm, r in arms.items():
                gr = r["growth"] or {}
                w.writerow([seed, arm, r["steps_to_target"],
                            None if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.2f}",
                            f"{r['final_top1']:.4f}", f"{r['total_seconds']:.2f}",
                            gr.get("exact_rel_err"), gr.get("noisy_rel_err")])
    plot(results, args, os.path.join(args.out, "net2net.png"))

    n = len(seeds)
    print(f"\nTarget val top-1 {args.target:.2f}; {n} seed(s); mean ± std over seeds that reached it\n")
    print("| arm | steps to target | seconds to target | final val top-1 | total train s |")
    print("|---|---|---|---|---|")
    for arm in ("grown", "scratch"):
        rs = [results[str(s)][arm] for s in seeds]
        print(f"| {arm} | {fmt([r['steps_to_target'] for r in rs], 0)} | "
              f"{fmt([r['seconds_to_target'] for r in rs], 1)} | {fmt([r['final_top1'] for r in rs], 3)} | "
              f"{fmt([r['total_seconds'] for r in rs], 1)} |")
    errs = [results[str(s)]["grown"]["growth"]["exact_rel_err"] for s in seeds]
    noisy = [results[str(s)]["grown"]["growth"]["noisy_rel_err"] for s in seeds]
    print(f"\nfunction preserved at growth (noise 0 copy): max relative logit error {max(errs):.2e} (<= 1e-4); "
          f"with noise {args.noise}: {max(noisy):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
