"""`curate download`: fetch the images of a manifest with img2dataset, resumably (DESIGN §1, §4, §5).

The output folder OUT holds:
  OUT/download_state.json          what is being downloaded (a fingerprint of the rows and options)
  OUT/img2dataset_input.parquet    url, caption, uid in manifest order (removed once finished)
  OUT/images/ or OUT/shards/       img2dataset's own output (files or webdataset format): per shard
                                   `{shard}.parquet` (status per row), the images, and `{shard}_stats.json`,
                                   written last, which marks the shard done
  OUT/failed.parquet               the rows whose image did not arrive, with img2dataset's error message
  OUT/report.json                  counts, top errors, per-class counts, timing, img2dataset options
  OUT/manifest.parquet             written last: one row per image that arrived; its presence marks OUT finished
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.choices import DATA_FOLDERS, ENCODE_FORMATS, RESIZE_MODES
from curate.errors import CurateError
from manifests.export import IMG2DATASET_FILE
from manifests.io import (
    MANIFEST_NAME,
    atomic_write,
    folder_lock,
    input_task,
    make_folder,
    read_manifest,
    read_saved,
    refuse_inputs_inside,
    remove_output,
    write_json,
    write_manifest,
    write_report,
)
from manifests.schema import IMAGE_COLUMNS

log = logging.getLogger(__name__)

STATE_NAME = "download_state.json"
FAILED_NAME = "failed.parquet"
NOT_WEB_URL = "not an http(s) url"
_RESULT_COLUMNS = ["uid", "key", "status", "error_message", "width", "height", "sha256"]
_ROW = "__row"
# img2dataset's encode_quality: a quality for jpg and webp, but a compression level (0-9) for png, where its default
# of 95 is refused
ENCODE_QUALITY = {"jpg": 95, "webp": 95, "png": 6}
_PARAMETER = {"processes_count": "processes", "thread_count": "threads",  # img2dataset name -> ours
              "number_sample_per_shard": "samples_per_shard"}


@dataclasses.dataclass(frozen=True)
class DownloadResult:
    """What `download` did; `summary()` is the CLI's one line."""

    out: Path
    input_rows: int
    success: int
    failed: int
    seconds: float
    shards_total: int
    shards_skipped: int

    def summary(self) -> str:
        resumed = f", {self.shards_skipped} of {self.shards_total} shards already done" if self.shards_skipped else ""
        failed = f" (failed list: {self.out / FAILED_NAME})" if self.failed else ""
        return (
            f"downloaded {self.success} of {self.input_rows} images to {self.out}: "
            f"{self.success} success, {self.failed} failed{failed}{resumed}; {self.seconds:.1f} s"
        )


