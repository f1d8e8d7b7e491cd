"""`curate retrieve`: targeted real data from LAION-style metadata (DESIGN §3).

Two passes over each parquet file (files sorted by path, rows in file order). Pass 1 streams the captions
from DuckDB: the multi-literal candidate finder scans each Arrow batch whole, and the exact class rules run
on the few candidate rows. Pass 2 reads the url and metadata of the matched rows, a run of row groups at a
time, in a background thread. Matched rows then go through ambiguity, the quality filters and URL
de-duplication, and are written to the manifest as they come; a per-class cap reads them back once written.
A funnel report goes beside the manifest.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from curate.choices import MATCH_MODES, MULTI_CLASS, check_choice
from curate.errors import CurateError
from curate.matching import CaptionMatcher, ClassHit
from curate.metadata import (
    CARRIED_COLUMNS,
    MetadataFile,
    expand_inputs,
    fetch_rows,
    inspect_file,
    prefetch,
    stream_captions,
    warn_left_out,
)
from curate.tasks import Task, load_task
from manifests import (
    REQUIRED_COLUMNS,
    ManifestWriter,
    iter_manifest,
    staged_output_dir,
    uid_for_url,
    write_report,
)
from manifests.io import MANIFEST_NAME
from manifests.uid import seeded_ranks, subset_per_class_by_rank

log = logging.getLogger(__name__)
BATCH_ROWS = 1 << 20  # captions per Arrow batch of pass 1
PASS2_ROWS = 1 << 20  # pass 2 runs once per this many rows (whole row groups) of a file
STREAM_BUFFER_MB = 128
MAX_PENDING = 2  # pass-2 runs queued at most; beyond, pass 1 waits
# skipped_empty: rows whose caption is NULL or empty; no_url: matched rows without a URL (so kept = matched -
# ambiguous (when dropped) + ambiguous_extra_rows (when duplicated) - no_url - filtered_quality - duplicates - capped)
FUNNEL_KEYS = ("rows_scanned", "skipped_empty", "candidates", "matched", "ambiguous", "ambiguous_extra_rows", "no_url",
               "filtered_quality", "duplicates", "capped", "kept")


@dataclasses.dataclass(frozen=True)
class QualityFilters:
    max_punsafe: float | None = None
    max_pwatermark: float | None = None
    min_side: int | None = None

    def needed_columns(self) -> list[str]:
        needed = []
        if self.max_punsafe is not None:
            needed.append("punsafe")
        if self.max_pwatermark is not None:
            needed.append("pwatermark")
        if self.min_side is not None:
            needed += ["width", "height"]
        return needed


@dataclasses.dataclass
class RetrieveResult:
    out: Path
    funnel: dict[str, int]
    per_class: dict[str, int]
    seconds: float
    engine: str

    def summary(self) -> str:
        f = self.funnel
        lines = [f"retrieved {f['kept']} rows into {self.out / MANIFEST_NAME} "
                 f"({f['rows_scanned']:,} rows scanned in {self.seconds:.1f} s, "
                 f"{f['rows_scanned'] / max(self.seconds, 1e-9):,.0f} rows/s, engine {self.engine})"]
        lines += [f"  {key:22s} {f[key]:>12,}" for key in FUNNEL_KEYS]
        empty = [name for name, count in self.per_class.items() if count == 0]
        lines.append(f"  classes with rows       {len(self.per_class) - len(empty)} of {len(self.per_class)}")
        return "\n".join(lines)


@dataclasses.dataclass
class _Collected:
    """Where the matched rows go (in input order), with the running funnel and per-class counts."""

    writer: ManifestWriter
    per_class: np.ndarray
    seen_urls: set[str] = dataclasses.field(default_factory=set)
    funnel: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(FUNNEL_KEYS, 0))


def retrieve(
    task: str | Path | Task,
    metadata: Sequence[str],
    out: str | Path,
    match_mode: str = "word",
    multi_class: str = "drop",
    per_class_cap: int | None = None,
    seed: int = 0,
    url_col: str | None = None,
    caption_col: str | None = None,
    max_punsafe: float | None = None,
    max_pwatermark: float | None = None,
    min_side: int | None = None,
    threads: int | None = None,
    overwrite: bool = False,
) -> RetrieveResult:
    """Find the rows of `metadata` whose captions name a class of `task`; write OUT/manifest.parquet + report.json.

    Args:
        task: builtin task name, task file, or a loaded Task.
        metadata: parquet paths, folders or globs (LAION or DataComp schema).
        match_mode: "word" (term bounded by non-alphanumerics) or "substring".
        multi_class: "drop" captions naming several classes, or "duplicate" them (one row per class).
        per_class_cap: keep at most this many rows per class (a seeded, order-independent subset).
    Returns:
        RetrieveResult with the funnel counts and per-class counts.
    """
    started = time.perf_counter()
    task = load_task(task)
    check_choice("--match", match_mode, MATCH_MODES)
    check_choice("--multi-class", multi_class, MULTI_CLASS)
    filters = QualityFilters(max_punsafe, max_pwatermark, min_side)
    files = expand_inputs(metadata)
    sources = [inspect_file(path, url_col, caption_col) for path in files]
    warn_left_out(sources)
    _check_filter_columns(sources, filters)
    matcher = CaptionMatcher(task.classes, mode=match_mode, threads=threads)
    with staged_output_dir(out, overwrite=overwrite, inputs=files) as staging:
        manifest = staging / MANIFEST_NAME
        # matched rows go to disk as they come (memory holds only the URLs seen); a cap reads them back
        scanned = manifest if per_class_cap is None else staging / ".uncapped.parquet"
        columns = _manifest_columns(sources)
        with ManifestWriter(scanned, columns) as writer:
            collected = _Collected(writer, np.zeros(len(task.classes), dtype=np.int64))
            _scan(sources, matcher, filters, task, multi_class, threads, collected)
        if per_class_cap is not None:
            _cap_per_class(scanned, manifest, columns, per_class_cap, seed, collected)
        collected.funnel["kept"] = int(collected.per_class.sum())
        seconds = time.perf_counter() - started
        per_class = dict(zip(task.class_names, collected.per_class.tolist()))
        write_report(staging, _report(task, sources, filters, collected.funnel, per_class, seconds, locals_=dict(
            match=match_mode, multi_class=multi_class, per_class_cap=per_class_cap, seed=seed, engine=matcher.engine,
            threads=threads or os.cpu_count() or 1)))
    return RetrieveResult(Path(out), collected.funnel, per_class, seconds, matcher.engine)


def _check_filter_columns(sources: list[MetadataFile], filters: QualityFilters) -> None:
    for source in sources:
        for column in filters.needed_columns():
            if column not in source.columns:
                raise CurateError(f"a quality filter needs a '{column}' column, which {source.path} does not have")


def _manifest_columns(sources: list[MetadataFile]) -> list[str]:
    """The manifest's columns: ours, then every carried column that at least one input file has."""
    carried = [name for name in CARRIED_COLUMNS if any(name in source.columns for source in sources)]
    return [*REQUIRED_COLUMNS, "url", "matched_text", *carried]


