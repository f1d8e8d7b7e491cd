"""train.plots and scripts/plot_scale.py: accuracy vs training images over runs, val curve per epoch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from curate.errors import CurateError
from train.plots import plot_history, scale_points

ROOT = Path(__file__).resolve().parents[1]


def _run(folder: Path, n: int, source: str, best: float, epoch0: float = 0.3) -> Path:
    folder.mkdir(parents=True)
    report = {"n_train_images": n, "train": [{"sources": {source: n}}],
              "metrics": {"best": {"linear_probe_top1": best}, "epoch0": {"linear_probe_top1": epoch0}}}
    (folder / "report.json").write_text(json.dumps(report), encoding="utf-8")
    return folder


def test_scale_points_group_by_source_and_sort(tmp_path):
    runs = [_run(tmp_path / "r2", 2000, "retrieved", 0.6), _run(tmp_path / "r1", 1000, "retrieved", 0.5),
            _run(tmp_path / "s1", 1000, "synthetic", 0.4), _run(tmp_path / "e", 0, "real", 0.3)]
    points = scale_points(runs)
    assert points["series"] == {"retrieved": [(1000, 0.5), (2000, 0.6)], "synthetic": [(1000, 0.4)]}
    assert points["baseline"] == [0.3] * 4
    with pytest.raises(CurateError, match="no metric 'head_top1'"):
        scale_points(runs, metric="head_top1")


def test_scale_points_reads_a_report_file_under_any_name(tmp_path):
    report = (_run(tmp_path / "r", 1000, "synthetic", 0.4) / "report.json").rename(tmp_path / "synthetic-1k.json")
    assert scale_points([report])["series"] == {"synthetic": [(1000, 0.4)]}


def test_scale_points_names_a_report_of_another_stage(tmp_path):
    (tmp_path / "retrieved").mkdir()
    (tmp_path / "retrieved" / "report.json").write_text(json.dumps({"stage": "retrieve", "funnel": {"kept": 3}}))
    with pytest.raises(CurateError, match="retrieved/report.json is not a finetune-and-probe report"):
        scale_points([tmp_path / "retrieved"])


def test_plot_scale_script(tmp_path):
    runs = [_run(tmp_path / "a", 100, "retrieved", 0.5), _run(tmp_path / "b", 400, "synthetic", 0.45)]
    out = tmp_path / "scale.png"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_scale.py"), *map(str, runs), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "retrieved: 100 images -> 0.5000" in done.stdout and out.stat().st_size > 1000
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_scale.py"), str(tmp_path / "nothing")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("plot_scale: error: no report.json")


def test_plot_history(tmp_path, monkeypatch):
    import matplotlib.axes

    curves = []
    plot = matplotlib.axes.Axes.plot

    def recording(ax, *args, **kwargs):
        curves.append((kwargs.get("label"), [list(a) for a in args]))
        return plot(ax, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording)
    history = [{"epoch": 2, "val_head_top1": 0.6, "val_linear_probe_top1": 0.95, "train_loss": 1.0},
               {"epoch": 0, "val_head_top1": 0.2, "val_zero_shot_top1": 0.3},
               {"epoch": 1, "val_head_top1": 0.5, "val_linear_probe_top1": 0.9}]
    path = plot_history(history, tmp_path / "v.png")
    assert path.stat().st_size > 1000
    assert curves == [  # one curve per logged metric, sorted by epoch, over the epochs that logged it
        ("linear probe", [[1, 2], [0.9, 0.95]]),
        ("finetuned head", [[0, 1, 2], [0.2, 0.5, 0.6]]),
        ("zero-shot", [[0], [0.3]]),
    ]