def download(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    *,
    processes: int = 1,
    threads: int = 16,
    image_size: int = 256,
    resize_mode: str = "border",
    encode_format: str = "jpg",
    output_format: str = "files",
    samples_per_shard: int = 10_000,
    timeout: int = 10,
    retries: int = 0,
    overwrite: bool = False,
    resume: bool = True,
) -> DownloadResult:
    """Download the images of a manifest with a `url` column (img2dataset, called as a library).

    Args: `manifest` (parquet or its folder), `out` (output folder); `processes` x `threads`
    download workers; `image_size`, `resize_mode`, `encode_format`: how images are resized and
    stored; `output_format`: 'files' (OUT/images/<shard>/<key>.jpg) or 'webdataset'
    (OUT/shards/<shard>.tar); `samples_per_shard`; per-URL `timeout` (s) and `retries`.

    Resuming: image data is written in place under OUT, shard by shard; a shard is done once its
    `{shard}_stats.json` exists. OUT/manifest.parquet is written last and marks OUT finished. So:
    an OUT holding a finished manifest is refused unless `overwrite`; an OUT without one is an
    interrupted run and re-running the same command resumes it (`resume=True`), fetching only the
    unfinished shards; the rows and the shard-shaping options (image size, resize mode, encode and
    output format, samples per shard) must be the same, else it is refused (use `overwrite`).
    `overwrite` deletes OUT first. Rows without an http(s) URL are not sent; they are listed as failed.

    Returns a DownloadResult. The output manifest has one row per image that arrived, in input
    order, every input column plus `image_path` (files) or `shard` + `key` (webdataset, paths
    relative to OUT), `sha256` (of the downloaded bytes), `image_width`/`image_height` (as saved).

    img2dataset starts worker processes with 'spawn': a script calling this must do so under
    `if __name__ == "__main__":`. Ctrl-C raises KeyboardInterrupt (img2dataset would exit 0).
    """
    start = time.perf_counter()
    options = _img2dataset_options({
        "processes_count": processes, "thread_count": threads, "image_size": image_size,
        "resize_mode": resize_mode, "encode_format": encode_format, "output_format": output_format,
        "number_sample_per_shard": samples_per_shard, "timeout": timeout, "retries": retries,
    })
    table = _read_input(Path(manifest))
    unsent = _unsent_reason(table)
    sendable = table.filter(pc.is_null(unsent))
    out = Path(out)
    _check_no_glob(out)
    with contextlib.ExitStack() as held:  # OUT stays locked until the download ends: a second run into it is refused
        resumed = _prepare_out(out, _fingerprint(sendable, options), overwrite=overwrite, resume=resume,
                               source=manifest, held=held)
        data_dir = out / DATA_FOLDERS[output_format]
        shard_names = [f"{i:05d}" for i in range(math.ceil(sendable.num_rows / samples_per_shard))]
        done_before = _finished_shards(data_dir, shard_names)
        timing = {"seconds": 0.0}
        if len(done_before) < len(shard_names):
            _remove_partial_shards(data_dir, shard_names, done_before)
            _write_parquet(sendable.select(["url", "caption", "uid"]), out / IMG2DATASET_FILE)
            timing = _run_img2dataset(out / IMG2DATASET_FILE, data_dir, options)
        results = _collect_results(data_dir, shard_names, sendable.num_rows)
        downloaded, failed = _split_results(table, unsent, results, output_format, encode_format)
        report = _report(table, unsent, downloaded, failed, results, manifest, options, resumed)
        report["shards"] = {
            "total": len(shard_names), "skipped": len(done_before), "samples_per_shard": samples_per_shard,
        }
        report["throughput"] = _throughput(data_dir, [s for s in shard_names if s not in done_before], timing)
        report["seconds"] = round(time.perf_counter() - start, 3)
        _finish(out, downloaded, failed, report)
        return DownloadResult(
            out, table.num_rows, downloaded.num_rows, failed.num_rows, report["seconds"], len(shard_names), len(done_before)
        )


def _img2dataset_options(chosen: dict[str, Any]) -> dict[str, Any]:
    """Check the user's options (img2dataset names) and add the fixed ones curate relies on."""
    minimum = {"processes_count": 1, "thread_count": 1, "image_size": 1, "number_sample_per_shard": 1,
               "timeout": 1, "retries": 0}
    bad = [_PARAMETER.get(name, name) for name, low in minimum.items() if chosen[name] < low]
    if bad:
        raise CurateError(f"download option(s) out of range: {', '.join(bad)}")
    for name, choices in (("resize_mode", RESIZE_MODES), ("encode_format", ENCODE_FORMATS),
                          ("output_format", tuple(DATA_FOLDERS))):
        if chosen[name] not in choices:
            raise CurateError(f"unknown {name.replace('_', ' ')} '{chosen[name]}'; choose one of {', '.join(choices)}")
    return {
        **chosen, "input_format": "parquet", "url_col": "url", "caption_col": "caption",
        "encode_quality": ENCODE_QUALITY[chosen["encode_format"]],
        "save_additional_columns": ["uid"], "extract_exif": False, "compute_hash": "sha256",
        "enable_wandb": False, "incremental_mode": "incremental", "distributor": "multiprocessing",
    }


def _read_input(manifest: Path) -> pa.Table:
    table = read_manifest(manifest)
    if "url" not in table.column_names:
        raise CurateError(
            f"manifest {manifest} has no 'url' column: download needs a retrieved manifest (curate retrieve)"
        )
    if pc.count_distinct(table.column("uid")).as_py() != table.num_rows:
        raise CurateError(f"manifest {manifest} has duplicate uids; uid is the join key of the download")
    if _ROW in table.column_names:
        raise CurateError(f"manifest {manifest} has a column named '{_ROW}', which download uses for itself; rename it")
    carried = [c for c in table.column_names if c not in IMAGE_COLUMNS]  # replaced by this download
    table = table.select(carried)
    return table.append_column(_ROW, pa.array(range(table.num_rows), pa.int64()))


