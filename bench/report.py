#!/usr/bin/env python3
"""Markdown tables from a c3dzoo benchmark run (the JSON of ``pytest --benchmark-json``).

    python bench/report.py bench/results/<gpu>.json            # headline: whole models, then layers
    python bench/report.py bench/results/<gpu>.json --groups   # and one detailed table per group

Also reads the JSON-lines file the harness appends to when C3DZOO_BENCH_JSONL is set (what is left
of a session cut short). Every number is computed from the file: clips/s = batch / median time;
speed-up = the baseline's median / the contestant's median, both from the same group of the same
run (the baseline is the one the run names — eager bf16 + channels_last on a GPU, eager fp32 on
CPU — unless --baseline says otherwise). Standard library only: it runs anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Dict, Iterable, List, Optional, Sequence

# preferred baselines when the file does not name one
DEFAULT_BASELINES = ("eager-bf16-cl", "eager-fp32")
_FAMILY = {"eager": 0, "compile": 1, "c3dzoo": 2}
FIT_CAPACITY_BYTES = 80e9  # "how large a batch fits in 80 GB" (issue #5)


@dataclasses.dataclass
class Record:
    group: str
    kind: str  # "model" or "layer"
    target: str
    mode: str
    contestant: str
    baseline: Optional[str]
    median_s: float
    batch: int
    flops: Optional[float]
    peak_tflops: Optional[float]
    peak_mem_bytes: Optional[int]
    resident_mem_bytes: Optional[int]  # allocated before the measured call (parameters, optimizer state)
    rel_err: Optional[float]
    compile_s: Optional[float]
    caches_prewarmed: bool
    fallbacks: List[str]

    @property
    def clips_per_s(self) -> float:
        return self.batch / self.median_s

    @property
    def tflops(self) -> Optional[float]:
        return None if not self.flops else self.flops / self.median_s / 1e12

    @property
    def pct_peak(self) -> Optional[float]:
        t = self.tflops
        return None if t is None or not self.peak_tflops else 100.0 * t / self.peak_tflops

    def batch_that_fits(self, capacity_bytes: float = FIT_CAPACITY_BYTES) -> Optional[int]:
        """The largest batch whose step fits in ``capacity_bytes``, extrapolated linearly from this
        run: what was resident before the step (parameters, gradients, optimizer state: independent
        of the batch) + batch × (peak − resident) / this batch."""
        if self.peak_mem_bytes is None or self.resident_mem_bytes is None:
            return None
        per_clip = (self.peak_mem_bytes - self.resident_mem_bytes) / self.batch
        if per_clip <= 0:
            return None
        return max(0, int((capacity_bytes - self.resident_mem_bytes) // per_clip))


def load(path: str) -> dict:
    """A pytest-benchmark JSON, or a JSON-lines file of benchmark entries."""
    with open(path) as f:
        text = f.read()
    if path.endswith(".jsonl"):
        return {"benchmarks": [json.loads(line) for line in text.splitlines() if line.strip()]}
    return json.loads(text)


def records(data: dict) -> List[Record]:
    """The c3dzoo benchmarks of a run (entries without our extra_info, or without stats, are skipped)."""
    out = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info") or {}
        stats = bench.get("stats") or {}
        if "contestant" not in info or not stats.get("median"):
            continue
        out.append(Record(
            group=bench.get("group") or f"{info['kind']} {info['target']} {info['mode']}",
            kind=info["kind"], target=info["target"], mode=info["mode"], contestant=info["contestant"],
            baseline=info.get("baseline"), median_s=float(stats["median"]), batch=int(info["batch"]),
            flops=info.get("flops_per_call"), peak_tflops=info.get("peak_tflops"),
            peak_mem_bytes=info.get("peak_mem_bytes"), resident_mem_bytes=info.get("resident_mem_bytes"),
            rel_err=info.get("rel_err_vs_fp32"),
            compile_s=info.get("compile_s"), caches_prewarmed=bool(info.get("caches_prewarmed")),
            fallbacks=list(info.get("fallbacks") or []),
        ))
    return out


def _unique(seq: Iterable) -> list:
    return list(dict.fromkeys(seq))


def contestant_order(recs: Sequence[Record]) -> List[str]:
    """eager, then torch.compile, then c3dzoo; within each, in order of appearance."""
    names = _unique(r.contestant for r in recs)
    return sorted(names, key=lambda n: (_FAMILY.get(n.split("-")[0], 3), names.index(n)))


def baseline_of(group: Sequence[Record], preferred: Optional[str] = None) -> Optional[str]:
    present = {r.contestant for r in group}
    for name in [preferred, *(r.baseline for r in group), *DEFAULT_BASELINES]:
        if name and name in present:
            return name
    return None


def speedups(group: Sequence[Record], baseline: Optional[str]) -> Dict[str, float]:
    """contestant → baseline median / contestant median (empty without the baseline)."""
    base = [r.median_s for r in group if r.contestant == baseline]
    if not base:
        return {}
    return {r.contestant: base[0] / r.median_s for r in group}


def by_group(recs: Sequence[Record]) -> Dict[str, List[Record]]:
    groups: Dict[str, List[Record]] = {}
    for r in recs:
        groups.setdefault(r.group, []).append(r)
    return groups


# ----------------------------------------------------------------------------- formatting


def _num(v: Optional[float]) -> str:
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}" if v >= 10 else f"{v:.3g}"  # 3 significant digits: CPU TFLOP/s are tiny


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms >= 100 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def _x(ratio: Optional[float]) -> str:
    return "—" if ratio is None else f"{ratio:.2f}×"


def _gb(n: Optional[int]) -> str:
    return "—" if n is None else f"{n / 1e9:.2f} GB"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _matrix(recs: Sequence[Record], kind: str, cell, baseline: Optional[str]) -> Optional[str]:
    """Rows (target, mode), one column per contestant; cell(record, speed-up) → text."""
    recs = [r for r in recs if r.kind == kind]
    if not recs:
        return None
    names = contestant_order(recs)
    groups = by_group(recs)
    rows = []
    for target in _unique(r.target for r in recs):
        for mode in _unique(r.mode for r in recs):
            group = groups.get(f"{kind} {target} {mode}") or [r for r in recs if (r.target, r.mode) == (target, mode)]
            if not group:
                continue
            ratios = speedups(group, baseline_of(group, baseline))
            found = {r.contestant: r for r in group}
            rows.append([target, mode, *(cell(found[n], ratios.get(n)) if n in found else "—" for n in names)])
    return _table([kind, "mode", *names], rows)


def fused_vs_stock(recs: Sequence[Record], kind: str = "model") -> Optional[str]:
    """Rows: each c3dzoo contestant of each (target, mode); columns: each stock contestant (eager and
    torch.compile) measured in the same group; cells: the c3dzoo contestant's speed-up over it."""
    recs = [r for r in recs if r.kind == kind]
    stock = [n for n in contestant_order(recs) if _FAMILY.get(n.split("-")[0]) in (0, 1)]
    fused = [n for n in contestant_order(recs) if n.startswith("c3dzoo-")]
    if not stock or not fused:
        return None
    rows = []
    for group, members in by_group(recs).items():
        found = {r.contestant: r for r in members}
        for name in fused:
            if name in found:
                cells = [_x(found[s].median_s / found[name].median_s) if s in found else "—" for s in stock]
                rows.append([members[0].target, members[0].mode, name, *cells])
    return _table([kind, "mode", "c3dzoo", *(f"vs {n}" for n in stock)], rows) if rows else None


