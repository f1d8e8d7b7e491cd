"""Evaluation on the eval task's data: flat metric dicts (CLIP_benchmark style keys).

Everything is computed from one pass of image features per split: zero-shot logits (features @
the fixed text head), head logits (the finetuned head), and the linear probe (logistic regression
on the features; L2 strength swept on val, refitted on train+val, scored on test).
Keys: `{zero_shot,head,linear_probe}_{top1,top5,mean_per_class_recall}` (top5 only with >= 5
classes), `linear_probe_l2`, `linear_probe_val_top1`; `val_`-prefixed keys are on the val split.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from manifests.io import atomic_write
from train.linear_probe import L2_GRID, SweepResult, fit_probe, sweep_l2


def autocast(device: str, dtype):
    """bf16/fp16 autocast when `dtype` is set (CUDA, or bf16 on CPU); a no-op for fp32 (None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


@torch.no_grad()
def extract_features(classifier, loader, device: str, amp_dtype=None, desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised image features (float32) and labels of every sample of `loader`."""
    from tqdm import tqdm

    was_training = classifier.training
    classifier.eval()
    features, labels = [], []
    for images, targets in tqdm(loader, desc=desc, leave=False, disable=None):
        images = images.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            features.append(classifier.features(images).float().cpu())
        labels.append(targets)
    classifier.train(was_training)
    return torch.cat(features).numpy(), torch.cat(labels).numpy()


def cached_features(cache: Path | None, key: str, compute) -> tuple[np.ndarray, np.ndarray]:
    """`compute()` once per (cache folder, key); the arrays are kept as `cache/key.npz`."""
    path = cache / f"{key}.npz" if cache else None
    if path is not None and path.exists():
        with np.load(path) as data:
            return data["x"], data["y"]
    x, y = compute()
    if cache is not None:
        save_features(cache, key, x, y)
    return x, y


def save_features(cache: Path, key: str, x: np.ndarray, y: np.ndarray) -> Path:
    """Write (or replace) `cache/key.npz`, the file `cached_features` reads back."""
    return _save_npz(cache / f"{key}.npz", x=x, y=y)


def save_sweep(cache: Path, key: str, sweep: SweepResult) -> Path:
    """Write `cache/key.npz`, a sweep that `load_sweep` reads back (the end of a run reuses the best epoch's)."""
    weights = sweep.weights.cpu().numpy() if isinstance(sweep.weights, torch.Tensor) else np.asarray(sweep.weights)
    return _save_npz(cache / f"{key}.npz", l2=sweep.l2, val_top1=sweep.val_top1, seconds=sweep.seconds,
                     curve=np.asarray(sweep.curve, dtype=np.float64).reshape(-1, 2), weights=weights)


def load_sweep(cache: Path, key: str) -> SweepResult | None:
    """The sweep `save_sweep` wrote under `key`, or None if there is none."""
    path = cache / f"{key}.npz"
    if not path.exists():
        return None
    with np.load(path) as data:
        curve = [(float(l2), float(top1)) for l2, top1 in data["curve"]]
        return SweepResult(float(data["l2"]), float(data["val_top1"]), curve, data["weights"], float(data["seconds"]))


def _save_npz(path: Path, **arrays) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a file object: np.savez would add ".npz" to a name
            np.savez(handle, **arrays)

    atomic_write(path, write)
    return path


def classification_metrics(logits: np.ndarray, labels: np.ndarray, n_classes: int, prefix: str) -> dict[str, float]:
    """`{prefix}_top1`, `{prefix}_top5` (>= 5 classes) and `{prefix}_mean_per_class_recall`."""
    logits = np.asarray(logits, dtype=np.float32)
    labels = np.asarray(labels)
    if len(labels) == 0:
        return {}
    predicted = logits.argmax(1)
    metrics = {f"{prefix}_top1": float((predicted == labels).mean())}
    if n_classes >= 5:
        top5 = np.argpartition(-logits, 4, axis=1)[:, :5]
        metrics[f"{prefix}_top5"] = float((top5 == labels[:, None]).any(1).mean())
    present = np.unique(labels)
    recalls = [float((predicted[labels == c] == c).mean()) for c in present]
    metrics[f"{prefix}_mean_per_class_recall"] = float(np.mean(recalls))
    return metrics


def head_metrics(classifier, x: np.ndarray, y: np.ndarray, n_classes: int, prefix: str = "") -> dict[str, float]:
    """Zero-shot and finetuned-head metrics from precomputed (normalised) features."""
    features = torch.as_tensor(x, dtype=torch.float32)
    with torch.no_grad():
        zero_shot = features @ classifier.zero_shot_weight.float().cpu().T
        head = features @ classifier.head.weight.float().cpu().T + classifier.head.bias.float().cpu()
    return {
        **classification_metrics(zero_shot.numpy(), y, n_classes, f"{prefix}zero_shot"),
        **classification_metrics(head.numpy(), y, n_classes, f"{prefix}head"),
    }


def probe_sweep(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], n_classes: int, grid=L2_GRID):
    """The L2 sweep (fit on train, score on val); returns (SweepResult, val metrics dict)."""
    sweep = sweep_l2(train[0], train[1], val[0], val[1], n_classes, grid=grid)
    return sweep, {"val_linear_probe_top1": sweep.val_top1, "linear_probe_l2": sweep.l2}


def probe_test(sweep, train, val, test, n_classes: int) -> dict[str, float]:
    """Refit the probe on train+val at the swept L2 strength and score it on test."""
    x = np.concatenate([train[0], val[0]])
    y = np.concatenate([train[1], val[1]])
    probe = fit_probe(x, y, n_classes, sweep.l2, init=sweep.weights)
    metrics = classification_metrics(probe.logits(test[0]), test[1], n_classes, "linear_probe")
    return {**metrics, "linear_probe_l2": sweep.l2, "linear_probe_val_top1": sweep.val_top1, "linear_probe_sweep_seconds": round(sweep.seconds, 3)}


def full_metrics(classifier, features: dict[str, tuple[np.ndarray, np.ndarray]], n_classes: int,
                 sweep: SweepResult | None = None) -> dict[str, float]:
    """Test metrics (zero-shot, head, linear probe) plus val metrics, from features of train/val/test; the L2
    sweep over these train/val features is run here unless it is given (it is deterministic)."""
    if sweep is None:
        sweep, _ = probe_sweep(features["train"], features["val"], n_classes)
    return {
        **head_metrics(classifier, *features["test"], n_classes),
        **probe_test(sweep, features["train"], features["val"], features["test"], n_classes),
        **head_metrics(classifier, *features["val"], n_classes, prefix="val_"),
        "val_linear_probe_top1": sweep.val_top1,
    }
