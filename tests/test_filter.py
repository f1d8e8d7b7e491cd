"""curate filter: CLIP scoring (image path and precomputed embeddings), selection rules, report, CLI errors.

Offline: the builtin `tiny-clip` model on CPU and generated images.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers_cli import assert_cli_error
from helpers_images import (
    SHAPES_TASK,
    TINY,
    add_rows,
    embed_manifest,
    make_image,
    make_image_manifest,
    write_clip_retrieval,
    write_task_file,
)

from curate.cli import cli
from curate.errors import CurateError
from curate.filter import (
    _front_rows,
    cap_per_class,
    filter_images,
    score_embeddings,
    select_by_score,
)
from manifests.io import read_manifest, write_manifest

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A task and a manifest of 5 + 4 + 3 generated images."""
    root = tmp_path_factory.mktemp("shapes")
    return write_task_file(root, SHAPES_TASK), make_image_manifest(root, per_class=[5, 4, 3])


@pytest.fixture(scope="module")
def tiny():
    from curate.models import load_clip

    return load_clip("tiny-clip", None)


def _expected_scores(bundle, manifest: Path, text: np.ndarray, columns=None) -> np.ndarray:
    """Scores computed by hand: encode each image, cosine with the text matrix (d, T)."""
    sims = embed_manifest(bundle, manifest) @ text
    return sims.max(axis=1) if columns is None else sims[np.arange(len(sims)), columns]


def _run(task, manifest, out, **options):
    return filter_images(task, manifest, out, **{**TINY, **options})


def test_threshold_minus_one_keeps_every_row_with_its_score(shapes, tiny, tmp_path):
    from curate.models import encode_texts

    task, manifest = shapes
    result = _run(task, manifest, tmp_path / "out", threshold=-1)
    table = read_manifest(tmp_path / "out")
    source = read_manifest(manifest)
    assert result.counts["kept"] == table.num_rows == 12
    assert table.column("uid").to_pylist() == source.column("uid").to_pylist()  # order kept
    assert table.schema.field("clip_score").type == pa.float32()
    assert set(source.column_names) < set(table.column_names)
    text = encode_texts(tiny, ["a photo of a shape"]).numpy().T
    expected = _expected_scores(tiny, manifest, text)
    np.testing.assert_allclose(table.column("clip_score").to_numpy(), expected, atol=1e-5)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["counts"]["scored"] == 12 and report["counts"]["dropped"] == 0
    assert sum(report["histogram"]["counts"]) == 12 and len(report["histogram"]["edges"]) == 41
    assert report["per_class"]["green square"] == {"input": 4, "scored": 4, "kept": 4, "dropped": 0}
    assert report["model"] == {"name": "tiny-clip", "pretrained": None}
    assert (report["batch_size"], report["workers"], report["device"]) == (TINY["batch_size"], TINY["workers"], "cpu")
    assert (tmp_path / "out" / "score_hist.png").stat().st_size > 1000


@pytest.mark.filterwarnings("ignore:No artists with labels found")  # the recorded stairs draw nothing
def test_threshold_splits_rows_at_the_score(shapes, tmp_path, monkeypatch):
    import matplotlib.axes

    task, manifest = shapes
    all_scores = _run(task, manifest, tmp_path / "all", threshold=-1).report
    scores = read_manifest(tmp_path / "all").column("clip_score").to_numpy()
    cut = float(np.sort(scores)[6] + np.sort(scores)[7]) / 2  # between the 7th and 8th score
    stairs, lines = [], []
    monkeypatch.setattr(matplotlib.axes.Axes, "stairs", lambda ax, values, edges, **kw: stairs.append((values, edges)))
    monkeypatch.setattr(matplotlib.axes.Axes, "axvline", lambda ax, x, **kw: lines.append(x))
    result = _run(task, manifest, tmp_path / "cut", threshold=cut)
    kept = read_manifest(tmp_path / "cut").column("clip_score").to_numpy()
    assert result.counts["kept"] == 5 and (kept >= cut).all()
    assert result.counts["dropped_score"] == 7
    # score_hist.png: every scored row, then the kept ones over them, on the same bins; the threshold marked
    (all_counts, edges), (kept_counts, kept_edges) = stairs
    bins = np.linspace(scores.min(), scores.max(), 41)  # 40 bins over the scored range (the report rounds them)
    np.testing.assert_allclose(edges, bins, atol=1e-5)
    assert np.array_equal(kept_edges, edges)
    assert all_counts.tolist() == np.histogram(scores, bins=bins)[0].tolist() and all_counts.sum() == 12
    assert kept_counts.tolist() == np.histogram(kept, bins=bins)[0].tolist() and kept_counts.sum() == 5
    assert lines == [cut]
    assert _run(task, manifest, tmp_path / "none", threshold=1.0).counts["kept"] == 0
    assert all_scores["threshold"] == -1


