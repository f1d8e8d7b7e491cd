"""train.loop, train.evaluate, train.linear_probe: schedule, optimizer groups, accumulation, metrics, the probe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from train.evaluate import classification_metrics
from train.linear_probe import L2_GRID, fit_probe, sweep_l2
from train.loop import TrainConfig, Trainer, _sample_weights, build_optimizer, cosine_lr


def test_cosine_schedule_with_warmup():
    assert cosine_lr(0, 1e-5, 500, 10_000) == pytest.approx(1e-5 / 500)
    assert cosine_lr(499, 1e-5, 500, 10_000) == pytest.approx(1e-5)
    assert cosine_lr(500, 1e-5, 500, 10_000) == pytest.approx(1e-5)
    assert cosine_lr(500 + 4750, 1e-5, 500, 10_000) == pytest.approx(0.5e-5)
    assert cosine_lr(10_000, 1e-5, 500, 10_000) == pytest.approx(0.0, abs=1e-15)
    assert cosine_lr(0, 1e-3, 0, 10) == pytest.approx(1e-3)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(4)
        self.fc = torch.nn.Linear(4, 3)
        self.logit_scale = torch.nn.Parameter(torch.ones([]))
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.fc(self.ln_1(x)) * self.logit_scale


def test_optimizer_groups_and_betas():
    optimizer = build_optimizer(_Tiny(), lr=1e-5, wd=0.1)
    no_decay, decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) == 1 and decay["params"][0].shape == (3, 4)  # only fc.weight
    assert len(no_decay["params"]) == 4  # ln weight + bias, fc bias, logit scale; frozen params left out
    assert decay["betas"] == (0.9, 0.95)


def _step_with(accum, mix_loss=False):
    torch.manual_seed(0)
    model = _Tiny()
    config = TrainConfig(epochs=1, lr=1e-2, warmup=0, accum_steps=accum, mix_loss=mix_loss, grad_clip=0)
    micro_batches = []

    def forward(x):
        micro_batches.append(len(x))
        return model(x)

    trainer = Trainer(model, forward, config, steps_per_epoch=1)
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(12, 4, generator=generator), torch.randint(0, 3, (12,), generator=generator)
    sources = torch.tensor([0] * 9 + [1] * 3)
    loss = trainer._step(images, labels, sources)
    return loss, [p.detach().clone() for p in model.parameters()], micro_batches


@pytest.mark.parametrize("mix_loss", [False, True])
def test_gradient_accumulation_matches_the_full_batch(mix_loss, torch_one_thread):
    loss_full, params_full, micro_full = _step_with(1, mix_loss)
    loss_acc, params_acc, micro_acc = _step_with(4, mix_loss)
    assert micro_full == [12]
    assert micro_acc == [3, 3, 3, 3]  # the batch of 12 really is split into 4 micro-batches
    assert loss_acc == pytest.approx(loss_full, rel=1e-5)
    for a, b in zip(params_full, params_acc):
        assert torch.allclose(a, b, atol=1e-6)


def test_an_epoch_stops_on_weights_that_are_no_longer_finite_not_on_a_skipped_step(monkeypatch):
    """With fp16, GradScaler skips a step whose gradients overflow: its loss is inf or NaN, the weights stay."""
    from curate.errors import CurateError

    model = _Tiny()
    trainer = Trainer(model, model, TrainConfig(epochs=1, lr=1e-2, warmup=0), steps_per_epoch=2)
    batches = [(torch.randn(4, 4), torch.tensor([0, 1, 2, 0]), torch.zeros(4, dtype=torch.long))] * 2
    monkeypatch.setattr(Trainer, "_accumulate", lambda self, images, labels, sources: float("nan"))
    assert trainer.train_epoch(batches, 1)["train_loss"] is None  # no finite step: null in the report, not NaN
    with torch.no_grad():
        model.fc.weight[0, 0] = float("inf")
    with pytest.raises(CurateError, match="^training diverged in epoch 2: the weights are no longer finite"):
        trainer.train_epoch(batches, 2)


def test_channels_last_converts_the_models_weights():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten())
    Trainer(model, model, TrainConfig(epochs=1, channels_last=True), steps_per_epoch=1)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()


def test_mixloss_weights_sum_per_source_means():
    weights = _sample_weights(torch.tensor([0, 0, 0, 1]), mix_loss=True)
    assert weights.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])
    assert _sample_weights(torch.tensor([0, 0, 0, 1]), mix_loss=False).tolist() == pytest.approx([0.25] * 4)


def test_metrics_by_hand():
    logits = np.array([
        [9, 1, 0, 0, 0, 0],  # label 0: top1 hit
        [0, 9, 8, 7, 6, 5],  # label 5: top5 hit, top1 miss
        [9, -5, 0, 0, 0, 1],  # label 1: miss both (lowest logit)
        [0, 0, 9, 0, 0, 0],  # label 2: hit
    ], dtype=np.float32)
    labels = np.array([0, 5, 1, 2])
    metrics = classification_metrics(logits, labels, 6, "head")
    assert metrics == pytest.approx({"head_top1": 0.5, "head_top5": 0.75, "head_mean_per_class_recall": 0.5})
    assert "x_top5" not in classification_metrics(logits[:, :4], np.array([0, 1, 1, 2]), 4, "x")
    imbalanced = classification_metrics(np.eye(2)[[0, 0, 0, 0]], np.array([0, 0, 0, 1]), 2, "y")
    assert imbalanced["y_top1"] == 0.75 and imbalanced["y_mean_per_class_recall"] == 0.5


def test_linear_probe_sweeps_the_grid_and_beats_chance():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 64))

    def sample(n):
        y = rng.integers(0, 10, n)
        x = centers[y] * 0.3 + rng.normal(size=(n, 64))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y

    (xt, yt), (xv, yv), (xs, ys) = sample(500), sample(200), sample(300)
    sweep = sweep_l2(xt, yt, xv, yv, 10)
    assert len(sweep.curve) == len(L2_GRID) == 97
    assert [l2 for l2, _ in sweep.curve] == sorted(L2_GRID)
    assert sweep.l2 in L2_GRID and sweep.val_top1 == max(acc for _, acc in sweep.curve)
    probe = fit_probe(np.concatenate([xt, xv]), np.concatenate([yt, yv]), 10, sweep.l2, init=sweep.weights)
    accuracy = float((probe.logits(xs).argmax(1) == ys).mean())
    assert accuracy > 0.7  # chance is 0.1
    assert math.isfinite(sweep.seconds)
