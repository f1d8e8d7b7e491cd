"""`finetune_and_probe`: adapt CLIP's image encoder on manifests, report zero-shot / head / linear-probe accuracy.

Steps: check every input (task, eval folders, manifests, model or checkpoint) before anything is
written; evaluate the starting model (epoch 0: zero-shot, head, linear probe on the eval task's
test split); train for `epochs` with a val evaluation, a jsonl line and a checkpoint after each
epoch; pick the best epoch on val; evaluate it on test; write `report.json` (last: it marks a
finished run) and `val_accuracy.png`. A killed run started again with the same settings resumes
from `checkpoints/last.pt` and ends with the same metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from curate.choices import (
    KEEP_CHECKPOINTS,
    MIX_MODES,
    PRECISIONS,
    SELECT_BY,
    check_choice,
)
from curate.errors import CurateError
from curate.models import DEFAULT_CLIP

log = logging.getLogger(__name__)

SETTINGS_FILE = "run_settings.json"
EPOCHS_FILE = "epochs.jsonl"
EPOCH0_FILE = "epoch0_metrics.json"
BEST_KEY = "best_epoch"  # features/best_epoch{N}_{split}.npz (and _sweep.npz): of the weights in best.pt (epoch N)
MAX_SEED = 2**32 - 1  # what numpy and torch seeding take on every platform
_NOT_SETTINGS = ("out", "overwrite", "resume", "workers", "eval_batch_size")


@dataclasses.dataclass
class FinetuneResult:
    """What a run produced: its folder, metrics of the best epoch and of epoch 0, timings."""

    out: Path
    metrics: dict[str, float]
    epoch0: dict[str, float]
    best_epoch: int
    epochs_run: int
    n_train_images: int
    seconds: float
    images_per_s: float

    def summary(self) -> str:
        keys = ("zero_shot_top1", "head_top1", "linear_probe_top1")
        before = ", ".join(f"{k} {self.epoch0.get(k, float('nan')):.4f}" for k in keys)
        after = ", ".join(f"{k} {self.metrics.get(k, float('nan')):.4f}" for k in keys)
        return (f"epoch 0 (test): {before}\nbest epoch {self.best_epoch} (test): {after}\n"
                f"{self.n_train_images} train images, {self.images_per_s:.1f} images/s, {self.seconds:.1f} s; "
                f"report: {self.out / 'report.json'}")


def finetune_and_probe(
    train: list[str] | tuple[str, ...] = (),
    eval_task: str = "",
    eval_data: str = "",
    out: str = "",
    mix: str | list[float] | None = None,
    mix_mode: str = "data",
    model: str = DEFAULT_CLIP[0],
    pretrained: str | None = None,
    epochs: int = 30,
    lr: float = 1e-5,
    batch_size: int = 512,
    wd: float = 0.1,
    warmup: int = 500,
    freeze_blocks: int = 0,
    reinit: bool = True,
    init_from: str | None = None,
    train_fraction: float = 1.0,
    eval_only: bool = False,
    seed: int = 0,
    device: str = "auto",
    workers: int = 2,
    accum_steps: int | None = None,
    precision: str = "auto",
    compile: str | bool = "auto",
    select_by: str = "linear_probe",
    keep_checkpoints: str = "last",
    eval_batch_size: int = 256,
    overwrite: bool = False,
    resume: bool = True,
) -> FinetuneResult:
    """Finetune CLIP's image encoder on `train` manifests and evaluate it on the eval task's folders.

    Args: train manifests (paths or folders); eval_task (builtin name or task file); eval_data (an
    ImageFolder root with train/val/test); out (the run folder); mix weights (one per manifest,
    "0.9,0.1") with mix_mode "data" (MixData) or "loss" (MixLoss); model/pretrained (registry
    names; pretrained None = the registry default, '' = random weights); the seed 004 recipe (epochs, lr, batch_size,
    wd, warmup); freeze_blocks/reinit (seed 001 layer transfer); init_from (a checkpoint of an
    earlier run, e.g. RealTune); train_fraction (stratified, seeded); eval_only; seed (data order,
    augmentation, re-initialisation, train fraction); device (auto | cpu | cuda[:N]); workers (data
    loader processes); accum_steps (micro-batches per step; None: whole batches on CUDA, split on
    out-of-memory, at most 128 images per micro-batch elsewhere); precision (auto: bf16 or fp16 on
    CUDA, fp32 on CPU); compile (torch.compile; "auto": on CUDA); select_by (val metric choosing the
    best epoch: linear_probe | head | zero_shot); keep_checkpoints (last: best.pt + last.pt; all: also
    epoch_K.pt); eval_batch_size; overwrite (replace OUT); resume (continue an interrupted run in OUT).
    Returns a FinetuneResult; writes OUT/report.json, epochs.jsonl, val_accuracy.png, checkpoints/.
    """
    settings = {k: v for k, v in locals().items()}
    settings["train"] = [str(p) for p in train]
    start = time.perf_counter()
    run = _prepare(settings)
    history, fresh = _open_run(run, settings)
    try:
        epoch0 = _epoch0_metrics(run, history)
        if not eval_only:
            _train(run, history)
        return _finish(run, history, epoch0, time.perf_counter() - start)
    except CurateError as exc:  # e.g. an unreadable image, maybe raised in a loader worker
        from train.data import one_line_error

        if fresh and not (run.out / "checkpoints" / "last.pt").exists():  # nothing to resume: leave no run folder
            _remove_run(run.out)
        raise one_line_error(exc) from None


# ---------------------------------------------------------------- preparation (no writes)
@dataclasses.dataclass
class _Run:
    settings: dict[str, Any]
    out: Path
    task: Any
    bundle: Any
    classifier: Any
    layers: dict[str, Any]
    sources: list
    weights: list[float] | None
    eval_samples: dict[str, list]
    device: str
    amp_dtype: Any
    trainer: Any = None
    forward: Any = None
    train_seconds: float = 0.0
    train_images: int = 0


def _prepare(s: dict[str, Any]) -> _Run:
    """Check options and inputs, load the model and data; nothing is written yet."""
    from curate.tasks import load_task
    from train.data import (
        check_every_class,
        load_train_sources,
        parse_mix,
        scan_eval_folder,
    )

    _check_options(s)
    task = load_task(s["eval_task"])
    eval_samples = scan_eval_folder(s["eval_data"], task.class_names)
    check_every_class(s["eval_data"], eval_samples, task.class_names)
    sources, weights = [], None
    if not s["eval_only"]:
        sources = load_train_sources(s["train"], task.class_names, s["train_fraction"], s["seed"])
        weights = parse_mix(s["mix"], len(sources))
        if s["mix_mode"] == "loss" and weights is None:
            raise CurateError("--mix-mode loss needs --mix, one weight per --train manifest")
    device, amp_dtype = _device_and_precision(s["device"], s["precision"])
    s["device"], s["precision"] = device, str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"
    bundle, head_state = _load_model(s, task.class_names)
    from train.model import build_classifier, freeze_layers

    classifier = build_classifier(bundle, task.class_names, list(task.templates), head_state=head_state, device=device)
    layers = {} if s["eval_only"] else freeze_layers(classifier, s["freeze_blocks"], s["reinit"], s["seed"])
    return _Run(s, Path(s["out"]), task, bundle, classifier, layers, sources, weights, eval_samples, device, amp_dtype)


def _check_options(s: dict[str, Any]) -> None:
    if not s["out"]:
        raise CurateError("--out is required")
    if not s["eval_task"] or not s["eval_data"]:
        raise CurateError("--eval-task and --eval-data are required")
    for option, choices in (("select_by", SELECT_BY), ("precision", PRECISIONS), ("keep_checkpoints", KEEP_CHECKPOINTS),
                            ("mix_mode", MIX_MODES)):
        check_choice("--" + option.replace("_", "-"), s[option], choices)
    checks = [
        (s["epochs"] >= 1 or s["eval_only"], f"--epochs must be >= 1, got {s['epochs']}"),
        (s["batch_size"] >= 1, f"--batch-size must be >= 1, got {s['batch_size']}"),
        (math.isfinite(s["lr"]) and math.isfinite(s["wd"]), "--lr and --wd must be finite numbers"),
        (s["lr"] > 0 and s["wd"] >= 0 and s["warmup"] >= 0, "--lr must be > 0, --wd and --warmup >= 0"),
        (0 <= s["seed"] <= MAX_SEED, f"--seed must be in 0..{MAX_SEED}, got {s['seed']}"),
        (s["freeze_blocks"] >= 0, f"--freeze-blocks must be >= 0, got {s['freeze_blocks']}"),
        (not (s["init_from"] and s["pretrained"]), "give --init-from or --pretrained, not both"),
        (s["accum_steps"] is None or s["accum_steps"] >= 1, "--accum-steps must be >= 1"),
        (not (s["eval_only"] and s["train"]), "--eval-only trains nothing: leave out --train"),
    ]
    for ok, message in checks:
        if not ok:
            raise CurateError(message)


def _device_and_precision(device: str, precision: str):
    import torch

    from curate.models import resolve_device

    device = resolve_device(device)
    if precision == "auto":
        if not device.startswith("cuda"):
            return device, None
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not device.startswith("cuda"):
        raise CurateError("--precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return device, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _load_model(s: dict[str, Any], class_names: list[str]):
    """The CLIP bundle (from the registry) and the head of an `init_from` checkpoint, if it fits."""
    from curate.models import load_clip, resolve_pretrained
    from train.checkpoint import WrongModelError, check_architecture, head_state_for

    checkpoint = s["init_from"] or s["pretrained"]
    head_state = None
    if s["init_from"]:
        head_state = head_state_for(check_architecture(checkpoint, s["model"]), class_names)
    elif checkpoint and Path(checkpoint).is_file():
        try:
            check_architecture(checkpoint, s["model"])
        except WrongModelError:
            raise
        except CurateError:
            pass  # not a file torch reads as a dict here: open_clip's loader (in load_clip) has its own try
    return load_clip(s["model"], resolve_pretrained(s["model"], checkpoint), device="cpu"), head_state


# ---------------------------------------------------------------- the output folder
def _open_run(run: _Run, settings: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """Create OUT, or reopen an interrupted run with the same settings and inputs (with --overwrite too, as long
    as resuming is allowed); returns the epoch history so far, and whether OUT is new."""
    from manifests.io import (
        changed_settings,
        clear_output,
        make_folder,
        read_saved,
        write_json,
    )

    out = run.out
    fingerprint = {**{k: v for k, v in settings.items() if k not in _NOT_SETTINGS}, **_input_stamps(run)}
    if (out.exists() or out.is_symlink()) and settings["overwrite"]:
        if settings["resume"] and _interrupted(out) and not changed_settings(read_saved(out / SETTINGS_FILE), fingerprint):
            log.info("--overwrite keeps the interrupted run in %s: its settings and inputs are the same", out)
        else:
            clear_output(out, _input_paths(run))
    if out.exists():
        _check_resumable(out, fingerprint, settings["resume"])
        history = _read_history(out)
        log.info("resuming the run in %s after epoch %d", out, max((h["epoch"] for h in history), default=0))
        return history, False
    make_folder(out)
    write_json(json.loads(json.dumps(fingerprint, default=str)), out / SETTINGS_FILE)
    return [], True


def _input_stamps(run: _Run) -> dict[str, Any]:
    """What a resumed run must find as it was, beyond the options: the task's classes (their order is the
    head's), each train manifest's file and version, and the eval images with their labels."""
    import hashlib

    from manifests.io import manifest_stamp

    listing, root = hashlib.sha256(), Path(run.settings["eval_data"])
    for split, samples in sorted(run.eval_samples.items()):
        for path, label in samples:
            listing.update(f"{split}\t{label}\t{path.relative_to(root)}\n".encode("utf-8", "surrogateescape"))
    return {"classes": list(run.task.class_names), "train_files": [manifest_stamp(src.path) for src in run.sources],
            "eval_images": listing.hexdigest()}


def _interrupted(out: Path) -> bool:
    from manifests.io import REPORT_NAME

    return out.is_dir() and not out.is_symlink() and (out / SETTINGS_FILE).exists() and not (out / REPORT_NAME).exists()


def _remove_run(out: Path) -> None:
    from manifests.io import remove_output

    with contextlib.suppress(OSError):
        remove_output(out)


def _input_paths(run: _Run) -> Iterator[str | Path]:
    """The files and folders a run reads (a builtin task name or an open_clip tag is none), the folders of the
    training images last: listed only if an output is to be replaced."""
    from manifests.io import manifest_inputs

    s = run.settings
    named = [s["eval_data"], s["eval_task"], s["init_from"], s["pretrained"]]
    yield from (path for path in named if path and Path(path).exists())
    for source in run.sources:
        yield from manifest_inputs(source.path, source.table)


def _check_resumable(out: Path, fingerprint: dict[str, Any], resume: bool) -> None:
    from manifests.io import changed_settings, read_saved

    if not _interrupted(out):
        raise CurateError(f"output directory {out} already exists (use --overwrite to replace it)")
    if not resume:
        raise CurateError(f"output directory {out} holds an interrupted run (resume it, or use --overwrite)")
    changed = changed_settings(read_saved(out / SETTINGS_FILE), fingerprint)
    if changed:
        raise CurateError(f"{out} holds an interrupted run with other settings or inputs ({', '.join(changed)}); "
                          "use --overwrite")


def _read_history(out: Path) -> list[dict[str, Any]]:
    """Epoch records up to the last checkpoint (later lines belong to an epoch that will run again)."""
    from manifests.io import atomic_write
    from train.checkpoint import read_checkpoint

    last = out / "checkpoints" / "last.pt"
    done = int(read_checkpoint(last)["epoch"]) if last.exists() else 0
    path = out / EPOCHS_FILE
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n") if path.exists() else []
    records = [_epoch_record(line) for line in lines if line]
    if None in records:
        log.warning("%s: %d damaged line(s) left out", path, records.count(None))
    history = [r for r in records if r is not None and r["epoch"] <= done]
    text = "".join(json.dumps(r) + "\n" for r in history)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return history


# ---------------------------------------------------------------- evaluation and training
def _eval_loader(run: _Run, split: str):
    import torch

    from train.data import ImageListDataset

    dataset = ImageListDataset(run.eval_samples[split], run.bundle.preprocess_val)
    return torch.utils.data.DataLoader(dataset, batch_size=run.settings["eval_batch_size"], shuffle=False,
                                       num_workers=run.settings["workers"], pin_memory=run.device.startswith("cuda"))


def _features(run: _Run, split: str, cache_key: str | None = None):
    from train.evaluate import cached_features, extract_features

    def compute():
        return extract_features(run.classifier, _eval_loader(run, split), run.device, run.amp_dtype, desc=f"{split} features")

    cache = run.out / "features" if cache_key else None
    return cached_features(cache, f"{cache_key}_{split}", compute)


def _full_eval(run: _Run, tag: str) -> dict[str, float]:
    from train.evaluate import full_metrics, load_sweep

    features = {split: _features(run, split, cache_key=tag) for split in ("train", "val", "test")}
    sweep = load_sweep(run.out / "features", f"{tag}_sweep")  # the best epoch's, saved by _save_best if kept
    return full_metrics(run.classifier, features, len(run.task.classes), sweep=sweep)


def _epoch0_metrics(run: _Run, history: list[dict[str, Any]]) -> dict[str, float]:
    """Metrics of the starting model (computed once; a resumed run reads them back)."""
    from manifests.io import write_json

    path = run.out / EPOCH0_FILE
    if path.exists() and any(h["epoch"] == 0 for h in history):
        return json.loads(path.read_text(encoding="utf-8"))
    metrics = _full_eval(run, "epoch0")
    record = {"epoch": 0, **{k: v for k, v in metrics.items() if k.startswith(("val_", "linear_probe_l2"))}}
    write_json(metrics, path)
    _append_history(run.out, record)
    history.append(record)
    return metrics


def _val_metrics(run: _Run) -> tuple[dict[str, float], dict[str, Any], Any]:
    """Val metrics of the current model, the features they came from (val, and train for the probe), and the
    probe's L2 sweep (None unless the probe selects the best epoch)."""
    from train.evaluate import head_metrics, probe_sweep

    n_classes = len(run.task.classes)
    features = {"val": _features(run, "val")}
    metrics = head_metrics(run.classifier, *features["val"], n_classes, prefix="val_")
    sweep = None
    if run.settings["select_by"] == "linear_probe":
        features["train"] = _features(run, "train")
        sweep, probe_metrics = probe_sweep(features["train"], features["val"], n_classes)
        metrics.update(probe_metrics)
    return metrics, features, sweep