def test_percentile_keeps_the_top_half_of_each_class(shapes, tmp_path):
    task, manifest = shapes
    result = _run(task, manifest, tmp_path / "p50", percentile=50)
    per_class = result.report["per_class"]
    assert [per_class[c]["kept"] for c in ("red circle", "green square", "blue triangle")] == [3, 2, 2]  # ceil
    assert result.report["threshold"] is None and result.report["percentile"] == 50
    everything = read_manifest(_run(task, manifest, tmp_path / "all", threshold=-1).out).to_pandas()
    kept = set(read_manifest(tmp_path / "p50").column("uid").to_pylist())
    for label, group in everything.groupby("label"):
        top = group.sort_values("clip_score", ascending=False).uid.tolist()
        assert set(top[: (len(top) + 1) // 2]) <= kept and not set(top[(len(top) + 1) // 2:]) & kept


def test_per_class_cap_keeps_the_best_scores(shapes, tmp_path):
    task, manifest = shapes
    result = _run(task, manifest, tmp_path / "cap", threshold=-1, per_class_cap=2)
    assert result.counts["kept"] == 6 and result.counts["capped"] == 6
    table = read_manifest(tmp_path / "cap").to_pandas()
    everything = read_manifest(_run(task, manifest, tmp_path / "all", threshold=-1).out).to_pandas()
    for label, group in everything.groupby("label"):
        best = set(group.sort_values("clip_score", ascending=False).uid[:2])
        assert set(table[table.label == label].uid) == best


def test_selection_ties_are_broken_by_uid_hash_deterministically():
    scores = np.array([0.5, 0.5, 0.5, 0.5, np.nan], dtype=np.float32)
    labels = np.zeros(5, dtype=np.int32)
    tiebreak = np.array([3, 1, 2, 0, 4], dtype=np.uint64)
    keep = select_by_score(scores, labels, tiebreak, percentile=50)
    assert keep.tolist() == [False, True, False, True, False]  # smallest tie-break ranks, NaN never
    capped = cap_per_class(np.ones(5, dtype=bool) & ~np.isnan(scores), scores, labels, tiebreak, cap=1)
    assert capped.tolist() == [False, False, False, True, False]


@pytest.mark.parametrize(("count", "percentile", "kept"), [(10, 30, 3), (10, 1e-9, 1), (7, 100 / 7 * 2, 2), (3, 100, 3)])
def test_percentile_keeps_exactly_the_ceiling_of_its_share(count, percentile, kept):
    scores = np.linspace(0, 1, count, dtype=np.float32)
    keep = select_by_score(scores, np.zeros(count, np.int32), np.arange(count, dtype=np.uint64), percentile=percentile)
    assert int(keep.sum()) == kept


def test_two_runs_write_identical_manifests(shapes, tmp_path):
    task, manifest = shapes
    _run(task, manifest, tmp_path / "a", percentile=60, per_class_cap=2, seed=3)
    _run(task, manifest, tmp_path / "b", percentile=60, per_class_cap=2, seed=3, workers=2)
    assert (tmp_path / "a" / "manifest.parquet").read_bytes() == (tmp_path / "b" / "manifest.parquet").read_bytes()
    # another batch size changes the floats in their last bits only, not the kept set
    _run(task, manifest, tmp_path / "c", percentile=60, per_class_cap=2, seed=3, batch_size=5)
    a, c = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "c")
    assert a.column("uid").to_pylist() == c.column("uid").to_pylist()
    np.testing.assert_allclose(a.column("clip_score").to_numpy(), c.column("clip_score").to_numpy(), atol=1e-6)


def test_classname_mode_scores_each_row_against_its_class_text(shapes, tiny, tmp_path):
    from curate.models import text_classifier

    task, manifest = shapes
    _run(task, manifest, tmp_path / "cls", threshold=-1, mode="classname")
    scores = read_manifest(tmp_path / "cls").column("clip_score").to_numpy()
    classes = ["red circle", "green square", "blue triangle"]
    text = text_classifier(tiny, classes, ["a photo of a {}.", "a drawing of a {}."]).numpy()
    labels = read_manifest(manifest).column("label").to_numpy()
    np.testing.assert_allclose(scores, _expected_scores(tiny, manifest, text, labels), atol=1e-5)
    wrong = _expected_scores(tiny, manifest, text, (labels + 1) % 3)
    assert np.abs(scores - wrong).max() > 1e-3  # the class text matters


def test_corrupt_and_truncated_images_are_skipped_and_listed(tmp_path):
    task = write_task_file(tmp_path, SHAPES_TASK)
    manifest = make_image_manifest(tmp_path, per_class=2)
    images = manifest.parent / "images"
    (images / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    whole = make_image(images / "whole.jpg", seed=99, size=64).read_bytes()
    (images / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    add_rows(manifest, [{"uid": "bad-1", "label": 0, "class_name": "red circle", "image_path": "images/corrupt.jpg"},
                        {"uid": "bad-2", "label": 1, "class_name": "green square", "image_path": "images/truncated.jpg"},
                        {"uid": "bad-3", "label": 2, "class_name": "blue triangle", "image_path": "images/gone.png"}])
    result = _run(task, manifest, tmp_path / "out", threshold=-1, workers=2)
    assert result.counts["unreadable"] == 3 and result.counts["kept"] == 6 and result.counts["scored"] == 6
    listed = {row["uid"]: row["error"] for row in result.report["unreadable_rows"]}
    assert sorted(listed) == ["bad-1", "bad-2", "bad-3"]
    assert "truncated" in listed["bad-2"]


@pytest.fixture()
def embedded(shapes, tiny, tmp_path):
    """The shapes manifest's embeddings in a 2-shard clip-retrieval folder, shuffled, with 20 extra rows."""
    task, manifest = shapes
    feats = embed_manifest(tiny, manifest)
    urls = read_manifest(manifest).column("url").to_pylist()
    rng = np.random.default_rng(0)
    extra = rng.standard_normal((20, feats.shape[1])).astype(np.float32)
    all_feats = np.concatenate([feats, extra])
    all_urls = urls + [f"https://example.com/other/{i}.jpg" for i in range(20)]
    order = rng.permutation(len(all_urls))
    folder = write_clip_retrieval(tmp_path / "emb", all_feats[order], [all_urls[i] for i in order], shards=2)
    return task, manifest, folder


def test_precomputed_embeddings_agree_with_the_image_path(embedded, tmp_path):
    task, manifest, folder = embedded
    from_images = read_manifest(_run(task, manifest, tmp_path / "img", threshold=-1).out)
    scores = np.sort(from_images.column("clip_score").to_numpy())
    cut = float(scores[5] + scores[6]) / 2
    for mode in ("domain", "classname"):
        a = read_manifest(_run(task, manifest, tmp_path / f"i-{mode}", threshold=cut, mode=mode).out)
        b = read_manifest(_run(task, manifest, tmp_path / f"e-{mode}", threshold=cut, mode=mode, embeddings=folder).out)
        assert a.column("uid").to_pylist() == b.column("uid").to_pylist()
        np.testing.assert_allclose(a.column("clip_score").to_numpy(), b.column("clip_score").to_numpy(), atol=1e-5)
    report = json.loads((tmp_path / "e-domain" / "report.json").read_text())
    assert report["source"] == "embeddings" and report["counts"]["missing_embedding"] == 0


def test_precomputed_rows_without_embedding_are_counted_and_duplicate_urls_all_scored(embedded, tmp_path):
    task, manifest, folder = embedded
    table = read_manifest(manifest)
    twin = table.slice(0, 1).to_pylist()[0] | {"uid": "twin", "label": 2, "class_name": "blue triangle"}
    lost = twin | {"uid": "lost", "url": "https://example.com/never-embedded.jpg"}
    rows = table.to_pylist() + [twin, lost]
    candidates = tmp_path / "cand" / "manifest.parquet"
    write_manifest(pa.Table.from_pylist(rows).drop_columns(["image_path"]), candidates)
    result = _run(task, candidates, tmp_path / "out", threshold=-1, mode="classname", embeddings=folder)
    assert result.counts["missing_embedding"] == 1 and result.counts["kept"] == 13
    out = read_manifest(tmp_path / "out").to_pandas().set_index("uid")
    first = table.column("uid")[0].as_py()
    assert out.loc["twin", "clip_score"] != out.loc[first, "clip_score"]  # same image, other class text


def test_score_core_normalises_fp16_input():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 16)).astype(np.float16) * 3
    text = rng.standard_normal((16, 2)).astype(np.float32)
    text /= np.linalg.norm(text, axis=0)
    unit = x.astype(np.float32) / np.linalg.norm(x.astype(np.float32), axis=1, keepdims=True)
    np.testing.assert_allclose(score_embeddings(x, text), (unit @ text).max(axis=1), atol=1e-5)
    np.testing.assert_allclose(score_embeddings(x, text, np.array([1] * 7)), unit @ text[:, 1], atol=1e-5)


def test_front_rows_moves_the_chosen_rows_to_the_front_in_place_across_blocks():
    array = np.arange(40, dtype=np.float16).reshape(20, 2)
    rows = np.array([1, 4, 5, 9, 19])
    expected = array[rows].copy()
    front = _front_rows(array, rows, block=2)
    assert np.array_equal(front, expected)
    assert front.base is array or np.shares_memory(front, array)


def test_embedding_shard_with_wrong_row_count_is_named(embedded, tmp_path):
    task, manifest, folder = embedded
    npy = folder / "img_emb" / "img_emb_1.npy"
    np.save(npy, np.load(npy)[:-1])
    with pytest.raises(CurateError, match=r"embeddings shard 1: .*img_emb_1\.npy has 15 rows but .*metadata_1\.parquet has 16"):
        _run(task, manifest, tmp_path / "out", embeddings=folder)
    assert not (tmp_path / "out").exists()


def test_embedding_shard_without_npy_or_wrong_dim(embedded, tmp_path):
    task, manifest, folder = embedded
    np.save(folder / "img_emb" / "img_emb_0.npy", np.zeros((16, 8), dtype=np.float16))
    with pytest.raises(CurateError, match="dimension 8 but model 'tiny-clip' embeds to 32"):
        _run(task, manifest, tmp_path / "out", embeddings=folder)
    (folder / "img_emb" / "img_emb_1.npy").unlink()
    with pytest.raises(CurateError, match=r"embeddings shard 1: .*metadata_1\.parquet has no matching img_emb/img_emb_1\.npy"):
        _run(task, manifest, tmp_path / "out", embeddings=folder)


def test_a_shard_may_name_its_url_column_otherwise_and_store_big_endian_floats(embedded, tmp_path):
    task, manifest, folder = embedded
    expected = read_manifest(_run(task, manifest, tmp_path / "a", embeddings=folder, threshold=-1).out).column("clip_score")
    meta = folder / "metadata" / "metadata_1.parquet"
    pq.write_table(pq.read_table(meta).rename_columns(["URL", "caption"]), meta)
    npy = folder / "img_emb" / "img_emb_1.npy"
    np.save(npy, np.load(npy).astype(">f4"))
    scores = read_manifest(_run(task, manifest, tmp_path / "b", embeddings=folder, threshold=-1).out).column("clip_score")
    assert scores.equals(expected)


def test_unreadable_embedding_shards_are_named(embedded, tmp_path):
    task, manifest, folder = embedded
    npy, meta = folder / "img_emb" / "img_emb_1.npy", folder / "metadata" / "metadata_1.parquet"
    np.save(npy, np.array([["a"] * 32] * 16))
    with pytest.raises(CurateError, match=r"embeddings .*img_emb_1\.npy must hold floats, got <U1"):
        _run(task, manifest, tmp_path / "out", embeddings=folder)
    np.save(npy, np.zeros((16, 32), np.float32))
    meta.write_bytes(b"not parquet")
    with pytest.raises(CurateError, match=r"cannot read embeddings metadata .*metadata_1\.parquet: "):
        _run(task, manifest, tmp_path / "out", embeddings=folder)
    meta.unlink()
    meta.mkdir()
    with pytest.raises(CurateError, match=r"embeddings shard 1: .*img_emb_1\.npy has no matching metadata/metadata_1\.parquet"):
        _run(task, manifest, tmp_path / "out", embeddings=folder)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- through the CLI
def test_cli_filter_runs_offline_with_tiny_clip(shapes, tmp_path, runner):
    task, manifest = shapes
    result = runner.invoke(cli, ["filter", "--task", str(task), "--manifest", str(manifest), "--out", str(tmp_path / "out"),
                                 "--clip-model", "tiny-clip", "--threshold", "-1", "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    assert "kept 12 of 12 rows" in result.stdout
    empty = runner.invoke(cli, ["filter", "--task", str(task), "--manifest", str(manifest), "--out", str(tmp_path / "out2"),
                                "--clip-model", "tiny-clip", "--clip-pretrained", "", "--threshold", "1", "--workers", "0"])
    assert empty.exit_code == 0 and "kept 0 of 12" in empty.stdout


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--threshold", "1.5", "threshold must be in [-1, 1], got 1.5"),
    ("--percentile", "0", "percentile must be in (0, 100], got 0"),
    ("--per-class-cap", "0", "per-class cap must be at least 1, got 0"),
])
def test_cli_rejects_out_of_range_options(shapes, tmp_path, runner, option, value, message):
    task, manifest = shapes
    out = tmp_path / "out"
    result = runner.invoke(cli, ["filter", "--task", str(task), "--manifest", str(manifest), "--out", str(out),
                                 "--clip-model", "tiny-clip", option, value])
    assert_cli_error(result, message, out)


@pytest.mark.parametrize(("options", "message"), [
    (["--threshold", "0.1", "--percentile", "50"], "give --threshold or --percentile, not both"),
    (["--phash-distance", "60"], "--phash-distance sets how --decontaminate works: give --decontaminate too"),
    (["--cosine-threshold", "0.5"], "--cosine-threshold sets how --decontaminate works: give --decontaminate too"),
])
def test_cli_refuses_options_the_run_would_ignore(shapes, tmp_path, runner, options, message):
    task, manifest = shapes
    out = tmp_path / "out"
    result = runner.invoke(cli, ["filter", "--task", str(task), "--manifest", str(manifest), "--out", str(out),
                                 "--clip-model", "tiny-clip", *options])
    assert_cli_error(result, message, out)


def test_cli_rejects_a_manifest_missing_columns(shapes, tmp_path, runner):
    task, _ = shapes
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"uid": ["a"], "label": [0], "image_path": ["x.png"]}), bad)
    out = tmp_path / "out"
    result = runner.invoke(cli, ["filter", "--task", str(task), "--manifest", str(bad), "--out", str(out), "--clip-model", "tiny-clip"])
    assert_cli_error(result, "is missing required column(s): class_name, source, caption", out)


