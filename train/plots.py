"""Plots: val accuracy per epoch of one run, and accuracy vs number of training images over runs.

`plot_scale` draws seed 004's Figure 2 layout: one line per data source (retrieved / synthetic /
real / ...), x = training images (log scale), y = a test metric of the best epoch, and the
unadapted model (epoch 0) as a horizontal reference.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from curate.errors import CurateError

CURVES = {"val_linear_probe_top1": "linear probe", "val_head_top1": "finetuned head", "val_zero_shot_top1": "zero-shot"}
STYLE = {"retrieved": ("tab:blue", "o"), "synthetic": ("tab:red", "^"), "real": ("tab:green", "s"), "mixed": ("tab:purple", "D")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: list[dict[str, Any]], path: str | Path, title: str = "val accuracy per epoch") -> Path:
    """Val accuracy (linear probe, head, zero-shot, where logged) against the epoch; epoch 0 = before training."""
    plt = _pyplot()
    records = sorted(history, key=lambda r: r["epoch"])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, label in CURVES.items():
        points = [(r["epoch"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (0 = before training)")
    ax.set_ylabel("val top-1")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def scale_points(run_dirs: list[str | Path], metric: str = "linear_probe_top1") -> dict[str, Any]:
    """Per source: sorted (n_train_images, metric) of the best epoch; plus the runs' epoch-0 values."""
    from manifests.io import read_report, report_file

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    baseline = []
    for run in run_dirs:
        path = report_file(run)  # a run folder or its report file
        if not path.exists():
            raise CurateError(f"no report.json in {run}")
        report = read_report(path)
        if "best" not in report.get("metrics", {}):
            raise CurateError(f"{path} is not a finetune-and-probe report (it has no metrics.best)")
        best, epoch0 = report["metrics"]["best"], report["metrics"]["epoch0"]
        if metric not in best:
            raise CurateError(f"{path} has no metric '{metric}' (have: {', '.join(sorted(best))})")
        baseline.append(epoch0[metric])
        if report.get("n_train_images"):
            series[_source_label(report)].append((report["n_train_images"], best[metric]))
    return {"series": {k: sorted(v) for k, v in series.items()}, "baseline": baseline}


def plot_scale(run_dirs: list[str | Path], path: str | Path, metric: str = "linear_probe_top1", title: str | None = None) -> Path:
    """Accuracy vs number of training images for several runs (seed 004, Figure 2)."""
    plt = _pyplot()
    points = scale_points(run_dirs, metric)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for source, values in sorted(points["series"].items()):
        colour, marker = STYLE.get(source, (None, "o"))
        ax.plot(*zip(*values), marker=marker, color=colour, label=source)
    if points["baseline"]:
        ax.axhline(sum(points["baseline"]) / len(points["baseline"]), color="goldenrod", ls="--", label="pretrained (epoch 0)")
    ax.set_xscale("log")
    ax.set_xlabel("training images")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(title or f"{metric} vs adaptation data size")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _source_label(report: dict[str, Any]) -> str:
    """'retrieved', 'synthetic', 'real', or 'mixed' from the train manifests' source columns."""
    kinds = {kind for entry in report.get("train", []) for kind in entry.get("sources", {})}
    return kinds.pop() if len(kinds) == 1 else "mixed" if kinds else "unknown"
