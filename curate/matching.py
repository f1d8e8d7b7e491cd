"""Which classes does a caption name? The exact rules of DESIGN §3, plus a fast candidate finder.

Two steps, so that the exact (slow, per-caption) rules run only on the few rows that can match:
  1. `CaptionMatcher.candidates(array)`: every class term searched at once, case-insensitively, over the
     whole Arrow string buffer of a batch by a multi-literal engine (Hyperscan; RE2 via pyarrow as the
     fallback where Hyperscan is not installed). It returns a superset of the rows that match.
  2. `CaptionMatcher.classes_in(caption, term_ids)`: the exact rules on one caption: word or substring
     matching, overlap resolution, require_any / exclude.
Class names are data: every term is escaped character by character before any pattern is built.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.choices import MATCH_MODES
from curate.tasks import ClassSpec

_WHITESPACE = re.compile(r"\s+")
_NOT_ALNUM_BEFORE = r"(?<![^\W_])"  # start of text, or a character that is not a letter or digit
_NOT_ALNUM_AFTER = r"(?![^\W_])"


@dataclasses.dataclass(frozen=True)
class Term:
    text: str
    class_index: int
    pattern: re.Pattern
    word: bool
    pieces: tuple[str, ...]  # casefolded words of the term: a caption lacking one cannot match

    def spans(self, caption: str) -> Iterator[tuple[int, int]]:
        """Every occurrence (overlapping ones too); in word mode only those bounded by non-alphanumerics."""
        position = 0
        while match := self.pattern.search(caption, position):
            start, end = match.span()
            if not self.word or (_bounded_before(caption, start) and _bounded_after(caption, end)):
                yield start, end
            position = start + 1


class ClassHit(NamedTuple):
    class_index: int
    matched_text: str


class CaptionMatcher:
    """Match captions against the classes of a task (labels = class indices)."""

    def __init__(self, classes: Sequence[ClassSpec], mode: str = "word", engine: str = "auto", threads: int | None = None):
        if mode not in MATCH_MODES:
            raise ValueError(f"match mode must be one of {MATCH_MODES}, got {mode!r}")
        self.mode = mode
        self.terms = [
            Term(text, index, re.compile(_term_body(text), re.IGNORECASE), mode == "word", tuple(text.casefold().split()))
            for index, spec in enumerate(classes)
            for text in dict.fromkeys(spec.terms)
        ]
        self._required = [_any_word(spec.require_any) for spec in classes]
        self._excluded = [_any_word(spec.exclude) for spec in classes]
        self._prefilter = _make_prefilter([t.text for t in self.terms], engine, threads)

    @property
    def engine(self) -> str:
        return self._prefilter.name

    def candidates(self, captions: pa.Array) -> dict[int, set[int] | None]:
        """Rows of `captions` that may match -> the term ids seen there (None: check every term)."""
        return self._prefilter.candidates(captions)

    def classes_in(self, caption: str, term_ids: Iterable[int] | None = None) -> list[ClassHit]:
        """Classes named by `caption` after overlap, require_any and exclude, in order of first mention."""
        ids = range(len(self.terms)) if term_ids is None else term_ids
        folded = caption.casefold()  # not lower(): it lowers a Σ to σ or ς by what follows it
        spans = []
        for i in ids:
            term = self.terms[i]
            for piece in term.pieces:  # cheap necessary test before the regex
                if piece not in folded:
                    break
            else:
                spans.extend((start, end, term.class_index) for start, end in term.spans(caption))
        if len(spans) > 1:
            spans = _drop_contained(spans)
        first: dict[int, ClassHit] = {}
        refused: set[int] = set()  # each class's require_any / exclude is searched for once per caption
        for start, end, cls in spans:
            if cls in first or cls in refused:
                continue
            if self._allowed(cls, caption):
                first[cls] = ClassHit(cls, caption[start:end])
            else:
                refused.add(cls)
        return list(first.values())

    def _allowed(self, cls: int, caption: str) -> bool:
        required, excluded = self._required[cls], self._excluded[cls]
        if required is not None and not required.search(caption):
            return False
        return excluded is None or not excluded.search(caption)


def _drop_contained(spans: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The spans (start, end, class) in order of start, longest first, less those lying inside a longer
    match of another class ("737" in "737-800").

    One sweep in that order (a caption repeating class names thousands of times must not take
    quadratic time): every earlier span starts no later, so a span lies inside a longer one of another
    class exactly when an earlier span of another class ends at or after it, spans equal to it aside."""
    ordered = sorted(spans, key=lambda span: (span[0], -span[1]))
    kept = []
    reach = ((-1, -1), (-1, -1))  # the furthest end of any earlier span, and of another class than that one's
    for _, group in itertools.groupby(ordered, key=lambda span: span[:2]):
        group = list(group)
        for span in group:
            (end1, cls1), (end2, _) = reach
            if (end1 if cls1 != span[2] else end2) < span[1]:
                kept.append(span)
        for _, end, cls in group:
            reach = _furthest_two(reach, end, cls)
    return kept