def test_cli_rejects_a_manifest_without_images_or_embeddings(shapes, tmp_path, runner):
    task, manifest = shapes
    no_images = tmp_path / "cand" / "manifest.parquet"
    write_manifest(read_manifest(manifest).drop_columns(["image_path"]), no_images)
    out = tmp_path / "out"
    result = runner.invoke(cli, ["filter", "--task", str(task), "--manifest", str(no_images), "--out", str(out),
                                 "--clip-model", "tiny-clip"])
    assert_cli_error(result, "manifest has no images (image_path or shard/key)", out)


def test_cli_rejects_labels_outside_the_task(shapes, tmp_path, runner):
    _, manifest = shapes
    task = write_task_file(tmp_path, {**SHAPES_TASK, "classes": ["red circle", "green square"]})
    out = tmp_path / "out"
    result = runner.invoke(cli, ["filter", "--task", str(task), "--manifest", str(manifest), "--out", str(out), "--clip-model", "tiny-clip"])
    assert_cli_error(result, "manifest label 2 is out of range for task 'shapes' (2 classes)", out)


def test_cli_rejects_a_task_whose_classes_differ_from_the_manifests(shapes, tmp_path, runner):
    _, manifest = shapes
    names = list(SHAPES_TASK["classes"])
    names[0], names[1] = names[1], names[0]  # same classes, another order: labels 0 and 1 mean other classes
    task = write_task_file(tmp_path, {**SHAPES_TASK, "classes": names})
    out = tmp_path / "out"
    result = runner.invoke(cli, ["filter", "--task", str(task), "--manifest", str(manifest), "--out", str(out), "--clip-model", "tiny-clip"])
    assert_cli_error(result, f"manifest label 0 is class '{names[1]}', but task 'shapes' calls it '{names[0]}'", out)