def _save_best(run: _Run, epoch: int, features: dict[str, Any], sweep) -> None:
    """best.pt, and the epoch's features (and L2 sweep) under the keys `_finish` looks up, so that it encodes
    only test and sweeps no L2 again.

    The files of earlier bests are deleted first: a kept file always belongs to the weights in best.pt
    (a kill in between leaves none, and `_finish` encodes those splits and sweeps again).
    """
    from train.checkpoint import save_checkpoint
    from train.evaluate import save_features, save_sweep

    cache = run.out / "features"
    for stale in cache.glob(f"{BEST_KEY}*.npz"):
        stale.unlink()
    save_checkpoint(run.out / "checkpoints" / "best.pt", run.bundle, run.classifier, run.task.class_names, epoch)
    for split, (x, y) in features.items():
        save_features(cache, f"{BEST_KEY}{epoch}_{split}", x, y)
    if sweep is not None:
        save_sweep(cache, f"{BEST_KEY}{epoch}_sweep", sweep)


def _epoch_record(line: str) -> dict[str, Any] | None:
    """One line of epochs.jsonl; None for a line cut short (a kill or a full disk while it was appended: its
    epoch comes after the last checkpoint and runs again)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("epoch"), int) else None


def _append_history(out: Path, record: dict[str, Any]) -> None:
    with open(out / EPOCHS_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _train(run: _Run, history: list[dict[str, Any]]) -> None:
    """Epochs after the last checkpoint: train, evaluate on val, log, checkpoint."""
    from train.checkpoint import read_checkpoint, save_checkpoint
    from train.loop import seed_epoch

    loader, plan = _train_loader(run)
    _make_trainer(run, len(plan))
    last = run.out / "checkpoints" / "last.pt"
    best = {"epoch": 0, "score": [float("-inf")]}
    done = 0
    if last.exists():
        state = read_checkpoint(last)
        _restore(run, state)
        done, best = int(state["epoch"]), dict(state["best"])
    score_key = SELECT_BY[run.settings["select_by"]]
    tie_breaks = [score_key, *(k for k in ("val_head_top1", "val_zero_shot_top1") if k != score_key)]
    for epoch in range(done + 1, run.settings["epochs"] + 1):
        seed_epoch(run.settings["seed"], epoch)
        plan.set_epoch(epoch)
        stats = run.trainer.train_epoch(loader, epoch)
        run.train_seconds += stats["seconds"]
        run.train_images += stats["images"]
        metrics, features, sweep = _val_metrics(run)
        record = {"epoch": epoch, **stats, "images_per_s": stats["images"] / max(stats["seconds"], 1e-9), **metrics}
        _append_history(run.out, record)
        history.append(record)
        score = [record[k] for k in tie_breaks]  # the selected val metric; ties: head, then zero-shot, then earliest
        if score > best["score"]:
            best = {"epoch": epoch, "score": score}
            _save_best(run, epoch, features, sweep)
        if run.settings["keep_checkpoints"] == "all":
            save_checkpoint(run.out / "checkpoints" / f"epoch_{epoch}.pt", run.bundle, run.classifier, run.task.class_names, epoch)
        extra = {"trainer": run.trainer.state_dict(), "best": best, "train_seconds": run.train_seconds, "train_images": run.train_images}
        save_checkpoint(last, run.bundle, run.classifier, run.task.class_names, epoch, extra=extra)
        loss = "n/a" if stats["train_loss"] is None else f"{stats['train_loss']:.4f}"
        log.info("epoch %d: loss %s, %s %.4f", epoch, loss, score_key, record[score_key])


def _train_loader(run: _Run):
    import torch

    from train.data import BatchPlan, ManifestDataset, SeededSamples

    datasets = [ManifestDataset(src, run.bundle.preprocess_train, i) for i, src in enumerate(run.sources)]
    plan = BatchPlan([len(d) for d in datasets], run.settings["batch_size"], run.weights, run.settings["mix_mode"], run.settings["seed"])
    workers = run.settings["workers"]
    loader = torch.utils.data.DataLoader(
        SeededSamples(torch.utils.data.ConcatDataset(datasets)), batch_sampler=plan, num_workers=workers,
        pin_memory=run.device.startswith("cuda"), prefetch_factor=4 if workers else None,
    )
    return loader, plan


def _make_trainer(run: _Run, steps_per_epoch: int) -> None:
    import torch

    from train.loop import TrainConfig, Trainer, default_accum_steps

    s, cuda = run.settings, run.device.startswith("cuda")
    config = TrainConfig(
        epochs=s["epochs"], lr=s["lr"], wd=s["wd"], warmup=s["warmup"],
        accum_steps=s["accum_steps"] or default_accum_steps(s["batch_size"], run.device), device=run.device,
        amp_dtype=run.amp_dtype, mix_loss=s["mix_mode"] == "loss" and run.weights is not None, fused=cuda, channels_last=cuda,
    )
    use_compile = s["compile"] if isinstance(s["compile"], bool) else cuda
    run.forward = torch.compile(run.classifier) if use_compile else run.classifier
    run.trainer = Trainer(run.classifier, run.forward, config, steps_per_epoch)


def _restore(run: _Run, state: dict[str, Any]) -> None:
    run.bundle.model.load_state_dict(state["state_dict"])
    run.classifier.head.load_state_dict(state["head"])
    run.trainer.load_state_dict(state["trainer"])
    run.train_seconds, run.train_images = float(state["train_seconds"]), int(state["train_images"])


# ---------------------------------------------------------------- the report
def _finish(run: _Run, history: list[dict[str, Any]], epoch0: dict[str, float], seconds: float) -> FinetuneResult:
    from manifests.io import write_report
    from train.checkpoint import read_checkpoint
    from train.plots import plot_history

    best_epoch, metrics = 0, epoch0
    best_path = run.out / "checkpoints" / "best.pt"
    if not run.settings["eval_only"] and best_path.exists():
        state = read_checkpoint(best_path)
        best_epoch = int(state["epoch"])
        run.bundle.model.load_state_dict(state["state_dict"])
        run.classifier.head.load_state_dict(state["head"])
        metrics = _full_eval(run, f"{BEST_KEY}{best_epoch}")  # train / val features and sweep saved by _save_best, if kept
    images_per_s = run.train_images / run.train_seconds if run.train_seconds else 0.0
    n_train = sum(src.rows for src in run.sources)
    epochs_run = max((h["epoch"] for h in history), default=0)
    plot_history(history, run.out / "val_accuracy.png", title=f"{run.task.name}: val accuracy per epoch")
    report = _report(run, epoch0, metrics, best_epoch, epochs_run, seconds, images_per_s, n_train)
    write_report(run.out, report)
    return FinetuneResult(run.out, metrics, epoch0, best_epoch, epochs_run, n_train, seconds, images_per_s)


def _report(run: _Run, epoch0, metrics, best_epoch, epochs_run, seconds, images_per_s, n_train) -> dict[str, Any]:
    settings = {k: v for k, v in run.settings.items() if k not in ("overwrite", "resume")}
    if run.trainer is not None:  # what ran, not "auto": micro-batches (doubled on out-of-memory) and compilation
        settings["accum_steps"], settings["compile"] = run.trainer.accum, run.forward is not run.classifier
    return {
        "stage": "finetune-and-probe",
        "task": run.task.name,
        "settings": json.loads(json.dumps(settings, default=str)),
        "model": {"name": run.bundle.name, "pretrained": run.bundle.pretrained, "init_from": run.settings["init_from"], "layers": run.layers},
        "train": [_source_summary(src, run.task.class_names) for src in run.sources],
        "eval_data": {"path": str(run.settings["eval_data"]), **{k: len(v) for k, v in run.eval_samples.items()}},
        "metrics": {"best": metrics, "epoch0": epoch0},
        "best_epoch": best_epoch,
        "select_by": SELECT_BY[run.settings["select_by"]],
        "epochs_run": epochs_run,
        "n_train_images": n_train,
        "seconds": round(seconds, 3),
        "train_seconds": round(run.train_seconds, 3),
        "images_per_s": round(images_per_s, 2),
        "files": {"epochs": EPOCHS_FILE, "plot": "val_accuracy.png", "checkpoints": "checkpoints/"},
    }


def _source_summary(src, class_names: list[str]) -> dict[str, Any]:
    import numpy as np
    import pyarrow.compute as pc

    per_class = np.bincount(src.labels, minlength=len(class_names))
    sources = pc.value_counts(src.table.column("source")).to_pylist()
    return {
        "manifest": str(src.path),
        "rows": src.rows_total,
        "used": src.rows,
        "sources": {entry["values"]: entry["counts"] for entry in sources},
        "per_class": {class_names[k]: int(v) for k, v in enumerate(per_class) if v},
        "provenance": src.provenance,
    }
