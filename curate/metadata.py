"""Reading LAION/DataComp-style parquet metadata: input files, column detection, streaming batches."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import itertools
import logging
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import CurateError, first_line
from manifests import COLUMNS

log = logging.getLogger(__name__)

T = TypeVar("T")

# manifest column -> source column names, in order of preference (LAION first, then DataComp)
URL_COLUMNS = ("URL", "url")
CAPTION_COLUMNS = ("TEXT", "text", "caption", "CAPTION")
CARRIED_COLUMNS: dict[str, tuple[str, ...]] = {
    "width": ("WIDTH", "original_width", "width"),
    "height": ("HEIGHT", "original_height", "height"),
    "laion_similarity": ("similarity", "laion_similarity"),  # the latter: a manifest given as metadata again
    "punsafe": ("punsafe",),
    "pwatermark": ("pwatermark",),
    "hash": ("hash",),
    "source_uid": ("uid",),
}
ROW_NUMBER = "file_row_number"  # read_parquet's row-number column
# manifest type -> the DuckDB type a carried column of another type is cast to (TRY_CAST: NULL where it can't)
_SQL_TYPES = {pa.int32(): "INTEGER", pa.int64(): "BIGINT", pa.float32(): "FLOAT", pa.float64(): "DOUBLE", pa.string(): "VARCHAR"}


@dataclasses.dataclass(frozen=True)
class MetadataFile:
    path: str
    num_rows: int
    columns: dict[str, str]  # manifest name -> column in the file (url, caption and carried ones)
    row_group_ends: tuple[int, ...]  # file row number one past each row group
    # manifest name -> 1-based position of its column: queries select by position, because DuckDB renames
    # columns whose names differ only in case ('url' and 'URL' in one file read as 'url' and 'URL_1')
    positions: dict[str, int]
    casts: dict[str, str] = dataclasses.field(default_factory=dict)  # carried column -> SQL type it is cast to
    binary_text: bool = False  # url or caption stored as bytes without the UTF-8 annotation: read as text
    left_out: dict[str, str] = dataclasses.field(default_factory=dict)  # carried column not carried -> why


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Files named by paths, folders (every *.parquet file below) and globs; sorted by path, each file once
    (the first path to it, where links or overlapping patterns name it twice)."""
    files: dict[str, str] = {}  # real path -> path
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():  # Spark writes folders named *.parquet, holding the part files
            matched = [str(p) for p in path.rglob("*.parquet") if p.is_file()]
            if not matched:
                raise CurateError(f"folder {pattern} holds no .parquet files")
        elif path.is_file():
            matched = [str(path)]
        else:
            matched = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
            if not matched:
                raise CurateError(f"no file matches '{pattern}'")
        for found in sorted(os.path.abspath(p) for p in matched):
            files.setdefault(os.path.realpath(found), found)
    return sorted(files.values())


