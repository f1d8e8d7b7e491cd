"""`curate demo` (the README's first command) runs end to end offline and leaves every step's outputs."""

from __future__ import annotations

import json
import shlex

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
    _printed_commands_do_what_the_demo_did(result.output, out, tmp_path / "again", runner)


def _printed_commands_do_what_the_demo_did(output: str, out, again, runner):
    """The demo doubles as a walk-through: the retrieve, filter and finetune lines it prints give its own results."""
    from train.cli import cli as train_cli

    printed = output.splitlines()
    retrieve_args = shlex.split(next(line for line in printed if line.startswith("[2/6] curate retrieve ")).removeprefix("[2/6] curate "))
    retrieve_args[retrieve_args.index("--out") + 1] = str(again / "retrieved")
    assert runner.invoke(cli, retrieve_args).exit_code == 0
    assert (again / "retrieved" / "manifest.parquet").read_bytes() == (out / "retrieved" / "manifest.parquet").read_bytes()
    filter_line = next(line for line in printed if line.startswith("[5/6] curate filter "))
    finetune_line = next(line for line in printed if line.startswith("finetune-and-probe "))
    filter_args = shlex.split(filter_line.removeprefix("[5/6] curate "))
    filter_args[filter_args.index("--out") + 1] = str(again / "filtered")
    assert runner.invoke(cli, filter_args).exit_code == 0
    kept = [read_manifest(folder / "filtered").select(["uid", "clip_score"]) for folder in (out, again)]  # paths differ
    assert kept[0].num_rows and kept[0].equals(kept[1])
    finetune_args = shlex.split(finetune_line)[1:]
    finetune_args[finetune_args.index("--out") + 1] = str(again / "finetune")
    assert runner.invoke(train_cli, finetune_args).exit_code == 0
    mine, theirs = ({split: {k: v for k, v in values.items() if not k.endswith("seconds")}
                     for split, values in json.loads((folder / "finetune" / "report.json").read_text())["metrics"].items()}
                    for folder in (out, again))
    assert mine["best"]["zero_shot_top1"] > 0.2 and mine == theirs


def test_demo_refuses_a_non_empty_folder(tmp_path, runner):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "mine.txt").write_text("x")
    result = runner.invoke(cli, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 2 and "is not empty (use --overwrite" in result.stderr
    assert (tmp_path / "demo" / "mine.txt").exists()
