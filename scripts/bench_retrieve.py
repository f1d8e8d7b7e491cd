#!/usr/bin/env python
"""Benchmark `curate retrieve` against a bare DuckDB scan and the obvious baselines (issue 2).

Generates LAION-schema parquet (N rows, captions of realistic length, class names planted in ~0.2 % of
rows) and a 200-class task, then times, alternating within one run:
  (a) curate retrieve (the in-process stage function the CLI calls),
  (b) a bare DuckDB scan of the caption column: SELECT sum(length(TEXT)),
  (c) the obvious pandas baseline: load, lower, str.contains per class,
  (d) DuckDB with one contains() per class OR-ed together,
  (e) for reference, a bare DuckDB scan of every column retrieve reads (caption, url, carried metadata).
Prints medians, the ratios a/b (also the median of each repeat's own a/b), a/e, c/a, d/a, the CPU seconds of (a) and (b), and peak RSS of a
retrieve run at two sizes.

    python scripts/bench_retrieve.py --rows 10000000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curate.retrieve import retrieve  # noqa: E402
from curate.sample_metadata import write_laion_sample  # noqa: E402
from curate.tasks import load_task  # noqa: E402


def class_names(count: int) -> list[str]:
    """Real-looking fine-grained names: builtin aircraft, cars, flowers, pets (first `count`)."""
    names: list[str] = []
    for task in ("fgvc-aircraft", "stanford-cars", "flowers102", "oxford-pets"):
        names += load_task(task).class_names
    unique = list(dict.fromkeys(names))
    return unique[:count]


def make_data(data_dir: Path, rows: int, names: list[str], files: int) -> tuple[str, Path]:
    folder = data_dir / (f"laion-{rows}" if (files, len(names)) == (4, 200) else f"laion-{rows}-{files}files-{len(names)}classes")
    if not (folder / "done").exists():
        shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        write_laion_sample(folder, rows, names, plant_rate=0.002, files=files, seed=0)
        (folder / "done").write_text("ok")
        print(f"generated {rows:,} rows in {time.perf_counter() - started:.1f} s", flush=True)
    task = data_dir / f"task-{len(names)}.txt"
    task.write_text("\n".join(names) + "\n", encoding="utf-8")
    return str(folder / "*.parquet"), task


def time_retrieve(glob: str, task: Path, out: Path) -> float:
    started = time.perf_counter()
    retrieve(task=task, metadata=[glob], out=out, overwrite=True)
    return time.perf_counter() - started


def time_bare_scan(glob: str) -> float:
    started = time.perf_counter()
    with duckdb.connect() as con:
        con.sql("SELECT sum(length(TEXT)) FROM read_parquet($g)", params={"g": glob}).fetchall()
    return time.perf_counter() - started


def time_bare_scan_all_columns(glob: str) -> float:
    """(e) for reference: a bare scan of every column retrieve reads (caption, url and carried metadata)."""
    started = time.perf_counter()
    with duckdb.connect() as con:
        con.sql("SELECT sum(length(TEXT)), sum(length(URL)), sum(WIDTH), sum(HEIGHT), sum(similarity), sum(hash), "
                "sum(punsafe), sum(pwatermark) FROM read_parquet($g)", params={"g": glob}).fetchall()
    return time.perf_counter() - started


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_with_cpu(run, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call."""
    cpu = cpu_seconds()
    wall = run(*args)
    return wall, cpu_seconds() - cpu


def time_pandas(glob: str, names: list[str]) -> float:
    import pandas as pd

    started = time.perf_counter()
    hits = 0
    for path in sorted(Path().glob(glob) if not glob.startswith("/") else Path("/").glob(glob[1:])):
        frame = pd.read_parquet(path, columns=["URL", "TEXT"])
        lowered = frame["TEXT"].str.lower()
        for name in names:
            hits += int(lowered.str.contains(name.lower(), regex=False).sum())
    return time.perf_counter() - started