def _scan(sources, matcher: CaptionMatcher, filters: QualityFilters, task: Task, multi_class: str, threads,
          collected: _Collected) -> None:
    """Pass 1 (captions) streams on a DuckDB connection; after each run of whole row groups, pass 2 (url and
    metadata of the rows it matched) is queued on a cursor of the same database in a background thread, so the
    two overlap down to the last row group and share the database's `threads` threads (all of them for the
    pass 2 left when pass 1 ends). Results are collected in queue order, i.e. input order."""
    import duckdb

    threads = threads or os.cpu_count() or 1
    # the pass-2 cursor closes before the executor waits for its thread: on Ctrl-C its query is interrupted first
    with _closed(duckdb.connect(config={"threads": threads})) as con, concurrent.futures.ThreadPoolExecutor(1) as fetcher, \
            _closed(con.cursor()) as details_con, tqdm(
            total=sum(s.num_rows for s in sources), unit="row", unit_scale=True, desc="retrieve", disable=None) as bar:
        pending: collections.deque = collections.deque()
        try:
            # room for a few batches, so DuckDB keeps decoding while this process matches the previous ones
            con.execute(f"SET streaming_buffer_size = '{STREAM_BUFFER_MB}MB'")
            for index, source in enumerate(sources, start=1):
                bar.set_postfix_str(f"file {index}/{len(sources)}")
                for chunk in _match_file(con, source, matcher, collected.funnel, bar):
                    pending.append((fetcher.submit(_details, details_con, source, chunk), chunk.hits))
                    # collect what pass 2 has done; wait for it if it falls behind (memory stays bounded)
                    while pending and (pending[0][0].done() or len(pending) > MAX_PENDING):
                        _collect_next(pending, filters, task, multi_class, collected)
            while pending:
                _collect_next(pending, filters, task, multi_class, collected)
        finally:
            for future, _ in pending:
                future.cancel()