def training_memory(recs: Sequence[Record], baseline: Optional[str] = None) -> Optional[str]:
    """Rows: whole models in training; columns: contestants; cells: peak (ratio to the baseline's
    peak), batch that fits. None when the run measured no memory (CPU)."""
    recs = [r for r in recs if r.kind == "model" and r.mode == "train" and r.peak_mem_bytes]
    if not recs:
        return None
    names = contestant_order(recs)
    rows = []
    for target in _unique(r.target for r in recs):
        group = [r for r in recs if r.target == target]
        base = {r.contestant: r for r in group}.get(baseline_of(group, baseline))
        found = {r.contestant: r for r in group}
        cells = []
        for n in names:
            r = found.get(n)
            if r is None:
                cells.append("—")
                continue
            ratio = None if base is None else r.peak_mem_bytes / base.peak_mem_bytes
            fits = r.batch_that_fits()
            cells.append(f"{_gb(r.peak_mem_bytes)} ({_x(ratio)}); batch ≤ {'—' if fits is None else f'{fits:,}'}")
        rows.append([target, *cells])
    return _table(["model (train)", *names], rows)


def _stated_baseline(recs: Sequence[Record], baseline: Optional[str]) -> str:
    """The baseline a run's caption names: the one asked for, else the run's own."""
    return baseline or next((r.baseline for r in recs if r.baseline), None) or DEFAULT_BASELINES[0]


def _per_batch(recs: Sequence[Record]) -> List[List[Record]]:
    """The records of each batch size, smallest first: ratios are only ever taken within one."""
    return [[r for r in recs if r.batch == b] for b in sorted({r.batch for r in recs})]


