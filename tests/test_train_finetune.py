"""finetune_and_probe end to end on a small learnable world (5 classes of coloured shapes, tiny CLIP, CPU).

One module-wide world and one reference run (3 epochs) are shared; the other runs are short.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers_cli import assert_cli_error
from helpers_train import CLASSES, SMALL, write_rows

import train.checkpoint
from curate.cli import cli
from curate.errors import CurateError
from manifests import read_manifest
from train.cli import cli as standalone_cli
from train.finetune import finetune_and_probe
from train.plots import plot_history
from train.synthetic_world import make_shape_world

EPOCHS = 3
RUN = {**SMALL, "epochs": EPOCHS, "select_by": "head"}
METRIC_KEYS = {
    f"{head}_{m}" for head in ("zero_shot", "head", "linear_probe") for m in ("top1", "top5", "mean_per_class_recall")
} | {"linear_probe_l2", "linear_probe_val_top1", "val_head_top1", "val_zero_shot_top1", "val_linear_probe_top1"}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, torch_one_thread):
    return make_shape_world(tmp_path_factory.mktemp("world"), CLASSES, per_class=24, eval_per_class=10, source="retrieved")


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "reference"
    result = finetune_and_probe(train=[str(world.manifest)], eval_task=str(world.task_file), eval_data=str(world.eval_dir), out=str(out), **RUN)
    return result


def _history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "epochs.jsonl").read_text(encoding="utf-8").splitlines()]


def _without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.endswith("seconds")}


def test_training_lowers_loss_and_lifts_the_head(reference):
    history = _history(reference.out)
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    losses = [h["train_loss"] for h in history[1:]]
    assert losses[-1] < losses[0] * 0.8
    chance = 1 / len(CLASSES)
    assert reference.epoch0["head_top1"] < 0.4  # random tiny CLIP: about chance before training
    assert reference.metrics["head_top1"] >= 0.8  # well above chance (0.2) after 3 epochs
    assert reference.metrics["linear_probe_top1"] >= 0.8 and reference.epoch0["linear_probe_top1"] >= 3 * chance
    assert reference.best_epoch == max(range(1, 4), key=lambda e: (history[e]["val_head_top1"], history[e]["val_zero_shot_top1"], -e))


def test_report_files_and_keys(reference, world, tmp_path):
    report = json.loads((reference.out / "report.json").read_text(encoding="utf-8"))
    assert set(report["metrics"]) == {"best", "epoch0"}
    for metrics in report["metrics"].values():
        assert METRIC_KEYS <= set(metrics)
    assert report["best_epoch"] == reference.best_epoch and report["epochs_run"] == EPOCHS
    assert report["n_train_images"] == 120 and report["images_per_s"] > 0 and report["seconds"] > 0
    assert report["settings"]["lr"] == 1e-3 and report["settings"]["batch_size"] == 32
    # what ran, not what was asked for: 32 images in one micro-batch on the CPU, no torch.compile there
    assert (report["settings"]["accum_steps"], report["settings"]["compile"]) == (1, False)
    assert (report["settings"]["device"], report["settings"]["precision"]) == ("cpu", "fp32")
    [train] = report["train"]
    assert train["rows"] == train["used"] == 120 and train["sources"] == {"retrieved": 120}
    assert train["per_class"] == {name: 24 for name in CLASSES}
    assert train["provenance"]["stage"] == "synthetic_world"
    assert report["eval_data"]["test"] == 50 and "command" in report and "versions" in report
    # the plot is plot_history (tested in test_train_plots) of every epoch logged, epoch 0 included
    again = plot_history(_history(reference.out), tmp_path / "again.png", title=f"{report['task']}: val accuracy per epoch")
    assert (reference.out / "val_accuracy.png").read_bytes() == again.read_bytes()
    checkpoints = {p.name for p in (reference.out / "checkpoints").iterdir()}
    assert checkpoints == {"best.pt", "last.pt"}
    best = f"best_epoch{reference.best_epoch}"
    splits = ("train", "val", "test")
    assert {p.name for p in (reference.out / "features").iterdir()} == {f"{tag}_{s}.npz" for tag in ("epoch0", best) for s in splits}


def test_resume_after_a_kill_gives_the_same_metrics(reference, world, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    real_save = train.checkpoint.save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(path, *args, **kwargs):
        if path.name == "last.pt" and args[3] == 2:
            raise Killed  # dies after epoch 2's jsonl line and best.pt, before its resume checkpoint
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(train.checkpoint, "save_checkpoint", save_then_die)
    kwargs = {"train": [str(world.manifest)], "eval_task": str(world.task_file), "eval_data": str(world.eval_dir), "out": str(out), **RUN}
    with pytest.raises(Killed):
        finetune_and_probe(**kwargs)
    assert [h["epoch"] for h in _history(out)] == [0, 1, 2] and not (out / "report.json").exists()
    monkeypatch.setattr(train.checkpoint, "save_checkpoint", real_save)
    with pytest.raises(CurateError, match="other settings or inputs \\(lr\\)"):
        finetune_and_probe(**{**kwargs, "lr": 5e-4})
    resumed = finetune_and_probe(**kwargs)
    assert [h["epoch"] for h in _history(out)] == [0, 1, 2, 3]  # epoch 2 ran again, its stale line dropped
    assert _without_timing(resumed.metrics) == _without_timing(reference.metrics)
    assert _without_timing(resumed.epoch0) == _without_timing(reference.epoch0) and resumed.best_epoch == reference.best_epoch
    losses = [h["train_loss"] for h in _history(out)[1:]]
    assert losses == [h["train_loss"] for h in _history(reference.out)[1:]]
    with pytest.raises(CurateError, match="already exists"):
        finetune_and_probe(**kwargs)


def test_a_resumed_run_finds_its_inputs_as_they_were_and_overwrite_resumes(world, tmp_path, monkeypatch, caplog):
    """A task reordered or a manifest rewritten under the same names was resumed: the head's classes were the old
    order (accuracy 0.2 for 0.9). --overwrite started an interrupted run over; a cut-off epochs.jsonl line crashed."""
    import os
    import shutil

    import pyarrow.parquet as pq
    import yaml

    task = tmp_path / "task.yaml"
    shutil.copy(world.task_file, task)
    manifest = world.manifest.parent / f"copy-{tmp_path.name}.parquet"  # beside the images it names
    pq.write_table(pq.read_table(world.manifest), manifest)
    out, real_save = tmp_path / "run", train.checkpoint.save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(path, *args, **kwargs):
        if path.name == "last.pt" and args[3] == 2:
            raise Killed
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(train.checkpoint, "save_checkpoint", save_then_die)
    kwargs = {"train": [str(manifest)], "eval_task": str(task), "eval_data": str(world.eval_dir), "out": str(out), **RUN}
    with pytest.raises(Killed):
        finetune_and_probe(**kwargs)
    monkeypatch.setattr(train.checkpoint, "save_checkpoint", real_save)
    epoch_1 = _history(out)[1]
    with open(out / "epochs.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"epoch": 3, "train_lo')  # a kill while the line was appended
    original = task.read_text(encoding="utf-8")
    spec = yaml.safe_load(original)
    spec["classes"] = spec["classes"][::-1]
    task.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    with pytest.raises(CurateError, match=r"other settings or inputs \(classes, eval_images\)"):
        finetune_and_probe(**kwargs)
    task.write_text(original, encoding="utf-8")
    stat = manifest.stat()
    os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten under the same name
    with pytest.raises(CurateError, match=r"other settings or inputs \(train_files\)"):
        finetune_and_probe(**kwargs)
    os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with caplog.at_level("INFO", logger="train.finetune"):
        resumed = finetune_and_probe(**kwargs, overwrite=True)
    assert "--overwrite keeps the interrupted run" in caplog.text
    assert [h["epoch"] for h in _history(out)] == [0, 1, 2, 3] and _history(out)[1] == epoch_1  # epoch 1 not run again
    assert resumed.epochs_run == EPOCHS
    finetune_and_probe(**kwargs, overwrite=True)  # a finished run: --overwrite starts over
    assert _history(out)[1] != epoch_1
    manifest.unlink()


def test_realtune_from_a_checkpoint_with_a_train_fraction(reference, world, tmp_path):
    out = tmp_path / "realtune"
    result = CliRunner().invoke(cli, [
        "finetune-and-probe", "--train", str(world.manifest), "--eval-task", str(world.task_file),
        "--eval-data", str(world.eval_dir), "--out", str(out), "--init-from", str(reference.out / "checkpoints" / "best.pt"),
        "--train-fraction", "0.5", "--epochs", "1", "--model", "tiny-clip", "--lr", "1e-4", "--batch-size", "32",
        "--warmup", "0", "--workers", "0",
    ])
    assert result.exit_code == 0, result.output
    assert "best epoch 1" in result.output
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["n_train_images"] == 60 and report["train"][0]["per_class"] == {name: 12 for name in CLASSES}
    assert report["model"]["init_from"].endswith("best.pt")
    epoch0 = report["metrics"]["epoch0"]  # the checkpoint's model and head, evaluated before any new step
    assert epoch0["head_top1"] == pytest.approx(reference.metrics["head_top1"])
    assert epoch0["zero_shot_top1"] == pytest.approx(reference.metrics["zero_shot_top1"])


def test_eval_only_through_the_standalone_command(world, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(standalone_cli, [
        "--eval-task", str(world.task_file), "--eval-data", str(world.eval_dir), "--out", str(out),
        "--model", "tiny-clip", "--eval-only", "--workers", "0",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["best_epoch"] == 0 and report["metrics"]["best"] == report["metrics"]["epoch0"]
    assert report["n_train_images"] == 0 and not (out / "checkpoints").exists()
    refused = CliRunner().invoke(standalone_cli, ["--eval-task", str(world.task_file), "--eval-data", str(world.eval_dir),
                                                  "--out", str(out), "--model", "tiny-clip", "--eval-only"])
    assert refused.exit_code == 2 and refused.stderr.startswith(f"finetune-and-probe: error: output directory {out} already exists")


def _bad(runner, world, out, message, *extra, train=None):
    """finetune-and-probe on the shape world with `extra` options fails cleanly with `message`, writing nothing."""
    args = ["finetune-and-probe", "--eval-task", str(world.task_file), "--eval-data", str(world.eval_dir), "--out", str(out),
            "--model", "tiny-clip", "--workers", "0", *extra]
    if train is not None:
        args += ["--train", str(train)]
    assert_cli_error(runner.invoke(cli, args), message, out)


def test_bad_input_one_line_no_output(world, reference, tmp_path, runner):
    out = tmp_path / "bad"
    empty = write_rows(tmp_path / "empty", [])
    _bad(runner, world, out, "is empty", train=empty)
    table = read_manifest(world.manifest).to_pylist()
    table[0]["class_name"] = "orange hexagon"
    outside = write_rows(tmp_path / "outside", table)
    _bad(runner, world, out, "not in the eval task: 'orange hexagon'", train=outside)
    broken = tmp_path / "broken_eval"
    (broken / "train" / "red circle").mkdir(parents=True)
    (broken / "test" / "red circle").mkdir(parents=True)
    result = runner.invoke(cli, ["finetune-and-probe", "--eval-task", str(world.task_file), "--eval-data", str(broken),
                                 "--out", str(out), "--train", str(world.manifest)])
    assert_cli_error(result, "missing split folder(s): val", out)
    torch.save({"state_dict": {}, "name": "ViT-B-16"}, tmp_path / "vit.pt")
    _bad(runner, world, out, "is for model 'ViT-B-16', not 'tiny-clip'", "--init-from", str(tmp_path / "vit.pt"), train=world.manifest)
    state = torch.load(reference.out / "checkpoints" / "best.pt", weights_only=True)
    state["state_dict"]["visual.proj"] = torch.zeros(64, 16)  # another embedding width
    torch.save(state, tmp_path / "other.pt")
    _bad(runner, world, out, "does not fit model 'tiny-clip'", "--init-from", str(tmp_path / "other.pt"), train=world.manifest)
    _bad(runner, world, out, "--mix has 2 weight(s)", "--mix", "0.5,0.5", train=world.manifest)
    _bad(runner, world, out, "--freeze-blocks must be in 0..5", "--freeze-blocks", "6", train=world.manifest)
    _bad(runner, world, out, "--lr and --wd must be finite numbers", "--lr", "inf", train=world.manifest)
    _bad(runner, world, out, "--seed must be in 0..4294967295, got -1", "--seed", "-1", train=world.manifest)
    _bad(runner, world, out, "unknown device 'foo': use auto, cpu, cuda or cuda:N", "--device", "foo", train=world.manifest)
    # --overwrite --eval-only deleted a --train folder inside --out (its images were not listed as inputs)
    _bad(runner, world, out, "--eval-only trains nothing: leave out --train", "--eval-only", train=world.manifest)
    # MixLoss needs weights: without --mix it was MixData, and the report said loss
    _bad(runner, world, out, "--mix-mode loss needs --mix", "--mix-mode", "loss", train=world.manifest)


def test_an_eval_split_without_some_class_is_refused(world, tmp_path, runner):
    """The probe could never predict such a class, and accuracy was over fewer classes: silently."""
    import shutil

    eval_dir = tmp_path / "eval"
    shutil.copytree(world.eval_dir, eval_dir)
    shutil.rmtree(eval_dir / "val" / CLASSES[2])
    result = runner.invoke(cli, ["finetune-and-probe", "--eval-task", str(world.task_file), "--eval-data", str(eval_dir),
                                 "--out", str(tmp_path / "r"), "--model", "tiny-clip", "--train", str(world.manifest)])
    assert_cli_error(result, f"eval folder {eval_dir / 'val'} has no images of 1 class(es) of the task: '{CLASSES[2]}'",
                     tmp_path / "r")


def test_a_run_failing_on_its_input_before_any_checkpoint_leaves_no_folder(world, tmp_path, runner):
    """A missing train image stopped epoch 1 and left OUT with run_settings.json: the corrected command was refused."""
    rows = read_manifest(world.manifest).to_pylist()
    for row in rows:
        row["image_path"] = str(world.manifest.parent / row["image_path"])
    rows[3]["image_path"] += ".gone"
    train = write_rows(tmp_path / "m", rows)
    args = ["finetune-and-probe", "--eval-task", str(world.task_file), "--eval-data", str(world.eval_dir), "--out",
            str(tmp_path / "r"), "--model", "tiny-clip", "--workers", "0", "--epochs", "1", "--train", str(train)]
    assert_cli_error(runner.invoke(cli, args), "cannot read image of row", tmp_path / "r")


def test_a_diverging_run_stops_with_one_line(world, tmp_path, runner):
    args = ["finetune-and-probe", "--eval-task", str(world.task_file), "--eval-data", str(world.eval_dir), "--out", str(tmp_path / "r"),
            "--model", "tiny-clip", "--workers", "0", "--train", str(world.manifest), "--lr", "1e9", "--warmup", "0", "--epochs", "2"]
    assert_cli_error(runner.invoke(cli, args), ": the weights are no longer finite (try a lower --lr)")


def test_overwrite_never_deletes_the_runs_inputs(world, tmp_path, runner):
    rows = read_manifest(world.manifest).to_pylist()
    for row in rows:
        row["image_path"] = str(world.manifest.parent / row["image_path"])  # absolute: the manifest moves
    train = write_rows(tmp_path / "m", rows)
    images = world.manifest.parent / Path(rows[0]["image_path"]).relative_to(world.manifest.parent).parts[0]
    for out in (train, train.parent, tmp_path, images):
        args = ["finetune-and-probe", "--eval-task", str(world.task_file), "--eval-data", str(world.eval_dir), "--out", str(out),
                "--model", "tiny-clip", "--workers", "0", "--train", str(train), "--overwrite"]
        assert_cli_error(runner.invoke(cli, args), f"output directory {out} holds the input {images if out == images else train}")
    assert read_manifest(train).num_rows == len(rows)


def test_loader_processes_do_not_change_the_run(world, tmp_path):
    """Random augmentations follow each sample's seed, not the process that loads it."""
    runs = [finetune_and_probe(train=[str(world.manifest)], eval_task=str(world.task_file), eval_data=str(world.eval_dir),
                               out=str(tmp_path / f"w{workers}"), **{**RUN, "epochs": 1, "workers": workers})
            for workers in (0, 2)]
    losses = [[json.loads(line).get("train_loss") for line in (r.out / "epochs.jsonl").read_text().splitlines()] for r in runs]
    assert losses[0] == losses[1] and losses[0][-1] is not None
    timeless = [{k: v for k, v in r.metrics.items() if not k.endswith("seconds")} for r in runs]
    assert timeless[0] == timeless[1]