@contextlib.contextmanager
def _closed(connection):
    """Close a DuckDB connection after the block. When the block raised (Ctrl-C), the pass-1 reader thread may
    still be fetching on it: its query is interrupted, and closing it must not bury the error under another."""
    import duckdb

    try:
        yield connection
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            connection.interrupt()
            connection.close()
        raise
    connection.close()


def _collect_next(pending: collections.deque, filters: QualityFilters, task: Task, multi_class: str, collected: _Collected) -> None:
    details, hits = pending.popleft()
    _collect(details.result(), hits, filters, task, multi_class, collected)


@dataclasses.dataclass
class _Matches:
    """Rows of one file that name a class (ascending), with their captions and class hits."""

    rows: list[int] = dataclasses.field(default_factory=list)
    captions: list[str] = dataclasses.field(default_factory=list)
    hits: list[list[ClassHit]] = dataclasses.field(default_factory=list)

    def split_before(self, row: int) -> _Matches:
        """Remove and return the matches before file row `row`."""
        cut = bisect.bisect_left(self.rows, row)
        head = _Matches(self.rows[:cut], self.captions[:cut], self.hits[:cut])
        del self.rows[:cut], self.captions[:cut], self.hits[:cut]
        return head


def _details(connection, source: MetadataFile, matches: _Matches) -> pa.Table:
    """Pass 2: url and carried columns of the matched rows, with their captions."""
    return fetch_rows(connection, source, matches.rows).append_column("caption", pa.array(matches.captions, pa.string()))


def _match_file(con, source: MetadataFile, matcher: CaptionMatcher, funnel: dict, bar) -> Iterator[_Matches]:
    """Pass 1 over a file's captions: the matched rows, handed on in runs of whole row groups (so that
    pass 2 decodes each row group once).

    The candidate search runs in the prefetch thread, right behind DuckDB, so that it overlaps with the
    exact rules that this thread applies to the previous batch."""
    matches = _Matches()
    ends = source.row_group_ends
    first_row = 0
    for column, candidates, empty in prefetch(_candidates(stream_captions(con, source, BATCH_ROWS), matcher)):
        funnel["skipped_empty"] += empty
        funnel["candidates"] += len(candidates)
        order = sorted(candidates)
        texts = column.take(pa.array(order, type=pa.int64())).to_pylist()
        for index, caption in zip(order, texts):
            found = matcher.classes_in(caption, candidates[index])
            if found:
                matches.rows.append(first_row + index)
                matches.captions.append(caption)
                matches.hits.append(found)
        first_row += len(column)
        bar.update(len(column))
        done_groups = bisect.bisect_right(ends, first_row)
        if done_groups and matches.rows and ends[done_groups - 1] - matches.rows[0] >= PASS2_ROWS:
            yield matches.split_before(ends[done_groups - 1])
    funnel["rows_scanned"] += first_row
    if matches.rows:
        yield matches


def _candidates(batches, matcher: CaptionMatcher):
    """(captions, candidate rows -> term ids, count of NULL or empty captions) per batch."""
    for batch in batches:
        column = batch.column("caption")
        empty = column.null_count + pc.sum(pc.equal(pc.binary_length(column), 0), min_count=0).as_py()
        yield column, matcher.candidates(column), empty


def _collect(details: pa.Table, hits: list[list[ClassHit]], filters: QualityFilters, task: Task, multi_class: str, collected: _Collected) -> None:
    """Pass 2 over a file's matched rows: ambiguity, empty URL, quality filters, URL de-duplication."""
    funnel = collected.funnel
    funnel["matched"] += len(hits)
    passes = quality_mask(details, filters)
    passes = [True] * details.num_rows if passes is None else passes.to_pylist()
    take, labels, texts = [], [], []
    for i, (url, found, ok) in enumerate(zip(details.column("url").to_pylist(), hits, passes)):
        if len(found) > 1:
            funnel["ambiguous"] += 1
            if multi_class == "drop":
                continue
        if not url:
            funnel["no_url"] += 1
            continue
        if not ok:
            funnel["filtered_quality"] += 1
            continue
        if url in collected.seen_urls:
            funnel["duplicates"] += 1
            continue
        collected.seen_urls.add(url)
        funnel["ambiguous_extra_rows"] += len(found) - 1
        for hit in found:
            take.append(i)
            labels.append(hit.class_index)
            texts.append(hit.matched_text)
    if take:
        collected.writer.write(_rows_table(details, take, labels, texts, task))
        collected.per_class += np.bincount(labels, minlength=len(collected.per_class))


