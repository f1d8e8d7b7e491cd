"""Training and evaluation data: manifest datasets, the eval ImageFolder, train fractions, mixing.

* Train data come from one or more manifests (rows with `image_path` relative to the manifest's
  folder, or a webdataset `shard` + `key`); labels are mapped to the eval task by class name.
* Eval data is an ImageFolder `DIR/{train,val,test}/<class name>/*` whose folders are the eval
  task's class names (or their file-system-safe form).
* `stratified_fraction` keeps a seeded fraction of every class (nested across fractions).
* `BatchPlan` is the batch sampler: plain shuffling, MixData (one stream, each sample drawn from a
  source by weight) or MixLoss (each batch made of per-source parts whose losses are summed).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.choices import MIX_MODES, check_choice
from curate.errors import CurateError
from curate.tasks import name_key
from manifests import IMAGE_LOCATION_COLUMNS, manifest_dir, read_manifest
from manifests.export import CLASSES_FILE, read_class_folders
from manifests.images import (
    IMAGE_SUFFIXES,
    has_images,
    image_rows,
    open_image,
    safe_name,
)
from manifests.io import input_report, manifest_file
from manifests.uid import seeded_subset_per_class

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class TrainSource:
    """One training manifest, after label mapping and the train fraction."""

    path: Path
    manifest_dir: Path
    table: pa.Table  # the rows used: uid, source and image location columns only
    labels: np.ndarray
    rows_total: int
    provenance: dict[str, Any]

    @property
    def rows(self) -> int:
        return self.table.num_rows


class SeededSamples:
    """A dataset asked for (index, seed) pairs: a sample's random augmentation follows its seed alone, so which
    loader process draws it (--workers) does not change the run. The caller's random state is left as it was."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        import torch

        index, seed = key
        generator = torch.default_generator  # torchvision's random transforms draw from it
        state = generator.get_state()
        generator.manual_seed(seed)  # not torch.manual_seed, which seeds every CUDA device too (100 µs a call)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


class ManifestDataset:
    """(image tensor, label, source index) for the rows of one TrainSource."""

    def __init__(self, source: TrainSource, transform, source_index: int = 0):
        self.rows = image_rows(source.table)  # Arrow-backed: no Python object per row
        self.labels = source.labels
        self.manifest_dir = source.manifest_dir
        self.transform = transform
        self.source_index = source_index

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = open_image(self.rows[index], self.manifest_dir)
        return self.transform(image), int(self.labels[index]), self.source_index


class ImageListDataset:
    """(image tensor, label) for a list of (path, label) pairs."""

    def __init__(self, samples: list[tuple[Path, int]], transform):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = open_image({"uid": path.name, "image_path": path.name}, path.parent)
        except CurateError as exc:
            raise CurateError(f"cannot read eval image {path}: {exc}") from None
        return self.transform(image), label


def one_line_error(exc: CurateError) -> CurateError:
    """A CurateError re-raised by a DataLoader worker carries the worker's traceback: keep its message only."""
    lines = str(exc).strip().splitlines()
    last = lines[-1] if lines else ""
    marker = "CurateError: "
    return CurateError(last.split(marker, 1)[1] if marker in last else last)


# ---------------------------------------------------------------- train manifests
def load_train_sources(paths: list[str | Path], class_names: list[str], fraction: float = 1.0, seed: int = 0) -> list[TrainSource]:
    """Read every train manifest, map its classes onto the eval task, keep a stratified fraction."""
    if not paths:
        raise CurateError("no train manifest given (use --train MANIFEST, or --eval-only)")
    if not 0 < fraction <= 1:
        raise CurateError(f"--train-fraction must be in (0, 1], got {fraction}")
    files = [manifest_file(p) for p in paths]
    for i, path in enumerate(files):
        twin = next((paths[j] for j in range(i) if files[j].resolve() == path.resolve()), None)
        if twin is not None:
            raise CurateError(f"--train {paths[i]} and --train {twin} are the same manifest: give it once")
    sources = [_load_source(Path(p), class_names, fraction, seed) for p in paths]
    _warn_shared_rows(sources)
    return sources


def _warn_shared_rows(sources: list[TrainSource]) -> None:
    """Two manifests holding the same uids train on those images twice (a filtered set beside the set it came from)."""
    if len(sources) < 2:
        return
    seen = pc.unique(sources[0].table.column("uid").combine_chunks())  # the distinct uids of the manifests so far
    for index, source in enumerate(sources[1:], start=2):
        uids = pc.unique(source.table.column("uid").combine_chunks())
        shared = pc.sum(pc.is_in(uids, value_set=seen)).as_py() or 0
        if shared:
            log.warning("train manifest %s shares %d uid(s) with the manifests before it: those images are trained on "
                        "more than once an epoch", source.path, shared)
        if index < len(sources):
            seen = pc.unique(pa.concat_arrays([seen, uids]))


