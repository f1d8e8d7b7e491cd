"""Linear probe: multinomial logistic regression on frozen features, L2 strength swept on val.

Protocol (CLIP_benchmark / SynCLR style): standardise the features with the train split's
statistics, fit a logistic regression for every L2 strength of a log grid (strongest first,
each fit warm-started from the previous one, so the whole path costs little more than a few
cold fits), keep the strength with the best val top-1, then refit on train+val with it and
score the test split. The solver is scipy's L-BFGS-B on a closed-form float32 loss/gradient
(numpy BLAS), the same solver family as sklearn's `lbfgs`, without its per-fit overhead.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

log = logging.getLogger(__name__)

L2_GRID = tuple(float(v) for v in np.logspace(-6, 2, 97))  # CLIP_benchmark's grid: 97 values, 1e-6 .. 1e2
SWEEP_MAX_ITER = 30  # per grid value, warm-started
SWEEP_GTOL = 3e-4  # max |gradient| at which a fit of the sweep stops (the final refit uses 1e-4)
FINAL_MAX_ITER = 300
SMALL_PROBLEM = 20_000_000  # n * d * classes below which BLAS runs on one thread


@dataclasses.dataclass
class SweepResult:
    """The val accuracy of every L2 strength tried, and the chosen one."""

    l2: float
    val_top1: float
    curve: list[tuple[float, float]]
    weights: object  # torch tensor (d + 1, n_classes) fitted at `l2` on train (standardised features)
    seconds: float


@dataclasses.dataclass
class ProbeModel:
    """A fitted probe: standardisation statistics and the (d + 1, n_classes) weights (last row = bias)."""

    mean: object
    std: object
    weights: object
    l2: float

    def logits(self, features: np.ndarray) -> np.ndarray:
        import torch

        x = _augment((torch.as_tensor(features, dtype=torch.float32) - self.mean) / self.std)
        return (x @ self.weights).numpy()


def sweep_l2(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    n_classes: int,
    grid: tuple[float, ...] = L2_GRID,
    max_iter: int = SWEEP_MAX_ITER,
) -> SweepResult:
    """Fit one probe per L2 strength (strongest first, warm-started) and score each on val."""
    import torch

    start = time.perf_counter()
    mean, std = _standardisation(train_x)
    xt = _augment((torch.as_tensor(train_x, dtype=torch.float32) - mean) / std)
    xv = _augment((torch.as_tensor(val_x, dtype=torch.float32) - mean) / std)
    yt = torch.as_tensor(train_y, dtype=torch.long)
    yv = torch.as_tensor(val_y, dtype=torch.long)
    weights = torch.zeros(xt.shape[1], n_classes)
    counts = torch.bincount(yt, minlength=n_classes).float() + 1.0
    weights[-1] = (counts / counts.sum()).log()  # the strong-L2 limit: W = 0, bias = log class priors
    best = (-1.0, grid[0], weights)
    curve = []
    for l2 in sorted(grid, reverse=True):
        weights = fit_logistic(xt, yt, n_classes, l2, init=weights, max_iter=max_iter, gtol=SWEEP_GTOL)
        with torch.no_grad():
            accuracy = float(((xv @ weights).argmax(1) == yv).float().mean()) if len(yv) else 0.0
        curve.append((l2, accuracy))
        if accuracy > best[0]:  # ties keep the stronger regularisation (seen first)
            best = (accuracy, l2, weights.clone())
    seconds = time.perf_counter() - start
    log.debug("L2 sweep: %d values in %.1f s, best l2=%.3g val top1=%.4f", len(grid), seconds, best[1], best[0])
    return SweepResult(l2=best[1], val_top1=best[0], curve=sorted(curve), weights=best[2], seconds=seconds)


def fit_probe(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float, init=None, max_iter: int = FINAL_MAX_ITER) -> ProbeModel:
    """Fit the probe on (x, y) at one L2 strength (standardising with x's own statistics)."""
    import torch

    mean, std = _standardisation(x)
    xt = _augment((torch.as_tensor(x, dtype=torch.float32) - mean) / std)
    weights = fit_logistic(xt, torch.as_tensor(y, dtype=torch.long), n_classes, l2, init=init, max_iter=max_iter)
    return ProbeModel(mean=mean, std=std, weights=weights, l2=l2)


def fit_logistic(x, y, n_classes: int, l2: float, init=None, max_iter: int = 100, gtol: float = 1e-4):
    """L-BFGS (scipy) on mean cross-entropy + l2 * ||W||^2 (the bias row is not penalised).

    x: (n, d + 1) float32 tensor whose last column is ones; returns the (d + 1, n_classes) weights.
    The loss and gradient are computed in closed form with numpy (no autograd overhead per call).
    """
    import torch
    from scipy.optimize import minimize

    xs = x.numpy() if hasattr(x, "numpy") else np.asarray(x, dtype=np.float32)
    targets = np.zeros((len(xs), n_classes), dtype=np.float32)
    targets[np.arange(len(xs)), np.asarray(y)] = 1.0
    shape = (xs.shape[1], n_classes)
    start = np.zeros(shape) if init is None else np.asarray(init, dtype=np.float64)

    def loss_and_grad(flat):
        weights = flat.reshape(shape).astype(np.float32)
        logits = xs @ weights
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        total = exp.sum(axis=1, keepdims=True)
        loss = float(np.mean(np.log(total[:, 0]) - (logits * targets).sum(1)))
        grad = xs.T @ ((exp / total - targets) / len(xs))
        penalised = weights[:-1]
        loss += l2 * float((penalised.astype(np.float64) ** 2).sum())
        grad[:-1] += 2 * l2 * penalised
        return loss, grad.astype(np.float64).ravel()

    with _blas_threads(xs.size * n_classes):
        result = minimize(loss_and_grad, start.ravel(), jac=True, method="L-BFGS-B",
                          options={"maxiter": max_iter, "gtol": gtol, "maxcor": 10})
    return torch.as_tensor(result.x.reshape(shape), dtype=torch.float32)


def _blas_threads(work: int):
    """One BLAS thread for small problems (threads only add contention there), the default otherwise."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1 if work < SMALL_PROBLEM else None, user_api="blas")


def _standardisation(x: np.ndarray):
    import torch

    x = torch.as_tensor(x, dtype=torch.float32)
    return x.mean(0), x.std(0).clamp_min(1e-6)


def _augment(x):
    import torch

    return torch.cat([x, torch.ones(len(x), 1)], dim=1)