def time_duckdb_contains(glob: str, names: list[str]) -> float:
    condition = " OR ".join(["contains(lower(TEXT), ?)"] * len(names))
    started = time.perf_counter()
    with duckdb.connect() as con:
        con.execute(f"SELECT count(*) FROM read_parquet(?) WHERE {condition}", [glob, *[n.lower() for n in names]]).fetchall()
    return time.perf_counter() - started


def peak_rss_mb(glob: str, task: Path, out: Path) -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child would report this process's peak
    code = (
        "import re, sys; sys.path.insert(0, %r)\n"
        "from curate.retrieve import retrieve\n"
        "retrieve(task=%r, metadata=[%r], out=%r, overwrite=True)\n"
        "status = open('/proc/self/status').read()\n"
        "print(int(re.search(r'VmHWM:\\s+(\\d+)', status).group(1)) / 1024)\n"
    ) % (str(ROOT), str(task), glob, str(out))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--rss-rows", type=int, default=None, help="Smaller size for the RSS comparison (default rows/5).")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="Alternating repeats of (a) and (b).")
    parser.add_argument("--baseline-repeats", type=int, default=1, help="Repeats of the slow baselines (c), (d).")
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "bench-data")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = parser.parse_args()
    if args.baseline_repeats > args.repeats:
        parser.error("--baseline-repeats runs inside the --repeats loop: it can be at most --repeats")

    names = class_names(args.classes)
    glob, task = make_data(args.data_dir, args.rows, names, args.files)
    out = Path(tempfile.mkdtemp()) / "retrieved"
    times: dict[str, list[float]] = {"a_retrieve": [], "b_bare_scan": [], "c_pandas": [], "d_duckdb_contains": [],
                                     "e_bare_scan_all_columns": []}
    cpu: dict[str, list[float]] = {"a_retrieve": [], "b_bare_scan": []}
    time_retrieve(glob, task, out)  # warm the page cache and imports
    for repeat in range(args.repeats):
        for key, (wall, cpu_s) in (("a_retrieve", timed_with_cpu(time_retrieve, glob, task, out)),
                                   ("b_bare_scan", timed_with_cpu(time_bare_scan, glob))):
            times[key].append(wall)
            cpu[key].append(cpu_s)
        times["e_bare_scan_all_columns"].append(time_bare_scan_all_columns(glob))
        if not args.skip_baselines and repeat < args.baseline_repeats:
            times["c_pandas"].append(time_pandas(glob, names))
            times["d_duckdb_contains"].append(time_duckdb_contains(glob, names))
        print(f"repeat {repeat + 1}: " + ", ".join(f"{k}={v[-1]:.2f}s" for k, v in times.items() if len(v) > repeat), flush=True)
    medians = {k: statistics.median(v) for k, v in times.items() if v}
    report = json.loads((out / "report.json").read_text())
    small_rows = args.rss_rows or args.rows // 5
    small_glob, _ = make_data(args.data_dir, small_rows, names, args.files)
    results = {
        "rows": args.rows,
        "classes": len(names),
        "kept": report["funnel"]["kept"],
        "engine": report["settings"]["engine"],
        "medians_s": {k: round(v, 3) for k, v in medians.items()},
        "ratio_a_over_b": round(medians["a_retrieve"] / medians["b_bare_scan"], 2),
        # each (a) next to the (b) run right after it: steadier than the ratio of medians on a noisy machine
        "ratio_a_over_b_paired_median": round(statistics.median(
            a / b for a, b in zip(times["a_retrieve"], times["b_bare_scan"], strict=True)), 2),
        "ratio_a_over_e": round(medians["a_retrieve"] / medians["e_bare_scan_all_columns"], 2),
        "median_cpu_s": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
        "retrieve_rows_per_s": round(args.rows / medians["a_retrieve"]),
        "peak_rss_mb": {small_rows: round(peak_rss_mb(small_glob, task, out), 1), args.rows: round(peak_rss_mb(glob, task, out), 1)},
    }
    if "c_pandas" in medians:
        results["ratio_c_over_a"] = round(medians["c_pandas"] / medians["a_retrieve"], 1)
        results["ratio_d_over_a"] = round(medians["d_duckdb_contains"] / medians["a_retrieve"], 1)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
