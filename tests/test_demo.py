"""`curate demo` (the README's first command) runs end to end offline and leaves every step's outputs."""

from __future__ import annotations

import json

from curate.cli import cli
from manifests import read_manifest


def test_demo_end_to_end(tmp_path, runner, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("a task file of the user's, named like the builtin task\n", encoding="utf-8")
    out = tmp_path / "run"
    result = runner.invoke(cli, ["demo", "--out", str(out), "--rows", "3000"])
    assert result.exit_code == 0, result.output
    retrieved, downloaded, filtered = (read_manifest(out / step) for step in ("retrieved", "downloaded", "filtered"))
    assert 0 < filtered.num_rows < downloaded.num_rows < retrieved.num_rows  # 404s, then the top-80 % filter
    assert set(retrieved.column("class_name").to_pylist()) == {"red circle", "green square", "blue triangle", "yellow star", "purple cross"}
    report = json.loads((out / "finetune" / "report.json").read_text())
    assert report["n_train_images"] == filtered.num_rows
    assert "demo finished" in result.output


def test_demo_refuses_a_non_empty_folder(tmp_path, runner):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "mine.txt").write_text("x")
    result = runner.invoke(cli, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 2 and "is not empty (use --overwrite" in result.stderr
    assert (tmp_path / "demo" / "mine.txt").exists()
