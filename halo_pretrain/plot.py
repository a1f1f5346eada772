"""`halo-plot RUN_DIR [RUN_DIR ...] -o OUT`: training curves of one or more runs from their metrics.jsonl.

For each metric (loss, val_loss, tokens_per_s, lr) two PNGs, against optimizer steps and against
tokens seen, every run on the same axes (e.g. HALO-S against its dense baseline).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = {
    "loss": "training loss",
    "val_loss": "validation loss",
    "tokens_per_s": "tokens / s",
    "lr": "learning rate",
}
X_AXES = {"step": "optimizer step", "tokens": "tokens seen"}
FIGSIZE, DPI = (8, 5), 100  # every PNG is 800 x 500 pixels


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The lines of RUN_DIR/metrics.jsonl, one per step (a step logged twice, after a resume, keeps its last line)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a halo-train run directory?")
    lines = path.read_text().splitlines()
    by_step: dict[tuple, dict] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # a run killed mid-write leaves a partial last line; anywhere else it is corruption
            if number == len(lines):
                continue
            raise ValueError(f"{path}:{number}: not a JSON line") from None
        if "step" not in record:
            raise ValueError(f"{path}:{number}: no 'step' field")
        # eval lines may be separate from the training line of the same step
        by_step[(record["step"], "val_loss" in record and "loss" not in record)] = record
    return [by_step[k] for k in sorted(by_step)]


def series(records: list[dict], metric: str, x_axis: str) -> tuple[list[float], list[float]]:
    """(x, y) of a metric; a line without the x value takes it from the training line of its step."""
    x_of_step = {r["step"]: r[x_axis] for r in records if x_axis in r}
    xs, ys = [], []
    for r in records:
        if metric in r and r[metric] is not None and r["step"] in x_of_step:
            xs.append(x_of_step[r["step"]])
            ys.append(r[metric])
    return xs, ys


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (weight 0: unchanged)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i) if weight else v)
    return out


def run_labels(run_dirs: list[Path]) -> list[str]:
    names = [p.resolve().name for p in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{p.resolve().parent.name}/{p.resolve().name}" for p in run_dirs]


def plot_runs(run_dirs, out_dir, labels=None, smoothing: float = 0.0) -> list[Path]:
    """Write the PNGs; returns their paths. Metrics no run logged are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dirs = [Path(r) for r in run_dirs]
    labels = labels or run_labels(run_dirs)
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} run directories")
    runs = [read_metrics(r) for r in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for metric, title in METRICS.items():
        for x_axis, x_label in X_AXES.items():
            curves = [(label, *series(records, metric, x_axis)) for label, records in zip(labels, runs)]
            curves = [c for c in curves if c[1]]
            if not curves:
                continue
            fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
            for label, xs, ys in curves:
                ys = smooth(ys, smoothing) if metric == "loss" else ys
                ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
            ax.set_xlabel(x_label)
            ax.set_ylabel(title)
            ax.set_title(f"{title} vs {x_label}")
            if metric == "lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            path = out_dir / f"{metric}_vs_{x_axis}.png"
            fig.savefig(path, dpi=DPI)
            plt.close(fig)
            written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="halo-plot", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories holding metrics.jsonl")
    p.add_argument("-o", "--out", required=True, help="output directory for the PNGs")
    p.add_argument("--labels", help="comma-separated legend labels, one per run (default: directory names)")
    p.add_argument("--smooth", type=float, default=0.0, help="EMA weight for the training loss, in [0, 1)")
    args = p.parse_args(argv)
    if not 0.0 <= args.smooth < 1.0:
        p.error(f"--smooth {args.smooth}: must be in [0, 1)")
    labels = args.labels.split(",") if args.labels else None
    try:
        written = plot_runs(args.runs, args.out, labels, args.smooth)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"halo-plot: {e}") from None
    if not written:
        raise SystemExit("halo-plot: no metric to plot (metrics.jsonl lines hold none of "
                         f"{', '.join(METRICS)})")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
