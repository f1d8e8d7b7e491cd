"""Benchmark `curate filter`.

(a) Precomputed embeddings (clip-retrieval layout, fp16, several shards, urls in the metadata;
    the manifest holds a subset of those urls plus 1 % urls that were never embedded):
    * `core-512`: the streaming path (`iter_precomputed` + `score_embeddings`: url join, mmap gather,
      scoring) with ViT-B-16-sized 512-d embeddings and 2 domain texts, no model;
    * `filter-32`: the whole `filter_images(..., embeddings=DIR)` with tiny-clip (its embeddings are 32-d),
      including manifest read/write, report and plot;
    * (a') peak memory of `core-512` at two embedding counts with the same manifest size (flat = it does
      not grow with the number of embeddings), each in a fresh process: peak RSS (VmHWM, mapped file
      pages included) and peak anonymous RSS (RssAnon, sampled).
(b) The image path with tiny-clip on CPU: the DataLoader alone (decode + preprocess), the model forward
    alone (preprocessed tensors), the whole `filter_images`, and (--vit-b16 N) the ViT-B-16 forward alone.
(c) Decontamination's four searches on random 512-d embeddings and 64-bit phashes: training rows
    against eval images by phash (faiss multi-index hashing) and by CLIP (exact inner product, blocked
    torch matmuls), then the greedy in-train dedup by phash and by CLIP.

Example:
  python scripts/bench_filter.py --rows 2000000 --memory-sizes 1000000,4000000 --images 512
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CLASSES = [f"class {i}" for i in range(10)]


# ---------------------------------------------------------------- data
def _urls(start: int, stop: int) -> pa.Array:
    numbers = pc.cast(pa.array(np.arange(start, stop)), pa.string())
    return pc.binary_join_element_wise("https://img.example.com/", numbers, ".jpg", "")


def write_embeddings(folder: Path, rows: int, dim: int, shard_rows: int) -> Path:
    """Random fp16 embeddings in clip-retrieval layout (a rolled base block per shard: cheap to make)."""
    base = np.random.default_rng(0).standard_normal((65536, dim), dtype=np.float32).astype(np.float16)
    (folder / "img_emb").mkdir(parents=True, exist_ok=True)
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    for n, start in enumerate(range(0, rows, shard_rows)):
        stop = min(rows, start + shard_rows)
        out = np.lib.format.open_memmap(folder / "img_emb" / f"img_emb_{n}.npy", mode="w+", dtype=np.float16,
                                        shape=(stop - start, dim))
        for a in range(0, stop - start, len(base)):
            b = min(stop - start, a + len(base))
            out[a:b] = np.roll(base, n + a, axis=0)[: b - a]
        out.flush()
        del out
        pq.write_table(pa.table({"url": _urls(start, stop)}), folder / "metadata" / f"metadata_{n}.parquet")
    return folder


def write_candidates(path: Path, rows: int, candidates: int) -> tuple[Path, int]:
    """A manifest of `candidates` urls drawn from the `rows` embedded ones plus 1 % never embedded;
    returns (its path, its row count)."""
    from manifests.io import write_manifest

    rng = np.random.default_rng(1)
    picked = np.sort(rng.choice(rows, size=candidates, replace=False))
    missing = max(1, candidates // 100)
    urls = pa.concat_arrays([_urls(0, rows).take(pa.array(picked)), _urls(rows, rows + missing)])
    n = len(urls)
    labels = rng.integers(0, len(CLASSES), n).astype(np.int32)
    table = pa.table({
        "uid": pc.cast(pa.array(np.arange(n)), pa.string()),
        "label": labels,
        "class_name": pa.array(CLASSES).take(pa.array(labels)),
        "source": pa.array(["retrieved"] * n),
        "caption": pa.array(["a photo"] * n),
        "url": urls,
    })
    write_manifest(table, path)
    return path, n


def write_task(folder: Path) -> Path:
    from helpers_images import write_task_file

    return write_task_file(folder, {"name": "bench", "domain_text": ["a photo of a thing", "a picture of a thing"], "classes": CLASSES})


# ---------------------------------------------------------------- (a) precomputed embeddings
def _text(dim: int, count: int = 2) -> np.ndarray:
    text = np.random.default_rng(2).standard_normal((dim, count)).astype(np.float32)
    return text / np.linalg.norm(text, axis=0)


def time_core(emb_dir: Path, manifest: Path, dim: int) -> float:
    """The filter's scoring of precomputed embeddings (domain mode), without model, report or output."""
    from curate.embeddings import iter_precomputed
    from curate.filter import score_embeddings
    from manifests.io import read_manifest

    table = read_manifest(manifest)
    text = _text(dim)
    started = time.perf_counter()
    scores = np.full(table.num_rows, np.nan, dtype=np.float32)
    for rows, feats in iter_precomputed(table, emb_dir, dim, "bench"):
        scores[rows] = score_embeddings(feats, text)
    seconds = time.perf_counter() - started
    assert np.isnan(scores).sum() > 0  # the never-embedded rows
    return seconds


