"""`curate filter`: score a manifest against the task with CLIP and keep the relevant rows (DESIGN §5, §6).

Seed 004's protocol: the cosine of L2-normalised open_clip image and text embeddings (ViT-B-16,
laion2b_s34b_b88k by default). `domain` mode scores a row by its maximum over the task's domain
texts; `classname` mode by the row's class's template-averaged text embedding. Rows are kept when
score >= threshold (0.2), or when they are in the top P % of their class; then, optionally,
decontamination against eval images (curate/decontaminate.py) and a per-class cap.

Image embeddings come from one of two readers in curate/embeddings.py, both yielding (manifest row indices, embeddings):
  * `iter_image_embeddings`: the manifest's images, decoded in DataLoader workers, encoded by the model;
  * `iter_precomputed`: a clip-retrieval folder (img_emb/img_emb_N.npy + metadata/metadata_N.parquet),
    streamed shard by shard and chunk by chunk, matched to the manifest by url (or uid).
`score_embeddings` is the scoring core both share. The image pass is resumable: what it scored goes, chunk by
chunk, to a folder beside OUT (curate/score_store.py) that a re-run of the same command reads back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.choices import FILTER_MODES, check_choice
from curate.decontaminate import COSINE_THRESHOLD, PHASH_DISTANCE
from curate.embeddings import (
    ImageRows,
    float16_map,
    iter_image_embeddings,
    iter_precomputed,
)
from curate.errors import CurateError
from curate.models import DEFAULT_CLIP
from curate.score_store import ScoreStore, chunk_rows, remove_store
from manifests.images import has_images, image_rows, rebase_images
from manifests.uid import seeded_ranks

log = logging.getLogger(__name__)
THRESHOLD = 0.2  # seed 004's keep rule with ViT-B-16

HIST_BINS = 40
MAX_LISTED_UNREADABLE = 1000


@dataclasses.dataclass
class FilterResult:
    """What `filter_images` wrote and counted."""

    out: Path
    report: dict[str, Any]

    @property
    def counts(self) -> dict[str, int]:
        return self.report["counts"]

    def summary(self) -> str:
        c = self.counts
        rule = self.report["rule"]
        return (
            f"filter {self.report['task']}: kept {c['kept']} of {c['input']} rows ({rule}); "
            f"unreadable {c['unreadable']}, no embedding {c['missing_embedding']}, "
            f"below score {c['dropped_score']}, decontaminated {c['decontaminated']}, capped {c['capped']} -> {self.out}"
        )


@dataclasses.dataclass
class _Scored:
    """Scores of every manifest row (NaN = not scored) and what the reader saw."""

    scores: np.ndarray
    unreadable: dict[int, str]
    missing: np.ndarray
    embeddings: np.ndarray | None = None  # float16 (n, d), kept only for decontamination, in a file (see _new_scored)
    phash: np.ndarray | None = None  # uint8 (n, 8), image path only
    embeddings_kept: bool = False  # the embeddings are the score store's, which a resumed run reads again
    resumed: int = 0  # rows whose results an interrupted run had saved


def filter_images(
    task: str | Path,
    manifest: str | Path,
    out: str | Path,
    *,
    clip_model: str = DEFAULT_CLIP[0],
    clip_pretrained: str | None = None,
    mode: str = "domain",
    threshold: float | None = None,
    percentile: float | None = None,
    per_class_cap: int | None = None,
    seed: int = 0,
    embeddings: str | Path | None = None,
    decontaminate: str | Path | None = None,
    phash_distance: int | None = None,
    cosine_threshold: float | None = None,
    batch_size: int = 256,
    workers: int = 2,
    device: str = "auto",
    overwrite: bool = False,
) -> FilterResult:
    """Score every row of `manifest` against `task` with CLIP and write the kept rows to `out`.

    Args:
      clip_pretrained: open_clip tag or checkpoint path; None = the model's default (laion2b_s34b_b88k
        for ViT-B-16, none for builtin tiny-* models); '' = no weights.
      mode: 'domain' (max cosine over the task's domain texts) or 'classname' (the row's class text).
      threshold: keep score >= threshold, in [-1, 1] (None: 0.2); not with `percentile`.
      percentile: keep the top P % (0 < P <= 100) of each class instead (ceil(n * P / 100) rows).
      per_class_cap: then keep at most N rows per class, best scores first.
      seed: seeds the deterministic tie-break (hash of uid) of percentile and cap.
      embeddings: a clip-retrieval folder of precomputed image embeddings; else the manifest's images.
      decontaminate: an eval image folder; drop near-duplicates of its images and inside the kept set.
    Returns a FilterResult; writes OUT/manifest.parquet (+ clip_score), OUT/report.json,
    OUT/score_hist.png and, with `decontaminate`, OUT/decontamination.parquet.
    """
    from curate.models import load_clip, resolve_device, resolve_pretrained
    from curate.tasks import load_task
    from manifests.io import manifest_dir as folder_of
    from manifests.io import manifest_inputs, read_manifest, staged_output_dir

    _refuse_unused(threshold, percentile, decontaminate, phash_distance, cosine_threshold)
    threshold = THRESHOLD if threshold is None else threshold
    phash_distance = PHASH_DISTANCE if phash_distance is None else phash_distance
    cosine_threshold = COSINE_THRESHOLD if cosine_threshold is None else cosine_threshold
    _check_options(mode, threshold, percentile, per_class_cap, batch_size, workers)
    started = time.perf_counter()
    task_obj = load_task(task)
    table = read_manifest(manifest)
    manifest_dir = folder_of(manifest)
    _check_labels(table, task_obj)
    if embeddings is None:
        _check_image_columns(table)
    if decontaminate is not None:  # fail on a bad eval folder before the long scoring pass
        from curate.decontaminate import check_options, list_eval_images

        check_options(phash_distance, cosine_threshold)
        list_eval_images(Path(decontaminate))
    named = [path for path in (embeddings, decontaminate) if path is not None]
    with staged_output_dir(out, overwrite, inputs=itertools.chain(named, manifest_inputs(manifest, table))) as stage:
        device = resolve_device(device)
        pretrained = resolve_pretrained(clip_model, clip_pretrained)
        bundle = load_clip(clip_model, pretrained, device)
        text, texts = _text_matrix(bundle, task_obj, mode, device)
        columns = table.column("label").to_numpy() if mode == "classname" else None
        spill = stage if decontaminate is not None else None  # where every row's embedding waits for it
        if embeddings is not None:
            scored = _score_precomputed(table, Path(embeddings), text, columns, spill, bundle.name)
        else:
            reader = dict(batch_size=batch_size, workers=workers, device=device)
            fingerprint = _score_fingerprint(manifest, table, bundle.name, pretrained, mode, text, batch_size, device,
                                             spill is not None)
            store = ScoreStore(Path(out), fingerprint, table.num_rows, text.shape[0], spill is not None, overwrite)
            scored = _score_images(table, manifest_dir, bundle, text, columns, store, reader)
        selection = _select(table, scored, threshold, percentile, per_class_cap, seed)
        decon = None
        if decontaminate is not None:
            decon = _run_decontamination(table, manifest_dir, decontaminate, scored, selection, bundle, stage,
                                         dict(phash_distance=phash_distance, cosine_threshold=cosine_threshold,
                                              batch_size=batch_size, workers=workers, device=device))
        kept = cap_per_class(selection.keep, scored.scores, selection.labels, selection.tiebreak, per_class_cap)
        settings = dict(task=task_obj, model=(clip_model, pretrained), device=device, mode=mode, texts=texts,
                        threshold=threshold, percentile=percentile, per_class_cap=per_class_cap, seed=seed,
                        embeddings=embeddings, decontaminate=decontaminate, batch_size=batch_size, workers=workers,
                        started=started)
        rebased = rebase_images(table, manifest_dir, Path(out))  # image paths stay valid from OUT
        report = _write_outputs(stage, rebased, scored, selection, kept, decon, settings)
    remove_store(Path(out))
    log.info("filter: kept %d of %d rows -> %s", report["counts"]["kept"], report["counts"]["input"], out)
    return FilterResult(out=Path(out), report=report)


# ---------------------------------------------------------------- options and inputs
def _refuse_unused(threshold, percentile, decontaminate, phash_distance, cosine_threshold) -> None:
    """An option the run would ignore is an error, not a silent no-op (None: not given)."""
    if percentile is not None and threshold is not None:
        raise CurateError("give --threshold or --percentile, not both (--percentile keeps the top P% whatever the scores)")
    if decontaminate is None:
        for option, value in (("--cosine-threshold", cosine_threshold), ("--phash-distance", phash_distance)):
            if value is not None:
                raise CurateError(f"{option} sets how --decontaminate works: give --decontaminate too")


def _check_options(mode, threshold, percentile, per_class_cap, batch_size, workers) -> None:
    check_choice("--mode", mode, FILTER_MODES)
    if threshold is None or not -1.0 <= float(threshold) <= 1.0:
        raise CurateError(f"threshold must be in [-1, 1], got {threshold}")
    if percentile is not None and not 0.0 < float(percentile) <= 100.0:
        raise CurateError(f"percentile must be in (0, 100], got {percentile}")
    if per_class_cap is not None and per_class_cap < 1:
        raise CurateError(f"per-class cap must be at least 1, got {per_class_cap}")
    if batch_size < 1 or workers < 0:
        raise CurateError(f"batch size must be >= 1 and workers >= 0, got {batch_size} and {workers}")


def _check_labels(table: pa.Table, task) -> None:
    """Every label names the task's class of that index (case and Unicode form aside): a manifest made for another task, or
    the same classes in another order, would otherwise be scored against the wrong class texts."""
    from curate.tasks import name_key

    if not table.num_rows:
        return
    top = pc.max(table.column("label")).as_py()
    if top >= len(task.classes):
        raise CurateError(f"manifest label {top} is out of range for task '{task.name}' ({len(task.classes)} classes)")
    pairs = table.select(["label", "class_name"]).group_by(["label", "class_name"]).aggregate([])
    for label, name in zip(pairs.column("label").to_pylist(), pairs.column("class_name").to_pylist(), strict=True):
        if name_key(name) != name_key(task.class_names[label]):
            raise CurateError(f"manifest label {label} is class '{name}', but task '{task.name}' calls it "
                              f"'{task.class_names[label]}': filter with the task the manifest was made for")


def _check_image_columns(table: pa.Table) -> None:
    if not has_images(table):
        raise CurateError("manifest has no images (image_path or shard/key): download them first (curate download) "
                          "or give precomputed embeddings with --embeddings DIR")


def _text_matrix(bundle, task, mode: str, device: str) -> tuple[np.ndarray, list[str]]:
    """(embed_dim, n_texts) float32 normalised text embeddings: domain texts, or one column per class."""
    from curate.models import encode_texts, text_classifier

    if mode == "domain":
        if not task.domain_text:
            raise CurateError(f"task '{task.name}' has no domain_text: add one, or use --mode classname")
        matrix = encode_texts(bundle, list(task.domain_text), device=device).T
        texts = list(task.domain_text)
    else:
        matrix = text_classifier(bundle, task.class_names, list(task.templates), device=device)
        texts = list(task.templates)
    return np.ascontiguousarray(matrix.float().cpu().numpy()), texts


# ---------------------------------------------------------------- scoring core
def score_embeddings(x, text: np.ndarray, columns: np.ndarray | None = None, block: int = 1024) -> np.ndarray:
    """Cosine scores of image embeddings `x` (n, d; fp16 or fp32, normalised or not) against text.

    `text` is (d, T) normalised; with `columns` (n,) each row is scored against its own text column
    (classname mode), else by its maximum over all T columns (domain mode). Works through `block`
    rows at a time in a cache-sized fp32 buffer, on one thread (these small memory-bound steps gain
    nothing from more, and OpenMP threads spin badly on a shared machine). Returns float32 (n,).
    """
    import warnings

    import torch

    with warnings.catch_warnings():  # a read-only memmap slice: only read here, never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        feats = torch.as_tensor(x)
    text_t = torch.as_tensor(text)
    cols = None if columns is None else torch.as_tensor(columns, dtype=torch.long)
    out = torch.empty(len(feats), dtype=torch.float32)
    buffer = torch.empty((min(block, len(feats)), feats.shape[1]), dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for start in range(0, len(feats), block):
            part = buffer[: min(block, len(feats) - start)]
            part.copy_(feats[start:start + len(part)])  # fp16 -> fp32, stays in cache
            if cols is None:
                sims = (part @ text_t).amax(dim=1)
            else:
                sims = (part * text_t.T[cols[start:start + len(part)]]).sum(dim=1)
            out[start:start + len(part)] = sims / torch.linalg.vector_norm(part, dim=1).clamp_min(1e-12)
    finally:
        torch.set_num_threads(threads)
    return out.numpy()


def _new_scored(n: int, embeddings: np.ndarray | None = None, embeddings_kept: bool = False) -> _Scored:
    """Empty results for n rows. `embeddings` (n, d), for decontamination to come, is a file's memory map:
    10 M rows of ViT-B-16 are 10 GB, of which decontamination reads only the rows that pass the score rule.
    The image path keeps their phash too."""
    return _Scored(
        scores=np.full(n, np.nan, dtype=np.float32),
        unreadable={},
        missing=np.zeros(n, dtype=bool),
        embeddings=embeddings,
        phash=np.zeros((n, 8), dtype=np.uint8) if embeddings_kept else None,
        embeddings_kept=embeddings_kept,
    )


def _spilled_zeros(folder: Path, shape: tuple[int, int]) -> np.ndarray:
    """Zeros in a file with no name (freed when unmapped, even if the process is killed)."""
    with tempfile.TemporaryFile(dir=folder) as handle:  # the mapping keeps its own descriptor
        return float16_map(handle, shape)


def _score_fingerprint(manifest, table, model: str, pretrained, mode: str, text: np.ndarray, batch_size: int,
                       device: str, decontaminate: bool) -> dict[str, Any]:
    """What the image pass's scores depend on (a resumed run must not mix scores of other settings): also the
    kind of device, since CUDA encodes in float16 and the CPU in float32."""
    from manifests.io import manifest_stamp

    return {**manifest_stamp(manifest), "rows": table.num_rows, "model": model, "pretrained": pretrained, "mode": mode,
            "texts": hashlib.sha256(np.ascontiguousarray(text).tobytes()).hexdigest(),
            "batch_size": batch_size, "chunk_rows": chunk_rows(batch_size), "device": device.split(":")[0],
            "decontaminate": decontaminate}


class _Picked:
    """rows[picks[i]] as a sequence (the rows an image pass has left to score); plain, so workers can pickle it."""

    def __init__(self, rows, picks: np.ndarray):
        self.rows, self.picks = rows, picks

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, index: int):
        return self.rows[int(self.picks[index])]


def _score_images(table, manifest_dir, bundle, text, columns, store: ScoreStore, reader) -> _Scored:
    """Score the manifest's images, resuming from `store`; each finished chunk of rows is saved there."""
    n = table.num_rows
    scored = _new_scored(n, store.embeddings, embeddings_kept=store.embeddings is not None)
    todo = np.flatnonzero(store.load(scored.scores, scored.unreadable, scored.phash))
    scored.resumed = n - len(todo)
    if scored.resumed:
        log.info("resuming: %d of %d rows were scored by an interrupted run (%s)", scored.resumed, n, store.folder)
    if len(todo):
        pending = list(np.unique(todo // store.chunk) * store.chunk)[::-1]  # starts of the chunks to score, last first
        dataset = ImageRows(_Picked(image_rows(table), todo), manifest_dir, bundle.preprocess_val, bundle.image_size,
                            with_phash=scored.phash is not None)
        for indices, feats, digests, errors, ok in iter_image_embeddings(bundle, dataset, desc="clip score", **reader):
            indices = todo[indices]
            _record_batch(scored, indices, feats, digests, errors, ok, text, columns)
            while pending and min(pending[-1] + store.chunk, n) <= indices[-1] + 1:  # batches arrive in row order
                store.save(int(pending.pop()), scored.scores, scored.unreadable, scored.phash)
    if scored.unreadable:
        log.warning("%d image(s) could not be read and were skipped", len(scored.unreadable))
    return scored


def _record_batch(scored: _Scored, indices, feats, digests, errors, ok, text, columns) -> None:
    for index, error in zip(indices[~ok], np.asarray(errors, dtype=object)[~ok], strict=True):
        scored.unreadable[int(index)] = error
    if feats is None:
        return
    good = indices[ok]
    scored.scores[good] = score_embeddings(feats[ok], text, None if columns is None else columns[good])
    if scored.embeddings is not None:
        scored.embeddings[good] = feats[ok]
        scored.phash[good] = digests[ok]


def _score_precomputed(table, emb_dir: Path, text, columns, spill: Path | None, model_name: str) -> _Scored:
    if not emb_dir.is_dir():
        raise CurateError(f"embeddings folder not found: {emb_dir}")
    kept = None if spill is None else _spilled_zeros(spill, (table.num_rows, text.shape[0]))
    scored = _new_scored(table.num_rows, kept)
    for rows, feats in iter_precomputed(table, emb_dir, text.shape[0], model_name):
        scored.scores[rows] = score_embeddings(feats, text, None if columns is None else columns[rows])
        if scored.embeddings is not None:
            norms = np.linalg.norm(feats.astype(np.float32), axis=1, keepdims=True).clip(1e-12)
            scored.embeddings[rows] = feats / norms
    scored.missing = np.isnan(scored.scores)
    if scored.missing.any():
        log.warning("%d manifest row(s) have no precomputed embedding and were dropped", int(scored.missing.sum()))
    return scored


# ---------------------------------------------------------------- selection (pure functions over arrays)
@dataclasses.dataclass
class _Selection:
    keep: np.ndarray  # rows passing the score rule
    labels: np.ndarray
    tiebreak: np.ndarray | None  # seeded hash of the uid, for percentile and cap


def _select(table, scored: _Scored, threshold, percentile, per_class_cap, seed) -> _Selection:
    labels = table.column("label").to_numpy()
    tiebreak = None
    if percentile is not None or per_class_cap is not None:
        tiebreak = seeded_ranks(table.column("uid").to_pylist(), seed)  # breaks score ties, the same every run
    keep = select_by_score(scored.scores, labels, tiebreak, threshold=threshold, percentile=percentile)
    return _Selection(keep=keep, labels=labels, tiebreak=tiebreak)


def rank_within_class(candidates: np.ndarray, scores, labels, tiebreak) -> tuple[np.ndarray, np.ndarray]:
    """Candidates ordered by (label, score descending, tie-break), and each one's rank inside its class."""
    order = candidates[np.lexsort((tiebreak[candidates], -scores[candidates], labels[candidates]))]
    sorted_labels = labels[order]
    _, starts, counts = np.unique(sorted_labels, return_index=True, return_counts=True)
    ranks = np.arange(len(order)) - np.repeat(starts, counts)
    return order, ranks


def select_by_score(scores, labels, tiebreak, threshold: float = 0.2, percentile: float | None = None) -> np.ndarray:
    """Mask of rows to keep: score >= threshold, or (percentile) the top ceil(n_c * P / 100) of each
    class c by score, ties broken by `tiebreak`. Unscored (NaN) rows are never kept."""
    scored = ~np.isnan(scores)
    if percentile is None:
        return scored & (np.nan_to_num(scores, nan=-np.inf) >= threshold)
    keep = np.zeros(len(scores), dtype=bool)
    order, ranks = rank_within_class(np.flatnonzero(scored), scores, labels, tiebreak)
    _, counts = np.unique(labels[order], return_counts=True)
    # the tolerance keeps float noise (30 % of 10 is 3.0000000000000004) from adding a row; any share of a
    # class is at least one row, however small P is
    quota = np.maximum(np.ceil(counts * (percentile / 100.0) - 1e-9), 1).astype(np.int64)
    keep[order[ranks < np.repeat(quota, counts)]] = True
    return keep


def cap_per_class(keep: np.ndarray, scores, labels, tiebreak, cap: int | None) -> np.ndarray:
    """Keep at most `cap` of the kept rows per class, best scores first (ties by `tiebreak`)."""
    if cap is None:
        return keep
    order, ranks = rank_within_class(np.flatnonzero(keep), scores, labels, tiebreak)
    capped = np.zeros(len(keep), dtype=bool)
    capped[order[ranks < cap]] = True
    return capped


# ---------------------------------------------------------------- decontamination
def _run_decontamination(table, manifest_dir, eval_dir, scored: _Scored, selection: _Selection, bundle, stage: Path,
                         options):
    """Decontaminate the rows passing the score rule; clears `selection.keep` for the dropped ones.

    Consumes `scored.embeddings`: the passing rows are moved to its front in place, so it no longer lines up
    with the table, and it is dropped at the end (which unmaps the nameless file and frees its space). The
    score store's embeddings, which a resumed run reads again, are copied instead (to a nameless file in `stage`)."""
    from curate.decontaminate import decontaminate

    rows = np.flatnonzero(selection.keep)
    if scored.embeddings_kept:
        train_embeddings = _copied_rows(scored.embeddings, rows, stage)
    else:
        train_embeddings = _front_rows(scored.embeddings, rows)
    result = decontaminate(
        table.take(pa.array(rows)), manifest_dir, eval_dir, bundle=bundle,
        train_embeddings=train_embeddings,
        train_phash=None if scored.phash is None else scored.phash[rows],
        **options,
    )
    selection.keep[rows[~result.keep]] = False
    scored.embeddings = None
    return result


def _front_rows(array: np.ndarray, rows: np.ndarray, block: int = 65536) -> np.ndarray:
    """array[rows] as a view of the first len(rows) rows, moved there in place (array may be a memory map:
    a fancy-indexed copy would bring every passing row into memory). Safe because rows ascend: a row is
    never overwritten before it is moved."""
    for start in range(0, len(rows), block):
        part = rows[start : start + block]
        array[start : start + len(part)] = array[part]
    return array[: len(rows)]


def _copied_rows(array: np.ndarray, rows: np.ndarray, stage: Path, block: int = 65536) -> np.ndarray:
    """array[rows] in a nameless memory-mapped file in `stage`, a block at a time (as `_front_rows`, without
    writing to `array`)."""
    copy = _spilled_zeros(stage, (len(rows), array.shape[1]))
    for start in range(0, len(rows), block):
        part = rows[start : start + block]
        copy[start : start + len(part)] = array[part]
    return copy


# ---------------------------------------------------------------- outputs
def _write_outputs(stage: Path, table, scored: _Scored, selection: _Selection, kept, decon, settings) -> dict:
    from manifests.io import write_manifest, write_report

    rows = np.flatnonzero(kept)
    out_table = _with_scores(table.take(pa.array(rows, type=pa.int64())), scored.scores[rows])
    write_manifest(out_table, stage / "manifest.parquet")
    if decon is not None:
        decon.write(stage / "decontamination.parquet")
    report = _report(table, scored, selection, kept, decon, settings)
    _plot_histogram(stage / "score_hist.png", report)
    return write_report(stage, report)


def _with_scores(table: pa.Table, scores: np.ndarray) -> pa.Table:
    column = pa.array(scores.astype(np.float32), type=pa.float32())
    if "clip_score" in table.column_names:
        return table.set_column(table.column_names.index("clip_score"), "clip_score", column)
    return table.append_column("clip_score", column)


def _report(table, scored: _Scored, selection: _Selection, kept, decon, settings) -> dict[str, Any]:
    task, (model, pretrained) = settings["task"], settings["model"]
    seconds = time.perf_counter() - settings["started"]
    valid = ~np.isnan(scored.scores)
    decon_dropped = 0 if decon is None else int((~decon.keep).sum())
    counts = {
        "input": table.num_rows,
        "scored": int(valid.sum()),
        "unreadable": len(scored.unreadable),
        "missing_embedding": int(scored.missing.sum()),
        "dropped_score": int(valid.sum() - selection.keep.sum() - decon_dropped),
        "decontaminated": decon_dropped,
        "capped": int(selection.keep.sum() - kept.sum()),
        "kept": int(kept.sum()),
        "dropped": int(table.num_rows - kept.sum()),
    }
    return {
        "stage": "filter",
        "task": task.name,
        "model": {"name": model, "pretrained": pretrained},
        "device": settings["device"],
        "batch_size": settings["batch_size"],
        "workers": settings["workers"],
        "mode": settings["mode"],
        "texts": settings["texts"],
        "rule": _rule_text(settings),
        "threshold": None if settings["percentile"] is not None else settings["threshold"],
        "percentile": settings["percentile"],
        "per_class_cap": settings["per_class_cap"],
        "seed": settings["seed"],
        "source": "embeddings" if settings["embeddings"] is not None else "images",
        "embeddings": None if settings["embeddings"] is None else str(settings["embeddings"]),
        "counts": counts,
        "per_class": _per_class(task, selection.labels, valid, kept),
        "score_stats": _score_stats(scored.scores[valid]),
        "histogram": _histogram(scored.scores, kept),
        "unreadable_rows": _unreadable_rows(table, scored.unreadable),
        "decontamination": None if decon is None else decon.summary(),
        "rows_resumed": scored.resumed,  # scored by an interrupted run, not in this run's seconds
        "seconds": round(seconds, 3),
        "rows_per_s": round((table.num_rows - scored.resumed) / seconds, 1) if seconds > 0 else None,
    }


def _rule_text(settings) -> str:
    if settings["percentile"] is not None:
        rule = f"top {settings['percentile']:g}% per class"
    else:
        rule = f"score >= {settings['threshold']:g}"
    if settings["per_class_cap"] is not None:
        rule += f", cap {settings['per_class_cap']} per class"
    return f"{settings['mode']} {rule}"


def _per_class(task, labels, valid, kept) -> dict[str, dict[str, int]]:
    n = len(task.classes)
    total = np.bincount(labels, minlength=n)
    scored = np.bincount(labels[valid], minlength=n)
    kept_n = np.bincount(labels[kept], minlength=n)
    return {
        name: {"input": int(total[i]), "scored": int(scored[i]), "kept": int(kept_n[i]), "dropped": int(total[i] - kept_n[i])}
        for i, name in enumerate(task.class_names)
    }


def _score_stats(values: np.ndarray) -> dict[str, float | None]:
    if not len(values):
        return {"min": None, "mean": None, "median": None, "max": None}
    return {k: round(float(f(values)), 6) for k, f in
            (("min", np.min), ("mean", np.mean), ("median", np.median), ("max", np.max))}


def _histogram(scores: np.ndarray, kept: np.ndarray) -> dict[str, list]:
    """HIST_BINS bins over the observed score range: all scored rows, and the kept ones."""
    valid = ~np.isnan(scores)
    if not valid.any():
        return {"edges": [], "counts": [], "kept": []}
    low, high = float(scores[valid].min()), float(scores[valid].max())
    if high - low < 1e-6:
        low, high = low - 0.01, high + 0.01
    edges = np.linspace(low, high, HIST_BINS + 1)
    counts, _ = np.histogram(scores[valid], bins=edges)
    kept_counts, _ = np.histogram(scores[kept], bins=edges)
    return {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist(), "kept": kept_counts.tolist()}


def _unreadable_rows(table, unreadable: dict[int, str]) -> list[dict[str, str]]:
    listed = sorted(unreadable)[:MAX_LISTED_UNREADABLE]
    if not listed:
        return []
    sub = image_rows(table.take(pa.array(listed, type=pa.int64())))
    return [{**row, "error": unreadable[i]} for i, row in zip(listed, sub)]


def _plot_histogram(path: Path, report: dict) -> None:
    """Stacked histogram of scores, kept vs dropped, with the threshold marked (threshold rule)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = report["histogram"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if hist["edges"]:
        edges = np.asarray(hist["edges"])  # all rows in red, kept rows drawn over them in green
        ax.stairs(np.asarray(hist["counts"]), edges, fill=True, color="#d62728", alpha=0.6, label="dropped")
        ax.stairs(np.asarray(hist["kept"]), edges, fill=True, color="#2ca02c", alpha=0.9, label="kept")
    if report["threshold"] is not None:
        ax.axvline(report["threshold"], color="black", linestyle="--", label=f"threshold {report['threshold']:g}")
    ax.set_xlabel(f"CLIP score ({report['mode']}, {report['model']['name']})")
    ax.set_ylabel("rows")
    ax.set_title(f"{report['task']}: kept {report['counts']['kept']} of {report['counts']['scored']} scored ({report['rule']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
