"""Decontamination: drop training rows that duplicate an eval image, or an earlier training row.

Seed 004 dropped a training image when its ISC (image copy detection) descriptor had cosine > 0.604
with any test image. We use two signals instead, both computed in the filter's single image pass:
  * perceptual hash (imagehash.phash, 64 bits): Hamming distance <= `phash_distance` (4) catches
    exact copies and resized / recompressed ones. Searched with faiss' multi-index hashing, which
    is exact for this radius (split the 64 bits into radius+1 chunks: a match agrees on one of them).
  * CLIP image embeddings of the scoring model: cosine >= `cosine_threshold` (0.95) catches near
    copies (crops, colour shifts) by exhaustive inner-product search (`_FlatIP`: what faiss'
    IndexFlatIP computes, as blocked torch matmuls, which ran 3-4x faster than faiss-cpu's
    IndexFlatIP here). CLIP embeddings are semantic rather than copy-detection descriptors, so this
    threshold is high on purpose.
Order: eval phash, eval CLIP, then (dedup_train) training rows against earlier kept training rows,
phash then CLIP, so the first row in manifest order survives. Rows sharing a URL are one image given
several labels on purpose (`retrieve --multi-class duplicate`), never duplicates of each other. Training
rows have no phash on the precomputed-embeddings path (no pixels): there only the CLIP signal is used, and the report says so.
Cost: eval search O(n_train x n_eval); in-train CLIP dedup O(n_train x n_kept) inner products.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.errors import CurateError
from curate.models import DEFAULT_CLIP
from manifests.images import IMAGE_SUFFIXES, has_images, image_rows

log = logging.getLogger(__name__)

BLOCK = 4096
MAX_LISTED_PAIRS = 1000
PHASH_DISTANCE, COSINE_THRESHOLD = 4, 0.95  # default near-duplicate radii
COSINE_SLACK = 1e-6  # float32 rounding: an exact copy scores 0.9999999, and counts at --cosine-threshold 1
PAIR_SCHEMA = pa.schema([
    ("uid", pa.string()),
    ("class_name", pa.string()),
    ("match", pa.string()),  # eval file (relative to the eval folder) or the uid of the kept training row
    ("match_kind", pa.string()),  # eval | train
    ("method", pa.string()),  # phash | clip
    ("hamming", pa.int32()),  # phash distance (null for clip)
    ("cosine", pa.float32()),  # CLIP cosine (null for phash)
])


@dataclasses.dataclass
class DecontamResult:
    """keep: mask over the input rows; pairs: one row per training row dropped as a duplicate, and what it
    matched (rows dropped because their image could not be read have no pair; counts["unreadable"] has them)."""

    keep: np.ndarray
    pairs: pa.Table
    counts: dict[str, int]
    settings: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        listed = self.pairs.slice(0, MAX_LISTED_PAIRS).to_pylist()
        return {**self.settings, "counts": self.counts, "pairs": listed, "pairs_listed": len(listed)}

    def write(self, path: str | Path) -> None:
        import pyarrow.parquet as pq

        pq.write_table(self.pairs, path, compression="zstd")


def decontaminate(
    table: pa.Table,
    manifest_dir: str | Path,
    eval_dir: str | Path,
    *,
    bundle=None,
    clip_model: str = DEFAULT_CLIP[0],
    clip_pretrained: str | None = None,
    train_embeddings: np.ndarray | None = None,
    train_phash: np.ndarray | None = None,
    phash_distance: int = PHASH_DISTANCE,
    cosine_threshold: float = COSINE_THRESHOLD,
    dedup_train: bool = True,
    batch_size: int = 256,
    workers: int = 2,
    device: str = "auto",
) -> DecontamResult:
    """Find the rows of `table` that duplicate an image under `eval_dir` (or an earlier row).

    Args:
      bundle: the CLIP model (a ClipBundle); loaded from clip_model/clip_pretrained when None.
      train_embeddings: (n, d) normalised embeddings of the rows (e.g. from the filter's pass);
        computed from the rows' images (with their phash) when None.
      train_phash: (n, 8) uint8 packed phash bits of the rows; None = no phash signal for them.
      phash_distance: max Hamming distance (0..16) for a phash duplicate.
      cosine_threshold: min CLIP cosine (0, 1] for an embedding duplicate.
      dedup_train: also drop rows duplicating an earlier row (first in row order survives).
    Returns a DecontamResult (keep mask, dropped pairs, counts, settings).
    """
    from curate.models import load_clip, resolve_device, resolve_pretrained

    check_options(phash_distance, cosine_threshold)
    eval_files = list_eval_images(Path(eval_dir))
    device = resolve_device(device)
    if bundle is None:
        pretrained = resolve_pretrained(clip_model, clip_pretrained)
        bundle = load_clip(clip_model, pretrained, device)
    reader = dict(batch_size=batch_size, workers=workers, device=device)
    unreadable = np.zeros(table.num_rows, dtype=bool)
    if train_embeddings is None:
        if not has_images(table):
            raise CurateError("decontamination needs the training images (image_path or shard/key) or their embeddings")
        rows = image_rows(table)
        train_embeddings, train_phash, unreadable = _embed(bundle, rows, Path(manifest_dir), True, reader, "train")
    paths = [str(path.relative_to(eval_dir)) for path in eval_files]
    names = [_printable(path) for path in paths]
    eval_rows = [{"uid": name, "image_path": path} for name, path in zip(names, paths, strict=True)]  # read errors name the eval file
    eval_emb, eval_phash, eval_bad = _embed(bundle, eval_rows, Path(eval_dir), train_phash is not None, reader, "eval")
    if eval_bad.all():
        raise CurateError(f"none of the {len(eval_files)} eval images in {eval_dir} could be read")
    finder = _Finder(table, ~unreadable, names, phash_distance, cosine_threshold)
    good_eval = ~eval_bad
    if train_phash is not None:
        finder.against_eval("phash", train_phash, eval_phash[good_eval], np.flatnonzero(good_eval))
    finder.against_eval("clip", train_embeddings, eval_emb[good_eval], np.flatnonzero(good_eval))
    if dedup_train:
        if train_phash is not None:
            finder.inside_train("phash", train_phash)
        finder.inside_train("clip", train_embeddings)
    settings = {
        "eval_dir": str(eval_dir), "eval_images": len(eval_files), "eval_unreadable": int(eval_bad.sum()),
        "phash_distance": phash_distance if train_phash is not None else None,
        "phash": "used" if train_phash is not None else "skipped: no training pixels (precomputed embeddings)",
        "cosine_threshold": cosine_threshold, "clip_model": bundle.name, "dedup_train": dedup_train,
    }
    return finder.result(unreadable, settings)


def _first_row_per_url(table: pa.Table) -> np.ndarray:
    """Per row, the first row with its URL (itself when it has none, or no url column)."""
    rows = np.arange(table.num_rows, dtype=np.int64)
    if "url" not in table.column_names or not table.num_rows:
        return rows
    urls = table.column("url").combine_chunks()
    with_url = pc.fill_null(pc.greater(pc.binary_length(urls), 0), False).to_numpy(zero_copy_only=False)
    codes = pc.fill_null(pc.index_in(urls, value_set=pc.unique(urls)), -1).to_numpy(zero_copy_only=False)
    rows[with_url] = _first_row_of_group(codes[with_url], rows[with_url])
    return rows


def _first_row_of_group(groups: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each of `rows` (ascending), the first of the rows in its group."""
    _, first = np.unique(groups, return_index=True)
    lookup = np.zeros(int(groups.max()) + 1 if len(groups) else 0, dtype=np.int64)
    lookup[groups[first]] = rows[first]
    return lookup[groups]


def _printable(path: str) -> str:
    """A file name as valid text: bytes that are not UTF-8 (kept by Python as lone surrogates, which parquet
    refuses) written as \\xNN escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def list_eval_images(eval_dir: Path) -> list[Path]:
    """Every image file under eval_dir (ImageFolder `split/class/x.jpg` or `class/x.jpg`), sorted."""
    if not eval_dir.is_dir():
        raise CurateError(f"eval folder not found: {eval_dir}")
    files = sorted(p for p in eval_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise CurateError(f"eval folder {eval_dir} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def check_options(phash_distance: int, cosine_threshold: float) -> None:
    if not 0 <= int(phash_distance) <= 16:
        raise CurateError(f"phash distance must be in [0, 16], got {phash_distance}")
    if not 0.0 < float(cosine_threshold) <= 1.0:
        raise CurateError(f"cosine threshold must be in (0, 1], got {cosine_threshold}")


def _embed(bundle, rows, base_dir: Path, with_phash: bool, reader: dict, what: str):
    """(normalised embeddings float32, phash uint8 (n, 8), unreadable mask) of image rows."""
    from curate.embeddings import ImageRows, iter_image_embeddings

    dim = bundle.model.visual.output_dim
    embeddings = np.zeros((len(rows), dim), dtype=np.float32)
    digests = np.zeros((len(rows), 8), dtype=np.uint8)
    bad = np.zeros(len(rows), dtype=bool)
    first_error = ""
    dataset = ImageRows(rows, base_dir, bundle.preprocess_val, bundle.image_size, with_phash)
    for indices, feats, batch_digests, errors, ok in iter_image_embeddings(bundle, dataset, desc=f"{what} images", **reader):
        bad[indices[~ok]] = True
        first_error = first_error or next((e for e in errors if e), "")
        if feats is not None:
            embeddings[indices[ok]] = feats[ok]
            digests[indices[ok]] = batch_digests[ok]
    if bad.any():
        log.warning("decontamination: %d %s image(s) could not be read (first: %s)", int(bad.sum()), what, first_error)
    return embeddings, (digests if with_phash else None), bad


# ---------------------------------------------------------------- the two signals as faiss indexes
@dataclasses.dataclass(frozen=True)
class _Metric:
    """How one signal builds an index and decides that a search result is a duplicate."""

    method: str
    limit: float

    def index(self, dim: int):
        if self.method == "phash":  # multi-index hashing: exact for Hamming radius <= limit
            logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its import chatter
            import faiss

            chunks = int(self.limit) + 1
            index = faiss.IndexBinaryMultiHash(64, chunks, 64 // chunks)
            index.nflip = 0
            return index
        return _FlatIP(dim)

    def prepare(self, vectors: np.ndarray) -> np.ndarray:
        if self.method == "phash":
            return np.ascontiguousarray(vectors, dtype=np.uint8)
        # normalised again in float32: stored as float16, a vector's cosine with itself is 0.9994..1.0006, and
        # exact copies fell either side of --cosine-threshold 0.9999
        vectors = np.array(vectors, dtype=np.float32)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors

    def is_duplicate(self, values: np.ndarray, ids: np.ndarray) -> np.ndarray:
        if self.method == "phash":
            return (ids >= 0) & (values <= self.limit)
        return (ids >= 0) & (values >= self.limit - COSINE_SLACK)

    def radius(self) -> float:
        """faiss range_search radius: binary returns d < r, inner product returns s > r."""
        return int(self.limit) + 1 if self.method == "phash" else float(self.limit) - COSINE_SLACK


class _FlatIP:
    """Exact inner-product search with faiss' IndexFlatIP interface (add, ntotal, search k=1,
    range_search), computed as blocked torch matmuls over the stored parts."""

    PART = 8192  # stored vectors per part
    QUERIES = 4096  # queries per step of `search`

    def __init__(self, dim: int):
        self.dim, self.parts, self.ntotal = dim, [], 0

    def add(self, vectors: np.ndarray) -> None:
        import torch

        for start in range(0, len(vectors), self.PART):
            self.parts.append(torch.from_numpy(np.ascontiguousarray(vectors[start:start + self.PART], dtype=np.float32)))
        self.ntotal += len(vectors)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Best inner product and its id per query (k must be 1); id -1 when empty. Works through at most
        QUERIES queries at a time, so the (queries x part) similarity temporary stays small (128 MiB)."""
        import torch

        assert k == 1
        best = torch.full((len(queries),), -np.inf)
        ids = torch.full((len(queries),), -1, dtype=torch.long)
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        slices = max(1, -(-len(q) // self.QUERIES))
        step = max(1, -(-len(q) // slices))  # equal slices: no thin tail, which BLAS would sum in another order
        for start in range(0, len(q), step):
            block, offset = q[start:start + step], 0
            block_best, block_ids = best[start:start + step], ids[start:start + step]  # views into best, ids
            for part in self.parts:
                values, where = (block @ part.T).max(dim=1)
                better = values > block_best
                block_best[better], block_ids[better] = values[better], where[better] + offset
                offset += len(part)
        return best.numpy()[:, None], ids.numpy()[:, None]

    def range_search(self, queries: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """faiss layout (lims, values, ids) of all stored vectors with inner product > radius."""
        import torch

        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        sims = torch.cat([q @ part.T for part in self.parts], dim=1) if self.parts else torch.zeros(len(q), 0)
        rows, cols = torch.nonzero(sims > radius, as_tuple=True)
        lims = np.concatenate([[0], np.cumsum(np.bincount(rows.numpy(), minlength=len(q)))])
        return lims, sims[rows, cols].numpy(), cols.numpy()


class _Finder:
    """Accumulates dropped rows (first reason wins) and their pairs."""

    def __init__(self, table: pa.Table, alive: np.ndarray, eval_names: list[str], phash_distance: int, cosine: float):
        self.uids = table.column("uid").to_pylist()
        self.classes = table.column("class_name").to_pylist()
        self.copy_of = _first_row_per_url(table)
        self.alive = alive.copy()
        self.eval_names = eval_names
        self.metrics = {"phash": _Metric("phash", phash_distance), "clip": _Metric("clip", cosine)}
        self.pairs: list[dict[str, Any]] = []
        self.counts = {"eval_phash": 0, "eval_clip": 0, "train_phash": 0, "train_clip": 0}
        self._dropped_as: dict[int, tuple[str, float]] = {}  # row -> (match, value) of the train pass running

    def _drop(self, row: int, match: str, kind: str, method: str, value: float) -> None:
        self.alive[row] = False
        self._dropped_as[row] = (match, value)
        self.counts[f"{kind}_{method}"] += 1
        hamming, cosine = (int(value), None) if method == "phash" else (None, float(value))
        self.pairs.append({"uid": self.uids[row], "class_name": self.classes[row], "match": match,
                           "match_kind": kind, "method": method, "hamming": hamming, "cosine": cosine})

    def against_eval(self, method: str, train: np.ndarray, eval_vectors: np.ndarray, eval_ids: np.ndarray) -> None:
        """Drop alive rows within reach of any eval vector (nearest eval image reported)."""
        metric = self.metrics[method]
        if not len(eval_vectors):
            return
        index = metric.index(train.shape[1])
        index.add(metric.prepare(eval_vectors))
        rows = np.flatnonzero(self.alive)
        for start in range(0, len(rows), BLOCK * 16):
            block = rows[start:start + BLOCK * 16]
            values, ids = index.search(metric.prepare(train[block]), 1)
            hits = metric.is_duplicate(values[:, 0], ids[:, 0])
            for row, value, hit_id in zip(block[hits], values[hits, 0], ids[hits, 0]):
                self._drop(int(row), self.eval_names[eval_ids[hit_id]], "eval", method, value)

    def inside_train(self, method: str, train: np.ndarray) -> None:
        """Greedy in row order: drop an alive row within reach of an earlier kept row.

        Rows of one URL (a caption naming several classes, retrieved with --multi-class duplicate) are one
        image on purpose: only the first alive one is compared, and the others share its fate."""
        metric = self.metrics[method]
        index, kept_rows = metric.index(train.shape[1]), np.zeros(0, dtype=np.int64)
        rows, copies = self._first_alive_copies()
        self._dropped_as = {}
        for start in range(0, len(rows), BLOCK):
            block = rows[start:start + BLOCK]
            vectors = metric.prepare(train[block])
            if index.ntotal:
                values, ids = index.search(vectors, 1)
                hits = metric.is_duplicate(values[:, 0], ids[:, 0])
                for row, value, hit_id in zip(block[hits], values[hits, 0], ids[hits, 0]):
                    self._drop(int(row), self.uids[kept_rows[hit_id]], "train", method, value)
            self._within_block(metric, block, vectors)
            survivors = self.alive[block]
            index.add(vectors[survivors])
            kept_rows = np.concatenate([kept_rows, block[survivors]])
        for row, first in copies:
            if first in self._dropped_as:
                match, value = self._dropped_as[first]
                self._drop(row, match, "train", method, value)

    def _first_alive_copies(self) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """(alive rows that are the first alive row of their URL, [(later alive row, that first row)])."""
        alive = np.flatnonzero(self.alive)
        first = _first_row_of_group(self.copy_of[alive], alive)
        later = first != alive
        return alive[~later], list(zip(alive[later].tolist(), first[later].tolist(), strict=True))

    def _within_block(self, metric: _Metric, block: np.ndarray, vectors: np.ndarray) -> None:
        index = metric.index(vectors.shape[1])
        index.add(vectors)
        lims, values, ids = index.range_search(vectors, metric.radius())
        for i, row in enumerate(block):
            if not self.alive[row]:
                continue
            found, vals = ids[lims[i]:lims[i + 1]], values[lims[i]:lims[i + 1]]
            for j, value in zip(found, vals):
                later = block[j]
                if j > i and self.alive[later] and metric.is_duplicate(np.array([value]), np.array([j]))[0]:
                    self._drop(int(later), self.uids[row], "train", metric.method, value)

    def result(self, unreadable: np.ndarray, settings: dict[str, Any]) -> DecontamResult:
        counts = {**self.counts, "unreadable": int(unreadable.sum()), "dropped": int((~self.alive).sum()),
                  "kept": int(self.alive.sum())}
        pairs = pa.Table.from_pylist(self.pairs, schema=PAIR_SCHEMA)
        return DecontamResult(keep=self.alive, pairs=pairs, counts=counts, settings=settings)
