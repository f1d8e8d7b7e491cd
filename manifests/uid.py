"""The uid codec, in one place: stable identifiers for manifest rows."""

from __future__ import annotations

import hashlib


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
