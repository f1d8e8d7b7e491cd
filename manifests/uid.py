"""The uid codec, in one place: stable identifiers for manifest rows, and seeded subsets keyed by uid."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def uid_for_url(url: str, label: int | None = None) -> str:
    """uid of a retrieved row: a hash of its URL.

    With `--multi-class duplicate` one URL yields a row per class; those rows get the
    label appended (`<hash>-<label>`) so that uids stay unique within a manifest.
    """
    uid = _digest(url)
    return uid if label is None else f"{uid}-{label}"


def uid_for_synthetic(task: str, caption: str, seed: int) -> str:
    """uid of a synthetic row: a hash of task name, caption and seed."""
    return _digest(f"{task}\x00{caption}\x00{seed}")


def hashed_subset_rank(uid: str, seed: int) -> int:
    """A seeded pseudo-random rank for deterministic subsets (caps, fractions) independent of row order."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\x00{uid}".encode(), digest_size=8).digest(), "big")


def seeded_ranks(uids: Sequence[str], seed: int) -> np.ndarray:
    """`hashed_subset_rank` of every uid, as uint64: sorting by it is a seeded shuffle independent of row order."""
    return np.fromiter((hashed_subset_rank(uid, seed) for uid in uids), dtype=np.uint64, count=len(uids))


def seeded_subset_per_class(uids: Sequence[str], labels: np.ndarray, seed: int, size: Callable[[int], int]) -> np.ndarray:
    """Boolean mask keeping, in every class of n rows, the `size(n)` rows of smallest seeded rank.

    A smaller size keeps a subset of what a larger one keeps (data-reduction sweeps nest).
    """
    return subset_per_class_by_rank(seeded_ranks(uids, seed), labels, size)


def subset_per_class_by_rank(ranks: np.ndarray, labels: np.ndarray, size: Callable[[int], int]) -> np.ndarray:
    """`seeded_subset_per_class` from ranks already computed (e.g. piece by piece, for rows not all in memory)."""
    labels = np.asarray(labels)
    keep = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        keep[rows[np.argsort(ranks[rows], kind="stable")[: size(len(rows))]]] = True
    return keep