def test_mixloss_and_frozen_layers_run(world, tmp_path, monkeypatch):
    from train.loop import Trainer

    steps = []
    accumulate = Trainer._accumulate

    def recording(self, images, labels, sources):
        steps.append((self.config.mix_loss, torch.bincount(sources, minlength=2).tolist()))
        return accumulate(self, images, labels, sources)

    monkeypatch.setattr(Trainer, "_accumulate", recording)
    synthetic = make_shape_world(tmp_path / "syn", CLASSES, per_class=6, eval_per_class=1, source="synthetic", seed=5)
    result = finetune_and_probe(
        train=[str(world.manifest), str(synthetic.manifest)], mix="0.5,0.5", mix_mode="loss", eval_task=str(world.task_file),
        eval_data=str(world.eval_dir), out=str(tmp_path / "mix"), **{**RUN, "epochs": 1}, freeze_blocks=5,
    )
    report = json.loads((result.out / "report.json").read_text(encoding="utf-8"))
    assert report["model"]["layers"]["trained"] == ["head"] and report["model"]["layers"]["reinitialised"]
    assert report["n_train_images"] == 150 and {t["sources"].popitem()[0] for t in report["train"]} == {"retrieved", "synthetic"}
    assert report["settings"]["mix_mode"] == "loss"
    # MixLoss: every batch of 32 holds a fixed 16 + 16 from the two sources, and the loss weighs each source's mean;
    # ceil(150 / 32) batches in the epoch, the last one the 22 images left, 11 + 11
    assert steps == [(True, [16, 16])] * 4 + [(True, [11, 11])]


