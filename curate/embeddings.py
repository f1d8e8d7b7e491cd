"""Where image embeddings come from, for the filter and decontamination stages.

  * the manifest's images: `ImageRows` (a map-style dataset that never raises on a bad image) decoded in
    DataLoader workers, encoded by the registry's CLIP model (`iter_image_embeddings`);
  * precomputed embeddings in clip-retrieval's layout (img_emb/img_emb_N.npy + metadata/metadata_N.parquet):
    checked shard by shard (`embedding_shards`), streamed chunk by chunk and matched to the manifest by url
    or uid (`iter_precomputed`), so memory stays flat however many rows are embedded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.errors import CurateError, first_line
from manifests.images import open_image

log = logging.getLogger(__name__)

CHUNK_ROWS = 8192  # precomputed embeddings are scored this many rows at a time (flat memory)
_META_KEYS = (("url", ("url", "URL")), ("source_uid", ("uid",)), ("uid", ("uid",)))  # manifest col, metadata cols


# ---------------------------------------------------------------- reader 1: the manifest's images
class ImageRows:
    """Map-style dataset over image rows: (index, pixels, phash bytes, error message or '').

    A row that cannot be read gives zero pixels and its error instead of raising, so one bad file
    never stops a run. Plain class (no torch import here) so DataLoader workers can pickle it.
    """

    def __init__(self, rows: Sequence[dict[str, Any]], base_dir: Path, preprocess, image_size: int, with_phash: bool):
        self.rows, self.base_dir, self.preprocess = rows, Path(base_dir), preprocess
        self.image_size, self.with_phash = image_size, with_phash

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        import torch

        try:
            image = open_image(self.rows[index], self.base_dir)
            pixels = self.preprocess(image)
            digest = _phash_bytes(image) if self.with_phash else np.zeros(8, dtype=np.uint8)
            return index, pixels, digest, ""
        except Exception as exc:  # noqa: BLE001 -- any decode failure is a counted, listed skip
            blank = torch.zeros(3, self.image_size, self.image_size)
            return index, blank, np.zeros(8, dtype=np.uint8), f"{type(exc).__name__}: {exc}".splitlines()[0]


def float16_map(file, shape: tuple[int, int], mode: str = "w+") -> np.ndarray:
    """(n, d) float16 embeddings in a memory-mapped file (a path or an open file); for n = 0 zeros in memory,
    since a zero-length file cannot be mapped."""
    if shape[0] == 0:
        return np.zeros(shape, dtype=np.float16)
    return np.memmap(file, mode=mode, dtype=np.float16, shape=shape)


def _phash_bytes(image) -> np.ndarray:
    import imagehash

    return np.packbits(imagehash.phash(image).hash.reshape(-1))


def image_loader(dataset: ImageRows, batch_size: int, workers: int, device: str = "cpu"):
    """A batched DataLoader over `dataset` in order."""
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=str(device).startswith("cuda"), persistent_workers=False)


def iter_image_embeddings(bundle, dataset: ImageRows, *, batch_size: int, workers: int, device: str, desc: str):
    """Yield (indices, normalised embeddings (b, d) float32 or None, phash (b, 8) uint8, error messages,
    ok mask) per batch; rows that could not be read (ok False) have meaningless embeddings."""
    from tqdm import tqdm

    from curate.models import encode_images

    with tqdm(total=len(dataset), unit="img", desc=desc, leave=False) as bar:
        for indices, pixels, digests, errors in image_loader(dataset, batch_size, workers, device):
            ok = np.array([not e for e in errors], dtype=bool)
            feats = encode_images(bundle, pixels, device).cpu().numpy() if ok.any() else None
            yield indices.numpy(), feats, digests.numpy(), list(errors), ok
            bar.update(len(errors))


# ---------------------------------------------------------------- reader 2: precomputed embeddings
def embedding_shards(emb_dir: Path) -> list[tuple[Path, Path, int, int]]:
    """(npy, metadata parquet, rows, embedding width) of each shard of a clip-retrieval folder, in shard
    order; checks that every shard has both files and that their row counts agree."""
    import pyarrow.parquet as pq

    npys = _numbered(emb_dir / "img_emb", "img_emb_", ".npy")
    metas = _numbered(emb_dir / "metadata", "metadata_", ".parquet")
    if not metas:
        raise CurateError(f"embeddings folder {emb_dir} has no metadata/metadata_N.parquet shards")
    for number in sorted(set(metas) ^ set(npys)):
        have, lack = (f"metadata/metadata_{number}.parquet", f"img_emb/img_emb_{number}.npy")
        if number in npys:
            have, lack = lack, have
        raise CurateError(f"embeddings shard {number}: {emb_dir / have} has no matching {lack}")
    shards = []
    for number in sorted(metas):
        rows, width = _npy_shape(npys[number])
        try:
            meta_rows = pq.ParquetFile(metas[number]).metadata.num_rows
        except (pa.ArrowInvalid, OSError) as exc:
            raise CurateError(f"cannot read embeddings metadata {metas[number]}: {first_line(exc)}") from None
        if rows != meta_rows:
            raise CurateError(f"embeddings shard {number}: {npys[number]} has {rows} rows but "
                              f"{metas[number]} has {meta_rows}; the shards are misaligned")
        shards.append((npys[number], metas[number], rows, width))
    return shards


def _numbered(folder: Path, prefix: str, suffix: str) -> dict[int, Path]:
    found = {}
    for path in folder.glob(f"{prefix}*{suffix}") if folder.is_dir() else ():
        number = path.name[len(prefix):-len(suffix)]
        if number.isdigit() and path.is_file():
            found[int(number)] = path
    return found


def _npy_shape(path: Path) -> tuple[int, ...]:
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise CurateError(f"cannot read embeddings {path}: {exc}") from None
    if array.ndim != 2:
        raise CurateError(f"embeddings {path} must be a 2-d array, got shape {array.shape}")
    if array.dtype.kind != "f":
        raise CurateError(f"embeddings {path} must hold floats, got {array.dtype}")
    return array.shape


def _match_keys(table: pa.Table, meta_path: Path) -> tuple[str, str]:
    """(manifest column, metadata column) that join the manifest to the embeddings' metadata."""
    import pyarrow.parquet as pq

    meta_cols = set(pq.read_schema(meta_path).names)
    for manifest_col, candidates in _META_KEYS:
        for meta_col in candidates:
            if manifest_col in table.column_names and meta_col in meta_cols:
                return manifest_col, meta_col
    raise CurateError(f"cannot match the manifest to {meta_path}: it needs a url (or uid) column that the manifest "
                      f"also has; metadata columns: {sorted(meta_cols)}")