def _describe(data: dict, recs: Sequence[Record], baseline: Optional[str]) -> str:
    m = data.get("machine_info") or {}
    commit = m.get("c3dzoo_commit") or {}
    commit_id = commit.get("id") or (data.get("commit_info") or {}).get("id") or "unknown"
    dirty = " (uncommitted changes)" if commit.get("dirty") else ""
    device = m.get("gpu_name") or m.get("cpu", {}).get("brand_raw") or m.get("processor") or "unknown device"
    versions = ", ".join(f"{k} {m[k]}" for k in ("torch", "triton", "cuda_runtime", "cudnn") if m.get(k))
    base = _stated_baseline(recs, baseline)
    batches = sorted({r.batch for r in recs})
    when = data.get("datetime", "")
    return (f"{device}; {versions or 'versions unknown'}; commit {str(commit_id)[:12]}{dirty}"
            f"{'; ' + when[:19] if when else ''}.\n"
            f"Batch {', '.join(map(str, batches))}. Speed-up = median time of {base} / median time of the "
            f"contestant, both measured in this run.")


def headline(data: dict, recs: Optional[Sequence[Record]] = None, baseline: Optional[str] = None) -> str:
    """The README table: whole models in clips/s, layers in ms, each with its speed-up."""
    recs = records(data) if recs is None else recs
    if not recs:
        return "no c3dzoo benchmark results in this file"
    batches = _per_batch(recs)
    if len(batches) > 1:  # e.g. c3dzoo bench --batch 8,16,32: one headline per batch size
        return "\n\n".join(headline(data, batch, baseline) for batch in batches)
    parts = [_describe(data, recs, baseline)]
    stated = _stated_baseline(recs, baseline)
    other = {group: baseline_of(members, baseline) for group, members in by_group(recs).items()}
    other = {group: base for group, base in other.items() if base != stated}
    if other:  # the stated baseline did not run there (skipped, failed): say what the ratios are against
        parts.append("Except: " + "; ".join(f"{group} vs {base or 'nothing (no baseline ran)'}"
                                            for group, base in other.items()) + ".")
    models = _matrix(recs, "model", lambda r, x: f"{_num(r.clips_per_s)} ({_x(x)})", baseline)
    if models:
        parts += ["", "Whole models, clips/s (speed-up):", "", models]
    versus = fused_vs_stock(recs, "model")
    if versus:
        parts += ["", "Whole models, c3dzoo's speed-up over each stock contestant of the same run:", "", versus]
    memory = training_memory(recs, baseline)
    if memory:
        parts += ["", "Training step memory, whole models: peak allocated (× the baseline's peak); the largest "
                  f"batch that fits in {FIT_CAPACITY_BYTES / 1e9:.0f} GB, extrapolated linearly from this run "
                  "(resident before the step + batch × per-clip):", "", memory]
    layers = _matrix(recs, "layer", lambda r, x: f"{_ms(r.median_s)} ms ({_x(x)})", baseline)
    if layers:
        parts += ["", "C3D layers (conv + BN + ReLU + pool), median ms per batch (speed-up):", "", layers]
    return "\n".join(parts)


def group_tables(recs: Sequence[Record], baseline: Optional[str] = None) -> str:
    """One table per group: every contestant's time, throughput, speed-up, efficiency, memory."""
    batches = _per_batch(recs)
    if len(batches) > 1:
        return "\n\n".join(group_tables(batch, baseline) for batch in batches)
    out = []
    names_order = contestant_order(recs)
    for group, members in by_group(recs).items():
        base = baseline_of(members, baseline)
        ratios = speedups(members, base)
        members = sorted(members, key=lambda r: names_order.index(r.contestant))
        rows = []
        for r in members:
            notes = []
            if r.compile_s is not None:
                notes.append(f"compile {r.compile_s:.0f} s" + (" (warm cache)" if r.caches_prewarmed else ""))
            if r.fallbacks:
                notes.append(f"{len(r.fallbacks)} config(s) fell back to reference")
            rows.append([
                r.contestant, _ms(r.median_s), _num(r.clips_per_s), _x(ratios.get(r.contestant)),
                _num(r.tflops), _num(r.pct_peak), _gb(r.peak_mem_bytes),
                "—" if r.rel_err is None else f"{r.rel_err:.1e}", "; ".join(notes),
            ])
        out += ["", f"{group} (batch {members[0].batch}; speed-up vs {base or 'no baseline'})", _table(
            ["contestant", "median ms", "clips/s", "speed-up", "TFLOP/s", "% peak", "peak mem",
             "rel err vs fp32", "notes"], rows)]
    return "\n".join(out).lstrip("\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", help="results JSON (pytest --benchmark-json) or .jsonl")
    parser.add_argument("--baseline", help="contestant to compare against (default: the run's own)")
    parser.add_argument("--groups", action="store_true", help="also one detailed table per group")
    args = parser.parse_args(argv)
    data = load(args.path)
    recs = records(data)
    print(headline(data, recs, args.baseline))
    if args.groups and recs:
        print()
        print(group_tables(recs, args.baseline))
    return 0 if recs else 1


if __name__ == "__main__":
    sys.exit(main())
