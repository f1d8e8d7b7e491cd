"""Benchmark: finetuning throughput vs seed 004's recipe, and the linear-probe L2 sweep.

1. Training images/s of the same train step (train.loop.Trainer: forward, cross-entropy, backward,
   grad clip, AdamW) under two recipes, measured in the same process on in-memory batches (so
   image decoding is not what is measured), rounds interleaved to share the machine's noise:
     * `004`: the reference code's recipe: fp32, eager, torch's default AdamW (foreach on CUDA, the
       per-parameter loop on CPU), contiguous NCHW;
     * `ours`: what finetune_and_probe picks: on CUDA bf16 autocast + channels-last + fused AdamW +
       torch.compile. On CPU it picks the 004 recipe (fp32 eager), so `ours` is not timed there (it
       would only measure noise); the CPU variants (bf16 autocast, compile) show what they would give.
   Micro-batches as finetune_and_probe makes them (train.loop.default_accum_steps).
   CPU: the builtin tiny CLIP (32 px). GPU (when CUDA exists): ViT-B-16 at 224 px, random weights.
2. Linear probe: the full L2 sweep (97 values) + the train+val refit on 10k x 512 features,
   100 classes, BLAS/torch limited to 2 threads. Goal: < 30 s.

    python scripts/bench_finetune.py [--steps 20] [--rounds 3] [--json bench.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLASSES = [f"class {i}" for i in range(10)]
CPU_OURS = "same as 004 (finetune_and_probe trains fp32 eager on CPU): speedup 1.00x by construction, not timed"


def make_trainer(model_name: str, device: str, batch: int, amp, fused: bool, compiled: bool, channels_last: bool):
    """A Trainer on a fresh classifier (from the model registry) with one recipe."""
    import torch

    from curate.models import load_clip
    from train.loop import TrainConfig, Trainer, default_accum_steps
    from train.model import build_classifier

    bundle = load_clip(model_name, None, device="cpu")
    classifier = build_classifier(bundle, CLASSES, ["a photo of a {}."], device=device)
    config = TrainConfig(epochs=1, lr=1e-5, warmup=10, accum_steps=default_accum_steps(batch, device),
                         device=device, amp_dtype=amp, fused=fused, channels_last=channels_last)
    forward = torch.compile(classifier) if compiled else classifier
    return Trainer(classifier, forward, config, steps_per_epoch=10_000), bundle.image_size


def time_steps(trainer, image_size: int, batch: int, steps: int, device: str) -> float:
    """Images per second over `steps` optimizer steps (after the caller's warmup)."""
    import torch

    images = torch.randn(batch, 3, image_size, image_size)
    labels = torch.randint(0, len(CLASSES), (batch,))
    sources = torch.zeros(batch, dtype=torch.long)
    if device.startswith("cuda"):
        images, labels = images.pin_memory(), labels.pin_memory()
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        trainer._step(images, labels, sources)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def bench_recipes(model_name: str, device: str, batch: int, steps: int, rounds: int, recipes: dict) -> dict:
    """Median images/s per recipe; rounds alternate between recipes."""
    built = {}
    for name, recipe in recipes.items():
        trainer, size = make_trainer(model_name, device, batch, **recipe)
        time_steps(trainer, size, batch, max(2, steps // 4), device)  # warmup (and compilation)
        built[name] = (trainer, size)
    results = {name: [] for name in recipes}
    for _ in range(rounds):
        for name, (trainer, size) in built.items():
            results[name].append(time_steps(trainer, size, batch, steps, device))
    return {name: round(statistics.median(values), 1) for name, values in results.items()}


def cpu_recipes() -> dict:
    import torch

    base = {"amp": None, "fused": False, "compiled": False, "channels_last": False}
    return {  # no "ours": on CPU finetune_and_probe uses the 004 recipe itself
        "004 (fp32 eager)": base,
        "bf16 autocast": {**base, "amp": torch.bfloat16},
        "fp32 + torch.compile": {**base, "compiled": True},
    }


def gpu_recipes() -> dict:
    import torch

    amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {
        "004 (fp32 eager)": {"amp": None, "fused": False, "compiled": False, "channels_last": False},
        "ours (bf16 + channels-last + fused AdamW + compile)": {"amp": amp, "fused": True, "compiled": True, "channels_last": True},
        "bf16 + fused AdamW (no compile)": {"amp": amp, "fused": True, "compiled": False, "channels_last": True},
    }


def bench_probe(n: int = 10_000, dim: int = 512, classes: int = 100, threads: int = 2) -> dict:
    """Seconds for the full L2 sweep + refit on (n x dim) features of `classes` Gaussian clusters."""
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    from train.linear_probe import L2_GRID, fit_probe, sweep_l2

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(classes, dim))

    def sample(count):
        y = rng.integers(0, classes, count)
        x = centers[y] * 0.15 + rng.normal(size=(count, dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y

    (xt, yt), (xv, yv), (xs, ys) = sample(n), sample(n // 5), sample(n // 5)
    with threadpool_limits(limits=threads):
        start = time.perf_counter()
        sweep = sweep_l2(xt, yt, xv, yv, classes)
        swept = time.perf_counter() - start
        probe = fit_probe(np.concatenate([xt, xv]), np.concatenate([yt, yv]), classes, sweep.l2, init=sweep.weights)
        total = time.perf_counter() - start
    accuracy = float((probe.logits(xs).argmax(1) == ys).mean())
    return {"features": [n, dim], "classes": classes, "grid": len(L2_GRID), "threads": threads,
            "sweep_seconds": round(swept, 2), "total_seconds": round(total, 2), "test_top1": round(accuracy, 4), "goal_seconds": 30}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpu-batch", type=int, default=128)
    parser.add_argument("--gpu-batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and BLAS")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-probe", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import logging

    import torch

    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    results: dict = {"torch": torch.__version__, "threads": args.threads}
    if not args.skip_train:
        cpu = bench_recipes("tiny-clip", "cpu", args.cpu_batch, args.steps, args.rounds, cpu_recipes())
        results["cpu_tiny_clip_images_per_s"] = cpu
        results["cpu_ours"] = CPU_OURS
        _print_speedups(f"CPU, tiny-clip 32 px, batch {args.cpu_batch}", cpu)
        print(f"  ours: {CPU_OURS}")
        if torch.cuda.is_available():
            gpu = bench_recipes("ViT-B-16", "cuda", args.gpu_batch, args.steps, args.rounds, gpu_recipes())
            results["gpu_vit_b_16_images_per_s"] = {**gpu, "device": torch.cuda.get_device_name()}
            _print_speedups(f"GPU {torch.cuda.get_device_name()}, ViT-B-16 224 px, batch {args.gpu_batch}", gpu)
        else:
            print("GPU ViT-B-16: no CUDA: skipped")
    if not args.skip_probe:
        probe = bench_probe(threads=args.threads)
        results["linear_probe"] = probe
        print(f"linear probe, 10k x 512 features, 100 classes, {probe['grid']} L2 values, {probe['threads']} threads: "
              f"sweep {probe['sweep_seconds']} s, sweep + refit {probe['total_seconds']} s (goal < 30 s), test top1 {probe['test_top1']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def _print_speedups(title: str, images_per_s: dict) -> None:
    baseline = next(iter(images_per_s.values()))
    print(title)
    for name, value in images_per_s.items():
        print(f"  {name:55s} {value:10.1f} images/s  {value / baseline:5.2f}x")


if __name__ == "__main__":
    main()