def quality_mask(batch: pa.RecordBatch, filters: QualityFilters) -> pa.BooleanArray | None:
    """Rows passing the LAION quality filters (a missing value fails an active filter); None if none is set."""
    masks = []
    if filters.max_punsafe is not None:
        masks.append(pc.less_equal(batch.column("punsafe"), filters.max_punsafe))
    if filters.max_pwatermark is not None:
        masks.append(pc.less_equal(batch.column("pwatermark"), filters.max_pwatermark))
    if filters.min_side is not None:
        shorter = pc.min_element_wise(batch.column("width"), batch.column("height"), skip_nulls=False)
        masks.append(pc.greater_equal(shorter, filters.min_side))
    if not masks:
        return None
    mask = masks[0]
    for other in masks[1:]:
        mask = pc.and_kleene(mask, other)
    return mask.fill_null(False)


def _rows_table(details: pa.Table, take: list[int], labels: list[int], texts: list[str], task: Task) -> pa.Table:
    """Manifest rows: one per (matched row, class); a URL emitted for several classes gets per-label uids."""
    rows = details.take(pa.array(take, type=pa.int64())).drop_columns(["row"])
    repeated = {i for i, count in collections.Counter(take).items() if count > 1}
    urls = rows.column("url").to_pylist()
    uids = [uid_for_url(u, label if i in repeated else None) for u, label, i in zip(urls, labels, take)]
    names = task.class_names
    columns = {
        "uid": pa.array(uids, pa.string()),
        "label": pa.array(labels, pa.int32()),
        "class_name": pa.array([names[label] for label in labels], pa.string()),
        "source": pa.array(["retrieved"] * len(labels), pa.string()),
        "caption": rows.column("caption"),
        "url": rows.column("url"),
        "matched_text": pa.array(texts, pa.string()),
    }
    for name in rows.column_names:
        columns.setdefault(name, rows.column(name))
    return pa.table(columns)


def _cap_per_class(scanned: Path, manifest: Path, columns: list[str], cap: int, seed: int, collected: _Collected) -> None:
    """At most `cap` rows per label: those with the smallest seeded hash of their uid, in input order.
    The scanned rows are read back a row group at a time, twice: first their uids, kept as 8-byte ranks
    (and labels), then whole row groups, filtered on their way to the manifest."""
    ranks, labels = [np.zeros(0, np.uint64)], [np.zeros(0, np.int32)]
    for group in iter_manifest(scanned, columns=("uid", "label"), check=False):  # written, and checked, by this run
        ranks.append(seeded_ranks(group.column("uid").to_pylist(), seed))
        labels.append(group.column("label").to_numpy())
    ranks, labels = np.concatenate(ranks), np.concatenate(labels)
    keep = subset_per_class_by_rank(ranks, labels, lambda n: min(n, cap))
    with ManifestWriter(manifest, columns) as writer:
        start = 0
        for group in iter_manifest(scanned, check=False):  # the writer checks each piece
            writer.write(group.filter(pa.array(keep[start : start + group.num_rows])))
            start += group.num_rows
    scanned.unlink()
    collected.funnel["capped"] = len(keep) - int(keep.sum())
    collected.per_class = np.bincount(labels[keep], minlength=len(collected.per_class))


def _report(task: Task, sources, filters: QualityFilters, funnel, per_class, seconds: float, locals_: dict) -> dict:
    return {
        "stage": "retrieve",
        "task": task.name,
        "task_source": task.source,
        "settings": {**locals_, "filters": dataclasses.asdict(filters)},
        "seeds": {"per_class_cap": locals_["seed"]},
        "inputs": [{"path": s.path, "rows": s.num_rows, "columns": s.columns} for s in sources],
        "funnel": funnel,
        "per_class": per_class,
        "seconds": round(seconds, 3),
        "rows_per_s": round(funnel["rows_scanned"] / max(seconds, 1e-9), 1),
    }