def _furthest_two(reach, end: int, cls: int):
    """((end, class), (end, class)): the furthest end, and the furthest of a different class, after adding one."""
    (end1, cls1), second = reach
    if cls == cls1:
        return (max(end1, end), cls1), second
    if end > end1:
        return (end, cls), (end1, cls1)
    return ((end1, cls1), (end, cls)) if end > second[0] else reach


def _term_body(term: str) -> str:
    """Escaped Python-regex body of a term; a space inside a term matches any run of whitespace."""
    return r"\s+".join(re.escape(part) for part in _WHITESPACE.split(term.strip()))


def _bounded_before(text: str, start: int) -> bool:
    """Not preceded by a letter or digit, nor by a combining mark (which belongs to the letter before it)."""
    return start == 0 or not (text[start - 1].isalnum() or unicodedata.category(text[start - 1]).startswith("M"))


def _bounded_after(text: str, end: int) -> bool:
    """Not followed by a letter or digit, nor by a combining mark (the accent of a decomposed "rosé")."""
    return end == len(text) or not (text[end].isalnum() or unicodedata.category(text[end]).startswith("M"))


def _any_word(words: Sequence[str]) -> re.Pattern | None:
    if not words:
        return None
    alternation = "|".join(_term_body(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(f"{_NOT_ALNUM_BEFORE}(?:{alternation}){_NOT_ALNUM_AFTER}", re.IGNORECASE)


# ------------------------------------------------------------------ candidate finders (prefilters)
class _HyperscanPrefilter:
    """One Hyperscan scan over a batch's whole UTF-8 data buffer finds every row that may match.

    Each term is reduced to a key that any match of the term must contain: its longest ASCII run
    (as a caseless literal: literal databases compile in milliseconds even for thousands of classes).
    Terms with no ASCII letters or digits are searched as caseless Unicode patterns instead.
    """

    name = "hyperscan"

    def __init__(self, terms: list[str], threads: int | None = None):
        import hyperscan

        self._hs = hyperscan
        self._threads = max(1, threads or os.cpu_count() or 1)
        self._pool = concurrent.futures.ThreadPoolExecutor(self._threads) if self._threads > 1 else None
        ascii_keys: dict[bytes, list[int]] = {}
        unicode_keys: dict[bytes, list[int]] = {}
        for term_id, (term, key) in enumerate(zip(terms, _ascii_keys(terms))):
            if key:
                ascii_keys.setdefault(key, []).append(term_id)
            else:
                unicode_keys.setdefault(_hyperscan_pattern(term), []).append(term_id)
        self._databases = []
        if ascii_keys:
            self._databases.append(self._compile(ascii_keys, hyperscan.HS_FLAG_CASELESS, literal=True))
        if unicode_keys:
            flags = hyperscan.HS_FLAG_CASELESS | hyperscan.HS_FLAG_UTF8 | hyperscan.HS_FLAG_UCP
            self._databases.append(self._compile(unicode_keys, flags, literal=False))

    def _compile(self, keys: dict[bytes, list[int]], flags: int, literal: bool):
        database = self._hs.Database(mode=self._hs.HS_MODE_BLOCK)
        database.compile(expressions=list(keys), ids=list(range(len(keys))), flags=flags, literal=literal)
        scratches = [self._hs.Scratch(database) for _ in range(self._threads)]
        return database, scratches, list(keys.values())

    def candidates(self, captions: pa.Array) -> dict[int, set[int] | None]:
        offsets, data = _string_buffers(captions)
        if data is None or offsets[-1] == offsets[0]:
            return {}
        # contiguous row ranges scanned in parallel (Hyperscan releases the GIL while it scans)
        bounds = np.linspace(0, len(offsets) - 1, self._threads + 1).astype(np.int64)
        parts = [(int(offsets[lo]), int(offsets[hi])) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
        found: dict[int, set[int] | None] = {}
        for database, scratches, term_ids in self._databases:
            jobs = [(database, scratches[i], data, start, end) for i, (start, end) in enumerate(parts)]
            for ends, keys in self._pool.map(_scan_block, jobs) if len(jobs) > 1 else map(_scan_block, jobs):
                rows = np.searchsorted(offsets, ends, side="left") - 1
                for row, key_id in zip(rows.tolist(), keys):
                    found.setdefault(row, set()).update(term_ids[key_id])
        return found


def _scan_block(job) -> tuple[np.ndarray, list[int]]:
    """Scan data[start:end] with one database; (absolute match end offsets, key ids)."""
    database, scratch, data, start, end = job
    ends: list[int] = []
    keys: list[int] = []

    def on_match(key_id, _start, match_end, _flags, _ctx):
        ends.append(match_end)
        keys.append(key_id)

    if end > start:
        database.scan(data.slice(start, end - start), match_event_handler=on_match, scratch=scratch)
    return np.asarray(ends, dtype=np.int64) + start, keys


class _ArrowRegexPrefilter:
    """Fallback: one case-insensitive RE2 alternation of every term (pyarrow compute)."""

    name = "arrow-re2"

    def __init__(self, terms: list[str]):
        self._pattern = "|".join(_term_body(t) for t in sorted(terms, key=len, reverse=True))

    def candidates(self, captions: pa.Array) -> dict[int, set[int] | None]:
        mask = pc.match_substring_regex(captions, self._pattern, ignore_case=True)
        rows = np.flatnonzero(mask.fill_null(False).to_numpy(zero_copy_only=False))
        return dict.fromkeys(rows.tolist())


def _make_prefilter(terms: list[str], engine: str, threads: int | None):
    if engine in ("auto", "hyperscan"):
        try:
            return _HyperscanPrefilter(terms, threads)
        except ImportError:
            if engine == "hyperscan":
                raise
    return _ArrowRegexPrefilter(terms)


def _hyperscan_pattern(term: str) -> bytes:
    """A Hyperscan regex matching `term` literally (ASCII punctuation hex-escaped, whitespace runs as \\s+)."""
    parts = []
    for chunk in _WHITESPACE.split(term.strip()):
        parts.append("".join(ch if ch.isalnum() or ord(ch) > 127 else f"\\x{ord(ch):02x}" for ch in chunk))
    return r"\s+".join(parts).encode("utf-8")


def _ascii_runs(term: str) -> list[str]:
    """Lowercased runs of printable ASCII inside the words of `term` that hold a letter or digit."""
    return [run.lower() for run in re.findall(r"[\x21-\x7e]+", term) if any(ch.isalnum() for ch in run)]


def _ascii_keys(terms: list[str]) -> list[bytes]:
    """Per term, a run any match must contain: its longest (short runs hit inside common words), the one
    fewest other terms share among equally long ones."""
    runs = [_ascii_runs(term) for term in terms]
    shared: dict[str, int] = {}
    for term_runs in runs:
        for run in set(term_runs):
            shared[run] = shared.get(run, 0) + 1
    return [min(r, key=lambda run: (-len(run), shared[run])).encode("ascii") if r else b"" for r in runs]


def _string_buffers(captions: pa.Array) -> tuple[np.ndarray, pa.Buffer | None]:
    """(offsets, data buffer) of a string array, with the array's own offset applied."""
    if isinstance(captions, pa.ChunkedArray):
        captions = captions.combine_chunks()
    if pa.types.is_string_view(captions.type):
        captions = captions.cast(pa.string())
    offset_type = np.int64 if pa.types.is_large_string(captions.type) else np.int32
    _, offsets_buf, data = captions.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=offset_type)[captions.offset : captions.offset + len(captions) + 1]
    return offsets.astype(np.int64), data