def test_probe_selected_run_ends_without_encoding_train_or_val_or_sweeping_again(world, tmp_path, monkeypatch):
    import train.evaluate

    sweeps, encoded = [], []
    sweep_l2, extract = train.evaluate.sweep_l2, train.evaluate.extract_features
    monkeypatch.setattr(train.evaluate, "sweep_l2", lambda *a, **k: sweeps.append(1) or sweep_l2(*a, **k))
    monkeypatch.setattr(train.evaluate, "extract_features", lambda *a, desc, **k: encoded.append(desc) or extract(*a, desc=desc, **k))
    result = finetune_and_probe(train=[str(world.manifest)], eval_task=str(world.task_file), eval_data=str(world.eval_dir),
                                out=str(tmp_path / "probe"), **{**RUN, "epochs": 2, "select_by": "linear_probe"})
    assert len(sweeps) == 1 + 2  # epoch 0, then once per epoch; the end reuses the best epoch's
    assert encoded == ["train features", "val features", "test features"] + ["val features", "train features"] * 2 + ["test features"]
    best = _history(result.out)[result.best_epoch]
    assert result.metrics["val_linear_probe_top1"] == best["val_linear_probe_top1"]
    assert result.metrics["linear_probe_l2"] == best["linear_probe_l2"]
    assert (result.out / "features" / f"best_epoch{result.best_epoch}_sweep.npz").exists()