def test_cli_refuses_an_existing_output_folder(shapes, tmp_path, runner):
    task, manifest = shapes
    out = tmp_path / "out"
    out.mkdir()
    result = runner.invoke(cli, ["filter", "--task", str(task), "--manifest", str(manifest), "--out", str(out), "--clip-model", "tiny-clip"])
    assert_cli_error(result, "already exists (use --overwrite")
    assert out.is_dir() and not any(out.iterdir())


def test_overwrite_never_deletes_embeddings_eval_images_or_images_elsewhere(shapes, embedded, tmp_path):
    from manifests.images import rebase_images

    task, manifest, emb = embedded
    with pytest.raises(CurateError, match=f"output directory {emb} holds the input {emb}"):
        _run(task, manifest, emb, embeddings=emb, overwrite=True, threshold=-1)
    source = make_image_manifest(tmp_path / "src", per_class=[1, 1, 1])
    moved = tmp_path / "m" / "manifest.parquet"
    moved.parent.mkdir()
    write_manifest(rebase_images(read_manifest(source), source.parent, moved.parent), moved)  # images in ../src
    with pytest.raises(CurateError, match=f"output directory {tmp_path / 'src'} holds the input {tmp_path / 'src'}/"):
        _run(task, moved, tmp_path / "src", overwrite=True, threshold=-1)
    evals = tmp_path / "evals"  # holds no training image: only --decontaminate names it
    make_image(evals / "test" / "red circle" / "e.png", seed=1)
    with pytest.raises(CurateError, match=f"output directory {evals} holds the input {evals}"):
        _run(task, moved, evals, overwrite=True, threshold=-1, decontaminate=evals)
    assert len(list((tmp_path / "src").rglob("*.png"))) + len(list((tmp_path / "src").rglob("*.jpg"))) == 3
    assert (evals / "test" / "red circle" / "e.png").exists()
    assert sorted(os.listdir(emb)) == ["img_emb", "metadata"]