def _load_source(path: Path, class_names: list[str], fraction: float, seed: int) -> TrainSource:
    table = read_manifest(path, columns=IMAGE_LOCATION_COLUMNS)  # only what training uses: no url, matched text or metadata
    folder = manifest_dir(path)
    if table.num_rows == 0:
        raise CurateError(f"train manifest {path} is empty")
    if not has_images(table):
        raise CurateError(f"train manifest {path} has no images (no image_path, no shard/key): run curate download first")
    labels = map_labels(table, class_names, where=f"train manifest {path}")
    used = table.select([c for c in ("uid", "source", *IMAGE_LOCATION_COLUMNS) if c in table.column_names])
    if fraction < 1:  # else every row, in order: no copy
        keep = stratified_fraction(table.column("uid").to_pylist(), labels, fraction, seed)
        used, labels = used.take(pa.array(keep)), labels[keep]
    return TrainSource(path, folder, used, labels, table.num_rows, _provenance(folder))


def map_labels(table: pa.Table, class_names: list[str], where: str) -> np.ndarray:
    """The eval task's label of every row, found by class name; CurateError naming unknown classes."""
    index = {name_key(name): i for i, name in enumerate(class_names)}
    encoded = table.column("class_name").combine_chunks().dictionary_encode()  # one string per distinct name
    names = encoded.dictionary.to_pylist()
    unknown = sorted({n for n in names if name_key(n) not in index})
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise CurateError(f"{where} has {len(unknown)} class(es) not in the eval task: {shown}")
    lookup = np.array([index[name_key(n)] for n in names], dtype=np.int64)
    labels = lookup[encoded.indices.to_numpy(zero_copy_only=False)]
    moved = int((labels != table.column("label").to_numpy()).sum())
    if moved:
        log.warning("%s: %d rows relabelled to the eval task's label of their class name", where, moved)
    return labels


