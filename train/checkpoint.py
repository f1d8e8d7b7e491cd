"""Checkpoints written by a run.

Every checkpoint is a dict that `curate.models.load_clip(name, path)` (open_clip's loader) reads
as is: `state_dict` (the whole CLIP model, text tower included) and `name`; it adds `head` (the
classification head), `classes` (the eval task's class names) and `epoch`. The resume checkpoint
(`checkpoints/last.pt`) also holds `trainer` (optimizer, grad scaler, step, micro-batch count),
`best` (the best epoch so far and its val score) and `train_seconds` / `train_images`. Files are
written to a temp name and renamed, so a kill never leaves a half-written checkpoint.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import torch

from curate.errors import CurateError, first_line
from manifests.io import atomic_write

log = logging.getLogger(__name__)


class WrongModelError(CurateError):
    """A checkpoint written for another model name than the one asked for."""


def save_checkpoint(path: Path, bundle, classifier, classes: list[str], epoch: int, extra: dict[str, Any] | None = None) -> Path:
    """Write a load_clip-compatible checkpoint with the head (and `extra`, e.g. the trainer state)."""
    state = {
        "state_dict": {k: v.detach().cpu() for k, v in bundle.model.state_dict().items()},
        "name": bundle.name,
        "head": {k: v.detach().cpu() for k, v in classifier.head.state_dict().items()},
        "classes": list(classes),
        "epoch": int(epoch),
        **(extra or {}),
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on CPU (memory-mapped); CurateError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CurateError(f"checkpoint not found: {path}")
    try:
        # memory-mapped where torch.save's zip format allows it; mmap refuses other files with a misleading message
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise CurateError(f"cannot read checkpoint {path}: {type(exc).__name__}: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise CurateError(f"checkpoint {path} is not a state dict")
    return data


def check_architecture(path: str | Path, model: str) -> dict[str, Any]:
    """The checkpoint's metadata; WrongModelError if it was written for another model name."""
    data = read_checkpoint(path)
    written_for = data.get("name")
    if written_for and written_for != model:
        raise WrongModelError(f"checkpoint {path} is for model '{written_for}', not '{model}' (pass --model {written_for})")
    return data


def head_state_for(data: dict[str, Any], classes: list[str]) -> dict[str, Any] | None:
    """The checkpoint's head if it was trained for the same classes, else None (head from templates)."""
    head, saved = data.get("head"), data.get("classes")
    if head is None:
        return None
    if saved != list(classes):
        log.warning("checkpoint head was trained for other classes; initialising the head from the templates")
        return None
    return head
