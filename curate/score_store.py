"""What an interrupted `curate filter` image pass had scored, kept beside OUT so a re-run scores only the rest.

The rows are scored in chunks of whole batches (so a resumed run sees the same batches, and gives the same
scores, as one that was never stopped). After each chunk, its scores, read errors and phash go to a small
file in `.OUT.filter-scores/`; with decontamination, its embeddings go to a memory-mapped file there (10 M
rows of ViT-B-16 are 10 GB). The folder records what the scores depend on (manifest, model weights and
texts, mode, chunking): a run with other settings is refused instead of mixing scores, unless `--overwrite`
(then it starts again). A finished filter removes the folder.
"""

from __future__ import annotations

import math
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from curate.embeddings import float16_map
from curate.errors import CurateError
from manifests.io import (
    atomic_write,
    changed_settings,
    make_folder,
    read_saved,
    write_json,
)

CHUNK_TARGET_ROWS = 65536  # rows per saved chunk (rounded up to whole batches): about a minute of ViT-B-16 on a GPU
FINGERPRINT = "fingerprint.json"
EMBEDDINGS = "embeddings.f16"
CHUNKS = "chunk-*.npz"  # chunk-<first row>.npz; one being written is a hidden temporary file (atomic_write)


def store_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.filter-scores"


def remove_store(out: Path) -> None:
    """After a finished filter into `out`: what an interrupted run left for it is of no more use."""
    shutil.rmtree(store_folder(Path(out)), ignore_errors=True)


def chunk_rows(batch_size: int) -> int:
    return batch_size * math.ceil(CHUNK_TARGET_ROWS / batch_size)


class ScoreStore:
    """The finished chunks of one filter run's image pass (see the module doc)."""

    def __init__(self, out: Path, fingerprint: dict[str, Any], rows: int, dim: int, keep_embeddings: bool, overwrite: bool):
        self.folder = store_folder(Path(out))
        self.chunk = int(fingerprint["chunk_rows"])
        self.rows = rows
        if self.folder.exists():
            self._discard_if_other(fingerprint, overwrite)
        if not self.folder.exists():
            make_folder(self.folder)
        write_json(fingerprint, self.folder / FINGERPRINT)
        self.embeddings = self._embeddings((rows, dim)) if keep_embeddings else None

    def _discard_if_other(self, fingerprint: dict[str, Any], overwrite: bool) -> None:
        """Scores of the same settings are the ones this run would compute: kept (even with --overwrite, which
        replaces a finished OUT, so that a killed --overwrite run resumes too). Others are refused, or discarded
        with --overwrite. A folder with no chunk yet holds nothing to keep."""
        differ = changed_settings(read_saved(self.folder / FINGERPRINT), fingerprint)
        if differ and not overwrite and any(self.folder.glob(CHUNKS)):
            raise CurateError(f"{self.folder} holds the scores of an interrupted filter run with other settings "
                              f"({', '.join(differ)} differ): run it again as it was to resume, or add --overwrite to start over")
        if differ:
            shutil.rmtree(self.folder)

    def _embeddings(self, shape: tuple[int, int]) -> np.ndarray:
        """The embeddings file, created anew (and every chunk forgotten, its rows' embeddings being lost)
        when it is missing or of another size."""
        path = self.folder / EMBEDDINGS
        if path.exists() and path.stat().st_size == shape[0] * shape[1] * 2:
            return float16_map(path, shape, mode="r+")
        for chunk in self.folder.glob(CHUNKS):
            chunk.unlink()
        return float16_map(path, shape)

    def _chunk_file(self, start: int) -> Path:
        return self.folder / f"chunk-{start:012d}.npz"

    def chunk_starts(self) -> range:
        return range(0, self.rows, self.chunk)

    def load(self, scores: np.ndarray, unreadable: dict[int, str], phash: np.ndarray | None) -> np.ndarray:
        """Fill the arrays from the saved chunks; returns the mask of rows still to score."""
        todo = np.ones(self.rows, dtype=bool)
        for start in self.chunk_starts():
            end = min(start + self.chunk, self.rows)
            saved = self._read_chunk(start, end, phash is not None)
            if saved is None:  # not saved, or damaged: scored again
                continue
            scores[start:end] = saved["scores"]
            unreadable.update(zip(saved["bad_rows"].tolist(), saved["bad_errors"].tolist(), strict=True))
            if phash is not None:
                phash[start:end] = saved["phash"]
            todo[start:end] = False
        return todo

    def _read_chunk(self, start: int, end: int, with_phash: bool) -> dict[str, np.ndarray] | None:
        """A saved chunk's arrays, whole and of the right lengths, or None."""
        names = ["scores", "bad_rows", "bad_errors", *(["phash"] if with_phash else [])]
        try:
            with np.load(self._chunk_file(start)) as saved:
                arrays = {name: saved[name] for name in names}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        lengths_fit = len(arrays["scores"]) == end - start and len(arrays["bad_rows"]) == len(arrays["bad_errors"])
        return arrays if lengths_fit and (not with_phash or len(arrays["phash"]) == end - start) else None

    def save(self, start: int, scores: np.ndarray, unreadable: dict[int, str], phash: np.ndarray | None) -> None:
        """Record the chunk starting at `start` as done (its embeddings are flushed to disk first)."""
        end = min(start + self.chunk, self.rows)
        if self.embeddings is not None and isinstance(self.embeddings, np.memmap):
            self.embeddings.flush()
        bad = sorted(row for row in unreadable if start <= row < end)
        arrays = {"scores": scores[start:end], "bad_rows": np.array(bad, dtype=np.int64),
                  "bad_errors": np.array([unreadable[row] for row in bad], dtype=str)}
        if phash is not None:
            arrays["phash"] = phash[start:end]
        atomic_write(self._chunk_file(start), lambda temporary: _save_arrays(temporary, arrays))


def _save_arrays(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:  # a file, not a name: np.savez would add ".npz" to one
        np.savez(handle, **arrays)
