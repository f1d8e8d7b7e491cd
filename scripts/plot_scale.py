"""Accuracy vs number of training images over several finetune-and-probe runs (seed 004, Figure 2).

Each run folder's report.json gives x = n_train_images and y = the best epoch's test metric; runs
are grouped by their train manifests' source (retrieved / synthetic / real / mixed); the runs'
epoch-0 value (the unadapted model) is drawn as a dashed line.

    python scripts/plot_scale.py runs/retrieved-* runs/synthetic-* --metric linear_probe_top1 --out scale.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> Path:
    from curate.errors import CurateError
    from train.plots import plot_scale, scale_points

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finetune-and-probe output folders (or their report.json)")
    parser.add_argument("--metric", default="linear_probe_top1", help="a key of report.json's metrics.best")
    parser.add_argument("--out", type=Path, default=Path("scale.png"))
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        path = plot_scale(args.runs, args.out, metric=args.metric, title=args.title)
        points = scale_points(args.runs, args.metric)
    except CurateError as exc:
        print(f"plot_scale: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for source, values in points["series"].items():
        print(f"{source}: " + ", ".join(f"{n} images -> {v:.4f}" for n, v in values))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