def test_pretrained_default_depends_on_the_model():
    from curate.models import resolve_pretrained

    assert resolve_pretrained("ViT-B-16", None) == "laion2b_s34b_b88k"
    assert resolve_pretrained("tiny-clip", None) is None
    assert resolve_pretrained("ViT-B-16", "") is None
    assert resolve_pretrained("ViT-B-16", "openai") == "openai"


def test_key_index_checks_strings_after_a_hash_hit_and_falls_back_on_collisions(monkeypatch):
    from curate.embeddings import _KeyIndex

    lengths = lambda self, values: np.array([len(v or "") for v in values.to_pylist()], dtype=np.uint64)  # noqa: E731
    monkeypatch.setattr(_KeyIndex, "_hash", lengths)
    index = _KeyIndex(pa.array(["a", "bb", None, "a"]))
    assert index.hashed
    assert index.key_ids(pa.array(["c", "bb", "a", "dd", None])).tolist() == [-1, 1, 0, -1, -1]
    rows, source = index.expand(np.array([0, 1]))
    assert rows.tolist() == [0, 3, 1] and source.tolist() == [0, 0, 1]  # "a" is on manifest rows 0 and 3
    colliding = _KeyIndex(pa.array(["a", "b"]))
    assert not colliding.hashed
    assert colliding.key_ids(pa.array(["b", "x", "a"])).tolist() == [1, -1, 0]