def _unsent_reason(table: pa.Table) -> pa.ChunkedArray:
    """Per row, why its URL is not sent to img2dataset (null: it is sent). img2dataset opens URLs with urllib,
    which would also read file: (local files) and data: URLs; only the web's are fetched."""
    url = pc.utf8_trim_whitespace(table.column("url"))
    missing = pc.fill_null(pc.equal(url, ""), True)
    web = pc.fill_null(pc.match_substring_regex(url, "^https?://", ignore_case=True), False)
    return pc.if_else(missing, "missing url", pc.if_else(web, pa.scalar(None, pa.string()), NOT_WEB_URL))


def _fingerprint(sendable: pa.Table, options: dict[str, Any]) -> str:
    """Hash of what shapes the shards: the rows (uid, url, in order) and the image options."""
    digest = hashlib.sha256()
    shaping = ("image_size", "resize_mode", "encode_format", "output_format", "number_sample_per_shard")
    digest.update(repr([(k, options[k]) for k in shaping]).encode())
    for batch in sendable.select(["uid", "url"]).to_batches(max_chunksize=65_536):
        for uid, url in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            digest.update(f"{uid}\t{url}\n".encode())
    return digest.hexdigest()


def _prepare_out(out: Path, fingerprint: str, overwrite: bool, resume: bool, source: str | os.PathLike,
                 held: contextlib.ExitStack) -> bool:
    """Create, clear or accept OUT for resuming (see `download`), and lock it in `held`; returns True when resuming."""
    if out.exists() and not out.is_dir():
        raise CurateError(f"output path {out} exists and is not a folder")
    if out.exists():
        refuse_inputs_inside(out, [source])
        _lock(out, held)
        if overwrite:
            remove_output(out)
    if not out.exists() or overwrite:  # the folder written from here on is the one locked (another run may make it)
        make_folder(out)
        _lock(out, held)
    if any(out.iterdir()):
        _check_resumable(out, fingerprint, resume)
        log.info("resuming the interrupted download in %s", out)
        return True
    write_json({"stage": "download", "fingerprint": fingerprint}, out / STATE_NAME)
    return False


def _lock(out: Path, held: contextlib.ExitStack) -> None:
    try:
        held.enter_context(folder_lock(out))
    except BlockingIOError:
        raise CurateError(f"another curate download is writing to {out}: wait for it to end, or choose another --out") from None
    except OSError as exc:
        raise CurateError(f"cannot open output folder {out}: {exc.strerror or exc}") from None


def _check_no_glob(out: Path) -> None:
    """img2dataset finds the finished shards with a glob of its output folder: glob characters in the path would
    match other folders, and their shards would be taken for this run's."""
    path = os.path.abspath(out)
    if any(char in path for char in "*?["):
        raise CurateError(f"output path {path} holds a glob character (* ? [), which img2dataset would take for a "
                          "pattern; choose another --out")


def _check_resumable(out: Path, fingerprint: str, resume: bool) -> None:
    if (out / MANIFEST_NAME).exists():
        raise CurateError(f"output directory {out} already holds a finished download (use --overwrite to replace it)")
    state = read_saved(out / STATE_NAME)
    if state is None:
        raise CurateError(f"output directory {out} already exists and is not a download folder (use --overwrite)")
    if not resume:
        raise CurateError(f"output directory {out} holds an interrupted download (resume it, or use --overwrite)")
    if state.get("fingerprint") != fingerprint:
        raise CurateError(
            f"output directory {out} holds an interrupted download of other rows or image options (use --overwrite)"
        )


def _finished_shards(data_dir: Path, shard_names: list[str]) -> set[str]:
    return {name for name in shard_names if (data_dir / f"{name}_stats.json").exists()}


def _remove_partial_shards(data_dir: Path, shard_names: list[str], done: set[str]) -> None:
    """Delete what an interrupted run left of unfinished shards (img2dataset writes them again)."""
    for name in shard_names:
        if name in done:
            continue
        for leftover in (data_dir / name, data_dir / f"{name}.parquet", data_dir / f"{name}.tar"):
            if leftover.is_dir():
                shutil.rmtree(leftover)
            elif leftover.exists():
                leftover.unlink()