def test_demo_finetune_writes_its_own_eval_folder(world, tmp_path):
    from train.demo import demo_finetune

    lines = []
    result = demo_finetune([world.manifest], tmp_path / "demo", eval_task=str(world.task_file), eval_per_class=4, epochs=1, echo=lines.append)
    assert (tmp_path / "demo" / "eval" / "val" / "yellow star").is_dir()
    assert result.out == tmp_path / "demo" / "finetune" and (result.out / "report.json").exists()
    assert lines[0].startswith("finetune-and-probe --train") and "best epoch 1" in lines[1]


def test_unreadable_image_in_a_loader_worker_is_one_line(world, tmp_path):
    rows = read_manifest(world.manifest).to_pylist()
    rows[3]["image_path"] = "images/missing.png"
    for row in rows:
        row["image_path"] = str(world.manifest.parent / row["image_path"])  # absolute: the manifest moves
    manifest = write_rows(tmp_path / "m", rows)
    result = CliRunner().invoke(cli, [
        "finetune-and-probe", "--train", str(manifest), "--eval-task", str(world.task_file), "--eval-data", str(world.eval_dir),
        "--out", str(tmp_path / "run"), "--model", "tiny-clip", "--epochs", "1", "--batch-size", "32", "--workers", "1",
        "--select-by", "head",
    ])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "cannot read image of row" in result.stderr and "missing.png" in result.stderr