def stratified_fraction(uids: list[str], labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Row indices keeping round(F * n_c) rows (at least 1) of every class c, chosen by a seeded hash.

    The choice depends on the uids, not on row order, and smaller fractions are subsets of larger ones.
    """
    if fraction >= 1:
        return np.arange(len(uids))
    return np.flatnonzero(seeded_subset_per_class(uids, labels, seed, lambda n: max(1, round(fraction * n))))


def _provenance(folder: Path) -> dict[str, Any]:
    """The parts of the manifest's report.json that say where its rows came from ({} without a readable one)."""
    report = input_report(folder)
    wanted = ("stage", "task", "command", "seed", "seeds", "threshold", "thresholds", "counts", "rows", "generator")
    return {k: report[k] for k in wanted if k in report}


# ---------------------------------------------------------------- eval ImageFolder
def scan_eval_folder(root: str | Path, class_names: list[str], splits: tuple[str, ...] = SPLITS) -> dict[str, list[tuple[Path, int]]]:
    """(image path, label) lists per split of `root/{split}/<class name>/*`; CurateError on any mismatch.

    A folder is a class's name or its file-system-safe form (case and Unicode form aside); where a split
    holds the ImageFolder exporter's classes.txt, that file says which class each folder is."""
    root = Path(root)
    if not root.is_dir():
        raise CurateError(f"eval data folder not found: {root}")
    missing = [s for s in splits if not (root / s).is_dir()]
    if missing:
        raise CurateError(f"eval data {root} is missing split folder(s): {', '.join(missing)} (expected {'/'.join(splits)})")
    labels = {name_key(name): label for label, name in enumerate(class_names)}
    safe: dict[str, set[int]] = {}
    for label, name in enumerate(class_names):
        safe.setdefault(name_key(safe_name(name)), set()).add(label)
    return {split: _scan_split(root / split, labels, safe, class_names) for split in splits}


def _scan_split(folder: Path, labels: dict[str, int], safe: dict[str, set[int]], class_names: list[str]) -> list[tuple[Path, int]]:
    folders = sorted(p for p in folder.iterdir() if p.is_dir())
    exported = _exported_folders(folder, labels)
    samples = []
    for sub in folders:
        label = _folder_label(sub, exported, labels, safe, class_names)
        samples += [(path, label) for path in sorted(sub.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
    if not samples:
        raise CurateError(f"eval folder {folder} has no images")
    return samples


def check_every_class(root: str | Path, samples: dict[str, list[tuple[Path, int]]], class_names: list[str]) -> None:
    """CurateError if a split has no image of some class: the probe could never predict it, and accuracy would
    be over fewer classes than the task has."""
    for split, pairs in samples.items():
        absent = sorted(set(range(len(class_names))) - {label for _, label in pairs})
        if absent:
            named = ", ".join(repr(class_names[label]) for label in absent[:5]) + (", ..." if len(absent) > 5 else "")
            raise CurateError(f"eval folder {Path(root) / split} has no images of {len(absent)} class(es) of the "
                              f"task: {named}")


def _folder_label(sub: Path, exported: dict[str, int], labels: dict[str, int], safe: dict[str, set[int]],
                  class_names: list[str]) -> int:
    key = name_key(sub.name)
    if key in exported:
        return exported[key]
    if key in labels:
        return labels[key]
    candidates = sorted(safe.get(key, ()))
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        named = " or ".join(repr(class_names[c]) for c in candidates)
        raise CurateError(f"eval folder {sub} could be class {named} (both make that folder name); "
                          f"add the exporter's {CLASSES_FILE} to say which")
    raise CurateError(f"eval folder {sub.parent} has a folder that is not a class of the eval task: {sub.name!r}")


def _exported_folders(folder: Path, labels: dict[str, int]) -> dict[str, int]:
    """Folder (as name_key) -> label from an ImageFolder export's classes.txt, if the split has one (the exporter
    keeps folder names distinct case aside)."""
    named = read_class_folders(folder) or {}
    strangers = [name for name in named.values() if name_key(name) not in labels]
    if strangers:
        raise CurateError(f"{folder / CLASSES_FILE} lists class {strangers[0]!r}, which is not a class of the eval task")
    return {name_key(sub): labels[name_key(name)] for sub, name in named.items()}


# ---------------------------------------------------------------- batches and mixing
def parse_mix(mix: str | list[float] | None, n_sources: int) -> list[float] | None:
    """Mixing weights (normalised to sum 1), one per train manifest, or None."""
    if mix is None or mix == "":
        return None
    try:
        weights = [float(w) for w in (mix.split(",") if isinstance(mix, str) else mix)]
    except ValueError:
        raise CurateError(f"--mix must be comma-separated numbers, got {mix!r}") from None
    if len(weights) != n_sources:
        raise CurateError(f"--mix has {len(weights)} weight(s) but {n_sources} --train manifest(s) were given")
    if any(w < 0 or not math.isfinite(w) for w in weights) or max(weights) <= 0:
        raise CurateError(f"--mix weights must be >= 0 with a positive sum, got {mix!r}")
    scaled = [w / max(weights) for w in weights]  # huge weights (1e308) must not overflow the sum
    return [w / sum(scaled) for w in scaled]


class BatchPlan:
    """Batch sampler over the concatenated sources; the order depends only on (seed, epoch).

    An epoch has ceil(total / batch_size) batches (total = all sources' rows), the last one smaller, so
    every mode sees about `total` images per epoch. Without weights it is a shuffle of all rows. With
    weights, MixData ("data") draws each sample's source by weight; MixLoss ("loss") gives each source a
    fixed share round(w * size) of every batch. A source drawn more often than it has rows is cycled
    through fresh permutations.
    """

    def __init__(self, sizes: list[int], batch_size: int, weights: list[float] | None = None, mode: str = "data", seed: int = 0):
        check_choice("--mix-mode", mode, MIX_MODES)
        self.sizes, self.batch_size, self.weights, self.mode, self.seed = list(sizes), batch_size, weights, mode, seed
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(sum(self.sizes) / self.batch_size)

    def __iter__(self):
        """Batches of (index, augmentation seed): see SeededSamples."""
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        for batch in self.batches(self.epoch):
            yield list(zip(batch, rng.integers(0, 2**63, size=len(batch)).tolist(), strict=True))

    def batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        total = sum(self.sizes)
        if self.weights is None:
            order = rng.permutation(total)
            return [order[i : i + self.batch_size].tolist() for i in range(0, total, self.batch_size)]
        streams = [_Stream(size, offset, rng) for size, offset in zip(self.sizes, self.offsets)]
        if self.mode == "data":
            choice = rng.choice(len(self.sizes), size=total, p=self.weights)
            order = [streams[s].next() for s in choice]
            return [order[i : i + self.batch_size] for i in range(0, total, self.batch_size)]
        sizes = [min(self.batch_size, total - start) for start in range(0, total, self.batch_size)]
        return [[streams[s].next() for s, share in enumerate(self._shares(size)) for _ in range(share)] for size in sizes]

    def _shares(self, size: int) -> list[int]:
        """Rows of each source in a MixLoss batch: w * size, rounded so that they add up to `size` (largest
        remainders first), then at least one of every source with weight while the batch has room."""
        exact = [w * size for w in self.weights]
        shares = [math.floor(x) for x in exact]
        by_remainder = sorted(range(len(exact)), key=lambda i: (shares[i] - exact[i], i))
        for i in by_remainder[: size - sum(shares)]:
            shares[i] += 1
        for i in [i for i, w in enumerate(self.weights) if w > 0 and shares[i] == 0]:
            donor = max(range(len(shares)), key=lambda j: (shares[j], -j))
            if shares[donor] > 1:
                shares[donor], shares[i] = shares[donor] - 1, 1
        return shares


class _Stream:
    """Endless seeded permutations of one source's global indices."""

    def __init__(self, size: int, offset: int, rng: np.random.Generator):
        self.size, self.offset, self.rng = size, int(offset), rng
        self.order: list[int] = []

    def next(self) -> int:
        if not self.order:
            self.order = (self.rng.permutation(self.size) + self.offset).tolist()[::-1]
        return self.order.pop()