def _run_img2dataset(input_path: Path, data_dir: Path, options: dict[str, Any]) -> dict[str, float]:
    """Call img2dataset's `download`; its prints go to stderr, its SIGINT handler is undone after."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would query PyPI on import
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # img2dataset imports imghdr
        from img2dataset import download as img2dataset_download

    log.info(
        "img2dataset: %d process(es) x %d threads into %s", options["processes_count"], options["thread_count"], data_dir
    )
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    start = time.perf_counter()
    try:
        with _stdout_to_stderr():
            img2dataset_download(url_list=str(input_path), output_folder=str(data_dir), **options)
    except SystemExit as exit_:  # img2dataset's SIGINT handler calls sys.exit(0): an interruption, not success
        if exit_.code in (0, None):
            raise KeyboardInterrupt from None
        raise  # our SIGTERM's (console.stop_cleanly_on_sigterm) keeps its status
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
        shutil.rmtree(data_dir / "_tmp", ignore_errors=True)  # img2dataset's copy of the input shards (SIGTERM skips its clean-up)
    return {"seconds": time.perf_counter() - start}


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send what is printed to stderr, the file descriptor too: img2dataset's worker processes print their
    statistics there, and stdout is for the command's own summary."""
    if sys.stdout is not None:
        sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout at all (run with 1>&-): the workers get stderr, and it is closed again after
        saved = None
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is None:
            os.close(1)
        else:
            os.dup2(saved, 1)
            os.close(saved)


def _collect_results(data_dir: Path, shard_names: list[str], expected_rows: int) -> pa.Table:
    """All shards' per-row status tables, with the shard name; CurateError if a shard did not finish."""
    missing = sorted(set(shard_names) - _finished_shards(data_dir, shard_names))
    if missing:
        raise CurateError(
            f"{len(missing)} of {len(shard_names)} shard(s) did not finish (first: {missing[0]}); "
            "re-run the same command to resume"
        )
    tables = []
    for name in shard_names:
        try:
            part = pq.read_table(data_dir / f"{name}.parquet", columns=_RESULT_COLUMNS)
        except (OSError, pa.ArrowException) as exc:  # e.g. a shard marked done whose results are gone
            raise CurateError(f"img2dataset output in {data_dir} is damaged: shard {name}'s results cannot be read "
                              f"({exc}); use --overwrite") from None
        tables.append(part.append_column("shard_name", pa.array([name] * part.num_rows, pa.string())))
    schema = pa.schema([
        ("uid", pa.string()), ("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
        ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()), ("shard_name", pa.string()),
    ])
    results = pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()
    if results.num_rows != expected_rows:
        raise CurateError(
            f"img2dataset output in {data_dir} has {results.num_rows} rows for {expected_rows} inputs; use --overwrite"
        )
    return results


def _split_results(
    table: pa.Table, unsent: pa.ChunkedArray, results: pa.Table, output_format: str, encode_format: str
) -> tuple[pa.Table, pa.Table]:
    """(the output manifest rows that arrived, the failed rows), both in input order."""
    joined = results.join(table.select(["uid", _ROW]), keys="uid", join_type="inner").sort_by(_ROW)
    if joined.num_rows != results.num_rows:
        raise CurateError("img2dataset output does not match the manifest's uids; use --overwrite")
    ok = pc.equal(joined.column("status"), "success")
    arrived = joined.filter(ok)
    downloaded = table.take(arrived.column(_ROW))
    for name, column in _location_columns(arrived, output_format, encode_format).items():
        downloaded = downloaded.append_column(name, column)
    downloaded = downloaded.append_column("sha256", arrived.column("sha256"))
    downloaded = downloaded.append_column("image_width", arrived.column("width"))
    downloaded = downloaded.append_column("image_height", arrived.column("height"))
    failed = _failed_rows(table, unsent, joined.filter(pc.invert(ok)))
    return downloaded.drop_columns([_ROW]), failed


def _location_columns(arrived: pa.Table, output_format: str, encode_format: str) -> dict[str, pa.ChunkedArray]:
    folder = DATA_FOLDERS[output_format]
    shard, key = arrived.column("shard_name"), arrived.column("key")
    if output_format == "webdataset":
        return {"shard": pc.binary_join_element_wise(f"{folder}/", shard, ".tar", ""), "key": key}
    return {"image_path": pc.binary_join_element_wise(f"{folder}/", shard, "/", key, f".{encode_format}", "")}


