"""Benchmark `curate download` against a local HTTP server (loopback: measures img2dataset's own
overhead, not the network). Usage:

    PYTHONPATH=. python scripts/bench_download.py --images 500 --processes 1 2 --threads 16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import pyarrow as pa  # noqa: E402
from helpers_http import serve_images, write_image  # noqa: E402

from curate.download import download  # noqa: E402
from manifests import read_report, uid_for_url, write_manifest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--size", type=int, nargs=2, default=[400, 300], help="served image size (w h)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "www").mkdir()
        for i in range(args.images):
            write_image(tmp / "www" / f"{i}.jpg", (i % 256, (3 * i) % 256, (7 * i) % 256), size=tuple(args.size))
        with serve_images(tmp / "www") as (base_url, _):
            urls = [f"{base_url}/{i}.jpg" for i in range(args.images)]
            table = pa.table({"uid": [uid_for_url(u) for u in urls], "label": [i % 5 for i in range(args.images)],
                              "class_name": [f"c{i % 5}" for i in range(args.images)], "source": ["retrieved"] * args.images,
                              "caption": [f"photo {i}" for i in range(args.images)], "url": urls})
            write_manifest(table, tmp / "m.parquet")
            for processes in args.processes:
                start = time.perf_counter()
                result = download(tmp / "m.parquet", tmp / f"out-{processes}", processes=processes,
                                  threads=args.threads, samples_per_shard=max(1, args.images // (2 * processes)))
                wall = time.perf_counter() - start
                t = read_report(tmp / f"out-{processes}")["throughput"]
                print(f"processes={processes} threads={args.threads}: {result.success}/{args.images} images, "
                      f"wall {wall:.1f} s = {result.success / wall:.1f} images/s end to end; img2dataset call "
                      f"{t['seconds']:.1f} s = {t['images_per_second']:.1f} images/s; download window "
                      f"{t['download_window_seconds']:.1f} s = {t['images_per_second_in_window']:.1f} images/s")


if __name__ == "__main__":
    main()