class _KeyIndex:
    """The manifest's distinct join keys and, for each, the manifest rows that carry it (CSR).

    Metadata keys are looked up by their 64-bit hash (DuckDB's `hash`) in a hash table of the manifest
    keys' hashes (a pandas UInt64 index), built once; hits are then checked for string equality. So a
    shard costs O(its rows), not O(manifest rows). Colliding manifest hashes fall back to `pc.index_in`.
    """

    def __init__(self, keys: pa.Array):
        import duckdb

        keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
        self.unique = pc.unique(keys.drop_null())
        if keys.null_count == 0 and len(self.unique) == len(keys):  # distinct keys: unique keeps row order
            key_of_row = np.arange(len(keys), dtype=np.int64)
        else:
            key_of_row = pc.index_in(keys, value_set=self.unique).fill_null(-1).to_numpy(zero_copy_only=False)
        has_key = np.flatnonzero(key_of_row >= 0)
        self.rows_by_key = has_key[np.argsort(key_of_row[has_key], kind="stable")]
        self.counts = np.bincount(key_of_row[has_key], minlength=len(self.unique))
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.found = np.zeros(len(self.unique), dtype=bool)
        self._db = duckdb.connect()
        import pandas as pd

        self.by_hash = pd.Index(self._hash(self.unique))
        self.hashed = self.by_hash.is_unique

    def _hash(self, values: pa.Array) -> np.ndarray:
        with self._db.cursor() as db:  # a connection of its own, so calls from several threads never share one
            db.register("_keys", pa.table({"k": values}))
            return db.execute("SELECT hash(k) AS h FROM _keys").fetchnumpy()["h"].astype(np.uint64, copy=False)

    def _key_ids(self, meta_keys: pa.Array) -> np.ndarray:
        """Key id of each metadata row, -1 where the manifest does not hold its key."""
        if not self.hashed:
            return pc.index_in(meta_keys, value_set=self.unique).fill_null(-1).to_numpy(zero_copy_only=False)
        ids = self.by_hash.get_indexer(self._hash(meta_keys)).astype(np.int64, copy=False)
        hit = np.flatnonzero(ids >= 0)
        candidates = ids[hit]
        ids[hit] = -1
        same = pc.equal(meta_keys.take(pa.array(hit)), self.unique.take(pa.array(candidates)))
        same = same.fill_null(False).to_numpy(zero_copy_only=False)
        ids[hit[same]] = candidates[same]
        return ids

    def key_ids(self, meta_keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Key id of each metadata row, -1 where the manifest does not hold its key (thread-safe: reads the
        index only, and hashes on a DuckDB cursor of its own)."""
        if isinstance(meta_keys, pa.ChunkedArray):
            meta_keys = meta_keys.combine_chunks()
        if meta_keys.type != self.unique.type:
            try:
                meta_keys = meta_keys.cast(self.unique.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise CurateError(f"embedding metadata keys cannot be compared with the manifest's: {exc}") from None
        return self._key_ids(meta_keys)

    def claim(self, key_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(metadata row positions, key ids) of the rows whose key is wanted and not found in an earlier
        shard or row: the first embedding of a key wins. Call in shard order."""
        positions = np.flatnonzero(key_ids >= 0)
        key_ids = key_ids[positions]
        _, first = np.unique(key_ids, return_index=True)
        first = np.sort(first[~self.found[key_ids[first]]])
        self.found[key_ids[first]] = True
        return positions[first], key_ids[first]

    def expand(self, key_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(manifest rows, index into key_ids or None for 'one row each') for the manifest rows carrying `key_ids`."""
        counts = self.counts[key_ids]
        if (counts == 1).all():
            return self.rows_by_key[self.starts[key_ids]], None
        source = np.repeat(np.arange(len(key_ids)), counts)
        offsets = np.arange(len(source)) - np.repeat(np.cumsum(counts) - counts, counts)
        return self.rows_by_key[self.starts[key_ids][source] + offsets], source


def iter_precomputed(table: pa.Table, emb_dir: Path, dim: int, model_name: str) -> Iterator[tuple]:
    """Yield (manifest rows, embeddings) chunk by chunk, streaming one mmap-ed shard at a time.

    The next shard's metadata is read and hashed in a background thread while this one is scored.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    shards = embedding_shards(emb_dir)
    for npy, _, _, width in shards:
        if width != dim:
            raise CurateError(f"embeddings {npy} have dimension {width} but model '{model_name}' embeds to {dim}; "
                              "use the model the embeddings were computed with")
    keys = [_match_keys(table, meta) for _, meta, _, _ in shards]  # each shard joins by its own column
    manifest_col = keys[0][0]
    for (_, meta, _, _), (col, _) in zip(shards, keys, strict=True):
        if col != manifest_col:
            raise CurateError(f"{meta} joins the manifest by {col}, but {shards[0][1]} by {manifest_col}: the shards differ")
    index = _KeyIndex(table.column(manifest_col))
    bar = tqdm(total=sum(s[2] for s in shards), unit="row", unit_scale=True, desc="clip score", leave=False)
    with bar, ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_shard_key_ids, index, shards[0][1], keys[0][1])
        for number, (npy, _, rows, _) in enumerate(shards):
            key_ids = pending.result()
            if number + 1 < len(shards):
                pending = pool.submit(_shard_key_ids, index, shards[number + 1][1], keys[number + 1][1])
            positions, key_ids = index.claim(key_ids)
            array = np.load(npy, mmap_mode="r")
            for start in range(0, len(positions), CHUNK_ROWS):
                manifest_rows, source = index.expand(key_ids[start:start + CHUNK_ROWS])
                feats = _gather(array, positions[start:start + CHUNK_ROWS])
                yield manifest_rows, (feats if source is None else feats[source])
            del array
            bar.update(rows)


def _shard_key_ids(index: _KeyIndex, meta: Path, meta_col: str) -> np.ndarray:
    import pyarrow.parquet as pq

    return index.key_ids(pq.read_table(meta, columns=[meta_col]).column(meta_col))


def _gather(array: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Rows of a memory-mapped array (a slice when they are contiguous, else a fancy-index copy), in the
    machine's byte order (torch takes no other)."""
    if len(positions) and positions[-1] - positions[0] == len(positions) - 1:
        rows = np.asarray(array[positions[0]:positions[-1] + 1])
    else:
        rows = array[positions]
    return rows.astype(rows.dtype.newbyteorder("="), copy=False)