def time_filter(task: Path, emb_dir: Path, manifest: Path, out: Path) -> float:
    from curate.filter import filter_images

    started = time.perf_counter()
    filter_images(task, manifest, out, clip_model="tiny-clip", embeddings=emb_dir, threshold=0.0, device="cpu",
                  overwrite=True)
    return time.perf_counter() - started


def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmHWM, RssAnon, ...) in KiB; 0 when absent."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return 0


def memory_child(emb_dir: str, manifest: str, dim: int) -> None:
    """Run in a fresh process: score once, print peak RSS (incl. mapped file pages) and peak anon RSS."""
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _status_kib("RssAnon"))
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    seconds = time_core(Path(emb_dir), Path(manifest), dim)
    done.set()
    thread.join()
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so this child would report its parent's peak
    print(json.dumps({"seconds": seconds, "peak_rss_mib": _status_kib("VmHWM") / 1024, "peak_anon_mib": peak[0] / 1024}))


def bench_embeddings(args, work: Path) -> list[tuple]:
    rows = []
    emb512 = write_embeddings(work / "emb512", args.rows, 512, args.shard_rows)
    manifest, cand = write_candidates(work / "cand" / "manifest.parquet", args.rows, args.rows // 2)
    time_core(emb512, manifest, 512)  # warm-up: the first call pays ~1.3 s of imports and start-up
    core = [time_core(emb512, manifest, 512) for _ in range(args.repeats)]
    rows.append(("core-512 (fp16, 2 texts)", args.rows, cand, statistics.median(core)))
    emb32 = write_embeddings(work / "emb32", args.rows, 32, args.shard_rows)
    task = write_task(work)
    full = [time_filter(task, emb32, manifest, work / "out") for _ in range(args.repeats)]
    rows.append(("filter_images tiny-clip (32-d)", args.rows, cand, statistics.median(full)))
    for path in (emb512, emb32):
        _rmtree(path)
    return rows


def bench_memory(args, work: Path) -> list[tuple]:
    results = []
    for size in args.memory_sizes:
        emb = write_embeddings(work / f"mem{size}", size, 512, args.shard_rows)
        manifest, cand = write_candidates(work / f"mem{size}-cand" / "manifest.parquet", size, args.memory_candidates)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        child = subprocess.run([sys.executable, __file__, "--memory-child", str(emb), str(manifest)],
                               capture_output=True, text=True, env=env, check=True)
        stats = json.loads(child.stdout.strip().splitlines()[-1])
        results.append((size, cand, stats))
        _rmtree(emb)
    return results


# ---------------------------------------------------------------- (b) images
def bench_images(args, work: Path) -> list[tuple]:
    import torch
    from helpers_images import SHAPES_TASK, make_image_manifest, write_task_file

    from curate.embeddings import ImageRows, image_loader
    from curate.filter import filter_images
    from curate.models import encode_images, load_clip
    from manifests.images import image_rows
    from manifests.io import read_manifest

    manifest = make_image_manifest(work / "img", per_class=args.images // 3, size=256, suffix=".jpg")
    table = read_manifest(manifest)
    n = table.num_rows
    bundle = load_clip("tiny-clip", None)
    dataset = ImageRows(image_rows(table), manifest.parent, bundle.preprocess_val,
                        bundle.image_size, with_phash=False)
    results = []
    started = time.perf_counter()
    batches = [pixels for _, pixels, _, _ in image_loader(dataset, args.batch_size, args.workers)]
    results.append((f"DataLoader only (decode 256px jpg + preprocess, {args.workers} workers)", n,
                    time.perf_counter() - started))
    encode_images(bundle, batches[0][:2])  # warm-up
    started = time.perf_counter()
    for pixels in batches:
        encode_images(bundle, pixels)
    results.append((f"model forward only (tiny-clip, {torch.get_num_threads()} threads)", n, time.perf_counter() - started))
    task = write_task_file(work / "img", SHAPES_TASK)
    started = time.perf_counter()
    filter_images(task, manifest, work / "img-out", clip_model="tiny-clip", threshold=-1, device="cpu",
                  batch_size=args.batch_size, workers=args.workers)
    results.append(("filter_images end to end (tiny-clip)", n, time.perf_counter() - started))
    if args.vit_b16:
        results.append(_vit_b16_forward(args.vit_b16))
    return results


def _vit_b16_forward(count: int) -> tuple:
    """ViT-B-16 (random weights: same cost as laion2b_s34b_b88k, nothing downloaded) forward on CPU."""
    import torch

    from curate.models import encode_images, load_clip

    bundle = load_clip("ViT-B-16", "")
    pixels = torch.randn(count, 3, 224, 224)
    encode_images(bundle, pixels[:2])  # warm-up
    started = time.perf_counter()
    for start in range(0, count, 16):
        encode_images(bundle, pixels[start:start + 16])
    return (f"model forward only (ViT-B-16 224px, {torch.get_num_threads()} threads)", count,
            time.perf_counter() - started)


# ---------------------------------------------------------------- (c) decontamination search
def bench_decontamination(rows: int, evals: int) -> list[tuple]:
    """Decontamination's searches on random 512-d embeddings and random 64-bit phashes: phash by faiss'
    multi-index hashing, CLIP by the exact inner-product search in blocked torch matmuls (`_FlatIP`)."""
    from curate.decontaminate import _Finder

    rng = np.random.default_rng(3)
    train = rng.standard_normal((rows, 512), dtype=np.float32)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    eval_emb = rng.standard_normal((evals, 512), dtype=np.float32)
    eval_emb /= np.linalg.norm(eval_emb, axis=1, keepdims=True)
    train_hash = rng.integers(0, 256, (rows, 8), dtype=np.uint8)
    eval_hash = rng.integers(0, 256, (evals, 8), dtype=np.uint8)
    table = pa.table({"uid": pa.array([str(i) for i in range(rows)]), "class_name": pa.array(["c"] * rows)})
    finder = _Finder(table, np.ones(rows, dtype=bool), [str(i) for i in range(evals)], 4, 0.95)
    steps = [("eval phash (multi-index hashing)", lambda: finder.against_eval("phash", train_hash, eval_hash, np.arange(evals))),
             ("eval CLIP (exact IP, blocked torch)", lambda: finder.against_eval("clip", train, eval_emb, np.arange(evals))),
             ("in-train phash (greedy)", lambda: finder.inside_train("phash", train_hash)),
             ("in-train CLIP (greedy, exact IP)", lambda: finder.inside_train("clip", train))]
    results = []
    for what, step in steps:
        started = time.perf_counter()
        step()
        results.append((what, rows, evals, time.perf_counter() - started))
    return results


# ---------------------------------------------------------------- main
def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000, help="embedded images (throughput part)")
    parser.add_argument("--shard-rows", type=int, default=500_000, help="rows per embedding shard")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-sizes", default="1000000,4000000", help="embedding counts for the memory part ('' = skip)")
    parser.add_argument("--memory-candidates", type=int, default=200_000, help="manifest rows in the memory part")
    parser.add_argument("--images", type=int, default=384, help="images for the image path ('0' = skip)")
    parser.add_argument("--vit-b16", type=int, default=0, help="also time ViT-B-16 forward on N images (0 = skip)")
    parser.add_argument("--decon-rows", type=int, default=50_000, help="training rows for (c) (0 = skip)")
    parser.add_argument("--decon-evals", type=int, default=5_000, help="eval images for (c)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vit_b16 and not args.images:
        parser.error("--vit-b16 is timed in the image part: give --images > 0")
    if args.memory_child:
        memory_child(*args.memory_child, dim=512)
        return
    args.memory_sizes = [int(s) for s in args.memory_sizes.split(",") if s]
    import logging

    logging.basicConfig(level=logging.ERROR)
    os.environ.setdefault("TQDM_DISABLE", "1")
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        print(f"machine: {os.cpu_count()} cores (shared), python {sys.version.split()[0]}")
        print("\n(a) precomputed embeddings, median of", args.repeats)
        print(f"{'what':34s} {'embedded':>10s} {'manifest':>10s} {'seconds':>8s} {'emb rows/s':>12s} {'cand/s':>12s}")
        for what, rows, cand, seconds in bench_embeddings(args, work):
            print(f"{what:34s} {rows:10d} {cand:10d} {seconds:8.2f} {rows / seconds:12,.0f} {cand / seconds:12,.0f}")
        if args.memory_sizes:
            print("\n(a') memory of core-512, fresh process each, same manifest size")
            print(f"{'embedded':>10s} {'manifest':>10s} {'seconds':>8s} {'peak RSS MiB':>13s} {'peak anon MiB':>14s}")
            for size, cand, stats in bench_memory(args, work):
                print(f"{size:10d} {cand:10d} {stats['seconds']:8.2f} {stats['peak_rss_mib']:13.0f} {stats['peak_anon_mib']:14.0f}")
        if args.images:
            print("\n(b) image path, tiny-clip on CPU")
            print(f"{'what':64s} {'images':>7s} {'seconds':>8s} {'img/s':>8s}")
            for what, n, seconds in bench_images(args, work):
                print(f"{what:64s} {n:7d} {seconds:8.2f} {n / seconds:8.0f}")
        if args.decon_rows:
            print("\n(c) decontamination searches, random 512-d embeddings / 64-bit hashes")
            print(f"{'what':40s} {'train':>8s} {'eval':>7s} {'seconds':>8s} {'train rows/s':>13s}")
            for what, rows, evals, seconds in bench_decontamination(args.decon_rows, args.decon_evals):
                print(f"{what:40s} {rows:8d} {evals:7d} {seconds:8.2f} {rows / seconds:13,.0f}")


if __name__ == "__main__":
    main()
