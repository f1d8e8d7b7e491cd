"""Reading LAION/DataComp-style parquet metadata: input files, column detection, streaming batches."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import itertools
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import CurateError, first_line

T = TypeVar("T")

# manifest column -> source column names, in order of preference (LAION first, then DataComp)
URL_COLUMNS = ("URL", "url")
CAPTION_COLUMNS = ("TEXT", "text", "caption", "CAPTION")
CARRIED_COLUMNS: dict[str, tuple[str, ...]] = {
    "width": ("WIDTH", "original_width", "width"),
    "height": ("HEIGHT", "original_height", "height"),
    "laion_similarity": ("similarity",),
    "punsafe": ("punsafe",),
    "pwatermark": ("pwatermark",),
    "hash": ("hash",),
    "source_uid": ("uid",),
}


@dataclasses.dataclass(frozen=True)
class MetadataFile:
    path: str
    num_rows: int
    columns: dict[str, str]  # manifest name -> column in the file (url, caption and carried ones)
    row_group_ends: tuple[int, ...]  # file row number one past each row group


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Files named by paths, folders (every *.parquet below) and globs; sorted by path, each once."""
    files: set[str] = set()
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            matched = [str(p) for p in path.rglob("*.parquet")]
            if not matched:
                raise CurateError(f"folder {pattern} holds no .parquet files")
        elif path.is_file():
            matched = [str(path)]
        else:
            matched = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
            if not matched:
                raise CurateError(f"no file matches '{pattern}'")
        files.update(os.path.abspath(p) for p in matched)
    return sorted(files)


def inspect_file(path: str, url_col: str | None = None, caption_col: str | None = None) -> MetadataFile:
    """Read a parquet footer and map its columns to manifest columns; one clear error if it can't."""
    try:
        meta = pq.read_metadata(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CurateError(f"{path} is not a readable parquet file: {first_line(exc)}") from None
    names = list(meta.schema.to_arrow_schema().names)
    columns = {
        "url": _pick(names, url_col, URL_COLUMNS, "URL", path, "--url-col"),
        "caption": _pick(names, caption_col, CAPTION_COLUMNS, "caption", path, "--caption-col"),
    }
    for target, candidates in CARRIED_COLUMNS.items():
        found = _find(names, candidates)
        if found and found not in columns.values():
            columns[target] = found
    ends = itertools.accumulate(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return MetadataFile(path=path, num_rows=meta.num_rows, columns=columns, row_group_ends=tuple(ends))


def _pick(names: list[str], given: str | None, candidates: tuple[str, ...], what: str, path: str, option: str) -> str:
    if given is not None:
        if given not in names:
            raise CurateError(f"{path} has no column '{given}' (columns: {', '.join(names)})")
        return given
    found = _find(names, candidates)
    if found is None:
        raise CurateError(f"{path} has no {what} column (looked for {', '.join(candidates)}); name it with {option}")
    return found


def _find(names: list[str], candidates: tuple[str, ...]) -> str | None:
    for candidate in candidates:
        if candidate in names:
            return candidate
    lowered = {name.lower(): name for name in names}
    for candidate in candidates:
        if candidate.lower() in lowered:
            return lowered[candidate.lower()]
    return None


def prefetch(iterable: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate `iterable` in a background thread, `depth` items ahead (overlaps I/O with matching)."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterable:
                if stop.is_set():
                    return
                items.put(item)
        except BaseException as exc:  # handed to the consumer, raised there
            items.put(_Raised(exc))
        items.put(done)

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                items.get(timeout=0.05)


@dataclasses.dataclass
class _Raised:
    exc: BaseException


def quote_identifier(name: str) -> str:
    """A SQL identifier for a column name taken from a file: always quoted, quotes doubled."""
    return '"' + name.replace('"', '""') + '"'


def stream_captions(con, source: MetadataFile, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Stream the caption column of every row, in file order: the i-th caption seen is file row i.

    No filter and no row-number column, so this costs little more than DuckDB's bare scan;
    NULL and empty captions come through (they can match no class) and are counted by the caller.
    A caption that is not valid UTF-8 comes through with '?' for its bad bytes: one such row must not
    stop a scan of billions (URLs, read in pass 2, stay strict: a mangled URL is worse than an error).
    """
    caption = quote_identifier(source.columns["caption"])
    query = f"SELECT {caption} AS caption FROM read_parquet($path, utf8_validation = 'replace')"
    yield from _run(con, query, {"path": source.path}, lambda relation: relation.to_arrow_reader(batch_rows))


def fetch_rows(con, source: MetadataFile, rows: Sequence[int]) -> pa.Table:
    """The url and carried columns of the given file rows (ascending row numbers), as a table with `row`.

    DuckDB pushes the semi join into the parquet scan as a filter on the row number: only the wanted rows
    leave the scan, and row groups holding none of them are skipped."""
    select = ", ".join(f"{quote_identifier(col)} AS {quote_identifier(name)}" for name, col in source.columns.items() if name != "caption")
    wanted = pa.table({"n": pa.array(rows, pa.int64())})
    query = (
        f"SELECT file_row_number AS row, {select} FROM read_parquet($path, file_row_number=true) "
        "WHERE file_row_number IN (SELECT n FROM wanted) "
        "ORDER BY file_row_number"
    )
    con.register("wanted", wanted)
    try:
        return _run(con, query, {"path": source.path}, lambda relation: relation.to_arrow_table())
    finally:
        con.unregister("wanted")


def _run(con, query: str, params: dict, fetch):
    import duckdb

    try:
        result = fetch(con.sql(query, params=params))
        if isinstance(result, pa.Table):
            return result
        return _guarded(result, params["path"])
    except duckdb.Error as exc:
        raise CurateError(f"cannot read {params['path']}: {first_line(exc)}") from None


def _guarded(reader, path: str) -> Iterator[pa.RecordBatch]:
    import duckdb

    try:
        yield from reader
    except (duckdb.Error, pa.ArrowException) as exc:
        raise CurateError(f"cannot read {path}: {first_line(exc)}") from None
