"""The training loop: AdamW, warmup + cosine schedule, gradient accumulation, autocast, grad clipping.

Recipe (seed 004): cross-entropy, AdamW betas (0.9, 0.95), lr 1e-5, weight decay 0.1 except on
norms, biases and scalars (open_clip's rule), 500 linear warmup steps then cosine to 0, grad-norm
clip 1.0. A batch of `batch_size` samples is split into `accum_steps` micro-batches whose summed
gradients equal the full batch's; with `accum_steps=None` on CUDA the split doubles on out-of-memory.
MixLoss batches weight each sample by 1 / (its source's count in the batch), so the loss is the sum
of the per-source mean losses; otherwise every sample weighs 1 / batch size (the mean).
Each epoch's data order and augmentation depend only on (seed, epoch), so a run resumed from an
epoch checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import torch

from curate.errors import CurateError
from train.evaluate import autocast

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 30
    lr: float = 1e-5
    wd: float = 0.1
    warmup: int = 500
    accum_steps: int | None = None  # None: start with whole batches, split further on CUDA out-of-memory
    grad_clip: float = 1.0
    device: str = "cpu"
    amp_dtype: Any = None  # torch.bfloat16 / torch.float16 on CUDA, None = fp32
    mix_loss: bool = False
    fused: bool = False  # fused AdamW (CUDA)
    channels_last: bool = False  # the model's weights and the images channels-last (a CUDA speed-up)


def default_accum_steps(batch_size: int, device: str) -> int | None:
    """`accum_steps` when none is asked for: None on CUDA (whole batches, split on out-of-memory);
    elsewhere enough micro-batches that none holds more than 128 images."""
    return None if device.startswith("cuda") else max(1, -(-batch_size // 128))


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """open_clip's schedule: linear warmup to base_lr over `warmup` steps, then cosine to 0 at `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * base_lr


def build_optimizer(model: torch.nn.Module, lr: float, wd: float, fused: bool = False) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95) over trainable parameters; no weight decay on norms, biases, scalars, logit scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exclude = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def seed_epoch(seed: int, epoch: int) -> None:
    """Seed torch's global RNG (loader worker seeds and anything else drawn in the main process) from (seed, epoch)
    alone; augmentations follow each sample's own seed (train.data.SeededSamples)."""
    torch.manual_seed(seed * 100_003 + epoch)


class Trainer:
    """Runs epochs over a loader of (images, labels, source index) batches; holds optimizer and step."""

    def __init__(self, model: torch.nn.Module, forward, config: TrainConfig, steps_per_epoch: int):
        self.model, self.forward, self.config = model, forward, config
        if config.channels_last:  # in place: a compiled `forward` of this model traces the converted weights
            model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(model, config.lr, config.wd, fused=config.fused)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.amp_dtype == torch.float16)
        self.total_steps = config.epochs * steps_per_epoch
        self.step = 0
        self.accum = config.accum_steps or 1
        self.params = [p for p in model.parameters() if p.requires_grad]
        if config.warmup >= self.total_steps:
            log.warning("warmup (%d steps) is not shorter than the run (%d steps)", config.warmup, self.total_steps)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step, "accum": self.accum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.accum = int(state["step"]), int(state["accum"])

    def train_epoch(self, loader, epoch: int) -> dict[str, float]:
        """One pass over `loader`; returns mean loss (of the steps whose loss is finite: an fp16 step skipped for
        overflow is left out, and a JSON report holds no NaN), images, seconds, last lr."""
        from tqdm import tqdm

        self.model.train()
        start, seen, loss_sum, counted = time.perf_counter(), 0, 0.0, 0
        progress = tqdm(loader, desc=f"epoch {epoch}/{self.config.epochs}", leave=False, disable=None)
        for images, labels, sources in progress:
            lr = cosine_lr(self.step, self.config.lr, self.config.warmup, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss = self._step(images, labels, sources)
            self.step += 1
            seen += len(labels)
            if math.isfinite(loss):
                loss_sum, counted = loss_sum + loss * len(labels), counted + len(labels)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        seconds = time.perf_counter() - start
        if not self._weights_finite():  # not the loss: with fp16, GradScaler skips an overflowing step itself
            raise CurateError(f"training diverged in epoch {epoch}: the weights are no longer finite (try a lower --lr)")
        return {"train_loss": loss_sum / counted if counted else None, "images": seen, "seconds": seconds, "lr": lr if seen else 0.0}

    def _weights_finite(self) -> bool:
        with torch.no_grad():
            return bool(torch.stack([param.isfinite().all() for param in self.params]).all()) if self.params else True

    def _step(self, images, labels, sources) -> float:
        """One optimizer step on a full batch, split into micro-batches; on CUDA OOM retry with more."""
        while True:
            try:
                return self._accumulate(images, labels, sources)
            except torch.cuda.OutOfMemoryError:
                self.optimizer.zero_grad(set_to_none=True)
                if self.config.accum_steps or self.accum >= len(labels):
                    raise
                torch.cuda.empty_cache()
                self.accum *= 2
                log.warning("out of GPU memory: accumulating gradients over %d micro-batches", self.accum)

    def _accumulate(self, images, labels, sources) -> float:
        device, config = self.config.device, self.config
        weights = _sample_weights(sources, config.mix_loss)
        total = torch.zeros((), device=device)
        self.optimizer.zero_grad(set_to_none=True)
        for part in torch.arange(len(labels)).chunk(self.accum):
            x = images[part].to(device, non_blocking=True)
            if config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y, w = labels[part].to(device), weights[part].to(device)
            with autocast(device, config.amp_dtype):
                logits = self.forward(x)
            loss = (torch.nn.functional.cross_entropy(logits.float(), y, reduction="none") * w).sum()
            self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(total)


def _sample_weights(sources: torch.Tensor, mix_loss: bool) -> torch.Tensor:
    """Per-sample loss weights: 1/B (mean), or 1/count of the sample's source (MixLoss: sum of means)."""
    if not mix_loss:
        return torch.full((len(sources),), 1.0 / len(sources))
    counts = torch.bincount(sources)
    return 1.0 / counts[sources].float()