def inspect_file(path: str, url_col: str | None = None, caption_col: str | None = None) -> MetadataFile:
    """Read a parquet footer and map its columns to manifest columns; one clear error if it can't."""
    try:
        meta = pq.read_metadata(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CurateError(f"{path} is not a readable parquet file: {first_line(exc)}") from None
    schema = meta.schema.to_arrow_schema()
    if ROW_NUMBER.casefold() in (name.casefold() for name in schema.names):
        raise CurateError(f"{path} has a column named '{ROW_NUMBER}', a name DuckDB's parquet reader keeps for the row "
                          "number that pass 2 selects rows by; rename that column")
    columns = {
        "url": _pick(schema.names, url_col, URL_COLUMNS, "URL", path, "--url-col"),
        "caption": _pick(schema.names, caption_col, CAPTION_COLUMNS, "caption", path, "--caption-col"),
    }
    positions = {name: _position(schema, column, path) for name, column in columns.items()}
    # every one checked (no short-circuit): a caption holding numbers beside a url stored as bytes is an error too
    binary_text = any([_is_bytes(_value_type(schema, positions[name]), path, columns[name], name) for name in columns])
    casts, left_out = _add_carried(schema, path, columns, positions)
    ends = itertools.accumulate(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return MetadataFile(path, meta.num_rows, columns, tuple(ends), positions, casts, binary_text, left_out)


def _add_carried(schema: pa.Schema, path: str, columns: dict[str, str], positions: dict[str, int]) -> tuple[dict, dict]:
    """Add the carried columns the file has to `columns` and `positions`; return the casts they need and
    the columns left out (a number column holding text), with why."""
    casts, left_out = {}, {}
    for target, candidates in CARRIED_COLUMNS.items():
        found = _find(schema.names, candidates)
        if not found or found in columns.values():
            continue
        position = _position(schema, found, path)
        kind, wanted = _value_type(schema, position), COLUMNS[target]
        if kind != wanted and not (pa.types.is_string(wanted) or _is_number(kind)):
            left_out[found] = f"it holds {kind}, the manifest's {target} is {wanted}"
            continue
        columns[target], positions[target] = found, position
        if kind != wanted:
            casts[target] = _SQL_TYPES[wanted]
    return casts, left_out


def warn_left_out(sources: Sequence[MetadataFile]) -> None:
    """One warning per carried column left out, however many files leave it out."""
    files = collections.Counter((column, why) for source in sources for column, why in source.left_out.items())
    for (column, why), count in files.items():
        log.warning("not carrying column '%s' (in %d of %d files): %s", column, count, len(sources), why)


def _position(schema: pa.Schema, column: str, path: str) -> int:
    index = schema.get_field_index(column)
    if index < 0:  # the name is there (it was picked), so it is there more than once
        raise CurateError(f"{path} has more than one column named '{column}'")
    return index + 1


def _value_type(schema: pa.Schema, position: int) -> pa.DataType:
    """The type of the values in a column: a dictionary-encoded one (pandas' category) is read as its values."""
    kind = schema.field(position - 1).type
    return kind.value_type if pa.types.is_dictionary(kind) else kind


def _is_bytes(kind: pa.DataType, path: str, column: str, role: str) -> bool:
    """Whether a url or caption column is bytes to read as text; one clear error if it holds no text at all."""
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return False
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind):
        return True
    option = "--url-col" if role == "url" else "--caption-col"
    raise CurateError(f"{path}: column '{column}' (the {role}) holds {kind}, not text; name the {role} column with {option}")


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)


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
    query = f"SELECT #{source.positions['caption']} AS caption FROM read_parquet($path, utf8_validation = 'replace'{_binary_option(source)})"
    yield from _run(con, query, {"path": source.path}, lambda relation: relation.to_arrow_reader(batch_rows))


def fetch_rows(con, source: MetadataFile, rows: Sequence[int]) -> pa.Table:
    """The url and carried columns of the given file rows (ascending row numbers), as a table with `row`.

    DuckDB pushes the semi join into the parquet scan as a filter on the row number: only the wanted rows
    leave the scan, and row groups holding none of them are skipped."""
    select = ", ".join(f"{_read_as(source, name)} AS {quote_identifier(name)}" for name in source.columns if name != "caption")
    wanted = pa.table({"n": pa.array(rows, pa.int64())})
    query = (
        f"SELECT {ROW_NUMBER} AS row, {select} FROM read_parquet($path, {ROW_NUMBER}=true{_binary_option(source)}) "
        f"WHERE {ROW_NUMBER} IN (SELECT n FROM wanted) "
        f"ORDER BY {ROW_NUMBER}"
    )
    con.register("wanted", wanted)
    try:
        return _run(con, query, {"path": source.path}, lambda relation: relation.to_arrow_table())
    finally:
        con.unregister("wanted")


def _read_as(source: MetadataFile, name: str) -> str:
    column = f"#{source.positions[name]}"
    return f"TRY_CAST({column} AS {source.casts[name]})" if name in source.casts else column


def _binary_option(source: MetadataFile) -> str:
    return ", binary_as_string = true" if source.binary_text else ""


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
    except (duckdb.Error, pa.ArrowException, OSError) as exc:  # a DuckDB error inside the Arrow stream is an OSError
        raise CurateError(f"cannot read {path}: {first_line(exc)}") from None