def _failed_rows(table: pa.Table, unsent: pa.ChunkedArray, failed_results: pa.Table) -> pa.Table:
    """uid, url, label, class_name, status, error_message of every row without an image, in input order
    (`unsent`: `_unsent_reason` of the table's rows)."""
    columns = ["uid", "url", "label", "class_name", _ROW]
    attempted = table.take(failed_results.column(_ROW)).select(columns)
    attempted = attempted.append_column("status", failed_results.column("status"))
    attempted = attempted.append_column("error_message", failed_results.column("error_message"))
    skipped = table.filter(pc.is_valid(unsent)).select(columns)
    skipped = skipped.append_column("status", pa.array(["skipped"] * skipped.num_rows, pa.string()))
    skipped = skipped.append_column("error_message", unsent.filter(pc.is_valid(unsent)))
    return pa.concat_tables([attempted, skipped]).sort_by(_ROW).drop_columns([_ROW])


def _report(table, unsent, downloaded, failed, results, manifest, options, resumed) -> dict[str, Any]:
    status = pc.value_counts(results.column("status")).to_pylist() if results.num_rows else []
    by_status = {item["values"]: item["counts"] for item in status}
    errors = pc.value_counts(failed.column("error_message").fill_null("unknown")).to_pylist() if failed.num_rows else []
    errors.sort(key=lambda item: (-item["counts"], item["values"]))
    return {
        "stage": "download",
        "task": input_task(manifest),
        "manifest": str(manifest),
        "resumed": resumed,
        "counts": {
            "input_rows": table.num_rows,
            "missing_url": _count(unsent, "missing url"),
            "not_web_url": _count(unsent, NOT_WEB_URL),
            "attempted": results.num_rows,
            "success": downloaded.num_rows,
            "failed": failed.num_rows,
            "failed_to_download": by_status.get("failed_to_download", 0),
            "failed_to_resize": by_status.get("failed_to_resize", 0),
        },
        "top_errors": [{"error": item["values"], "count": item["counts"]} for item in errors[:20]],
        "per_class": _per_class(table, downloaded),
        "img2dataset": dict(options),
    }


def _count(values: pa.ChunkedArray, value: str) -> int:
    return pc.sum(pc.equal(values, value), min_count=0).as_py()


def _per_class(table: pa.Table, downloaded: pa.Table) -> list[dict[str, Any]]:
    def counts(t: pa.Table) -> dict[tuple[int, str], int]:
        grouped = t.group_by(["label", "class_name"]).aggregate([("uid", "count")]).to_pylist()
        return {(row["label"], row["class_name"]): row["uid_count"] for row in grouped}

    wanted, arrived = counts(table), counts(downloaded)
    return [
        {"label": label, "class_name": name, "input": n, "success": arrived.get((label, name), 0)}
        for (label, name), n in sorted(wanted.items())
    ]


def _throughput(data_dir: Path, fetched_shards: list[str], timing: dict[str, float]) -> dict[str, Any]:
    """URLs and images fetched by this run, per second of the img2dataset call and of its download window."""
    stats = [json.loads((data_dir / f"{name}_stats.json").read_text()) for name in fetched_shards]
    urls, images = sum(s["count"] for s in stats), sum(s["successes"] for s in stats)
    window = max((s["end_time"] for s in stats), default=0.0) - min((s["start_time"] for s in stats), default=0.0)
    seconds = timing["seconds"]
    return {
        "urls": urls,
        "images": images,
        "seconds": round(seconds, 3),
        "urls_per_second": round(urls / seconds, 2) if seconds else None,
        "images_per_second": round(images / seconds, 2) if seconds else None,
        "download_window_seconds": round(window, 3),
        "images_per_second_in_window": round(images / window, 2) if window > 0 else None,
    }


def _finish(out: Path, downloaded: pa.Table, failed: pa.Table, report: dict[str, Any]) -> None:
    """failed.parquet and report.json, then manifest.parquet last (the finished marker)."""
    _write_parquet(failed, out / FAILED_NAME)
    images = DATA_FOLDERS[report["img2dataset"]["output_format"]]
    report["files"] = {"manifest": MANIFEST_NAME, "failed": FAILED_NAME, "images": images}
    write_report(out, report)
    write_manifest(downloaded, out / MANIFEST_NAME)
    with contextlib.suppress(FileNotFoundError):
        (out / IMG2DATASET_FILE).unlink()


def _write_parquet(table: pa.Table, path: Path) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
