"""train.data: train fractions, mixing plans, eval folders, manifest label mapping."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from helpers_train import CLASSES, write_rows

from curate.errors import CurateError
from manifests.images import safe_name
from train.data import (
    BatchPlan,
    load_train_sources,
    map_labels,
    parse_mix,
    scan_eval_folder,
    stratified_fraction,
)


def _uids_labels(counts):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return [f"row-{i}" for i in range(len(labels))], labels


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25, 0.125, 1 / 64])
def test_stratified_fraction_sizes_per_class(fraction):
    counts = [64, 32, 10, 1]
    uids, labels = _uids_labels(counts)
    keep = stratified_fraction(uids, labels, fraction, seed=3)
    per_class = Counter(labels[keep].tolist())
    assert [per_class[c] for c in range(4)] == [max(1, round(fraction * n)) for n in counts]
    assert len(set(keep.tolist())) == len(keep)


def test_stratified_fraction_nested_seeded_and_order_free():
    uids, labels = _uids_labels([40, 40, 40])
    half = set(np.asarray(uids)[stratified_fraction(uids, labels, 0.5, seed=1)])
    quarter = set(np.asarray(uids)[stratified_fraction(uids, labels, 0.25, seed=1)])
    assert quarter < half  # 1/2^x sweeps: each subset contains the smaller ones
    other_seed = set(np.asarray(uids)[stratified_fraction(uids, labels, 0.5, seed=2)])
    assert other_seed != half
    order = np.random.default_rng(0).permutation(len(uids))
    shuffled = set(np.asarray(uids)[order][stratified_fraction([uids[i] for i in order], labels[order], 0.5, seed=1)])
    assert shuffled == half  # chosen by uid hash, not by row position


def test_plain_plan_is_a_seeded_shuffle_of_every_row():
    plan = BatchPlan([30, 20], batch_size=8, seed=5)
    batches = plan.batches(1)
    assert len(batches) == len(plan) == 7
    assert sorted(i for b in batches for i in b) == list(range(50))
    assert plan.batches(1) == batches and plan.batches(2) != batches


def test_mixdata_draws_sources_in_proportion():
    plan = BatchPlan([1000, 3000], batch_size=64, weights=[0.75, 0.25], mode="data", seed=0)
    flat = [i for b in plan.batches(3) for i in b]
    assert len(flat) == 4000
    share_first = np.mean([i < 1000 for i in flat])
    assert abs(share_first - 0.75) < 0.03
    first = [i for i in flat if i < 1000]  # 3000 draws from 1000 rows: every row ~3 times, permutation-cycled
    assert set(Counter(first).values()) <= {2, 3, 4}


def test_mixloss_batches_have_fixed_source_shares():
    plan = BatchPlan([100, 50], batch_size=10, weights=[0.8, 0.2], mode="loss", seed=0)
    batches = plan.batches(1)
    assert len(batches) == 15
    for batch in batches:
        assert sum(i < 100 for i in batch) == 8 and sum(i >= 100 for i in batch) == 2


def test_mixloss_and_mixdata_see_as_many_images_per_epoch():
    """A batch larger than the data (80 rows, batch 512) must not make a MixLoss epoch 512 images."""
    sizes = [40, 40]
    for batch_size in (512, 30):
        data = BatchPlan(sizes, batch_size, weights=[0.5, 0.5], mode="data", seed=0).batches(0)
        loss = BatchPlan(sizes, batch_size, weights=[0.5, 0.5], mode="loss", seed=0).batches(0)
        assert [len(b) for b in loss] == [len(b) for b in data] == [min(batch_size, 80 - i) for i in range(0, 80, batch_size)]
        assert all(sum(i < 40 for i in b) == len(b) // 2 for b in loss)
    odd = BatchPlan([10, 10], 19, weights=[0.5, 0.5], mode="loss", seed=0).batches(0)  # 9.5 + 9.5 rows wanted
    assert [len(b) for b in odd] == [19, 1]
    plan = BatchPlan([500, 5, 5], 100, weights=[0.996, 0.002, 0.002], mode="loss", seed=0)
    assert [plan._shares(size) for size in (100, 10, 2)] == [[98, 1, 1], [8, 1, 1], [1, 1, 0]]


@pytest.mark.parametrize(("mix", "message"), [
    ("0.5", r"1 weight\(s\) but 2"), ("a,b", "comma-separated"), ("-1,2", ">= 0"), ("0,0", "positive sum"),
])
def test_parse_mix_errors(mix, message):
    with pytest.raises(CurateError, match=message):
        parse_mix(mix, 2)


def test_parse_mix_normalises():
    assert parse_mix("9,1", 2) == pytest.approx([0.9, 0.1])
    assert parse_mix("1e308,1e308", 2) == [0.5, 0.5]  # the plain sum overflows to inf
    assert parse_mix(None, 3) is None


def _folder(root, splits=("train", "val", "test"), classes=CLASSES[:3], extra=None):
    from PIL import Image

    for split in splits:
        for name in [*classes, *([extra] if extra else [])]:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(root / split / name / "a.png")
    return root


def test_eval_folder_labels_follow_the_task_not_the_folder_order(tmp_path):
    root = _folder(tmp_path / "ev", classes=["purple cross", "red circle"])
    samples = scan_eval_folder(root, list(CLASSES))
    assert sorted(label for _, label in samples["test"]) == [0, 4]


def test_eval_folder_accepts_file_system_safe_names(tmp_path):
    assert safe_name('F/A-18: "hornet"') == "F_A-18_ _hornet_"
    root = _folder(tmp_path / "ev", classes=["F_A-18"])
    assert scan_eval_folder(root, ["747", "F/A-18"])["val"][0][1] == 1


def test_eval_folder_missing_split(tmp_path):
    root = _folder(tmp_path / "ev", splits=("train", "test"))
    with pytest.raises(CurateError, match="missing split folder.*val"):
        scan_eval_folder(root, list(CLASSES))


def test_eval_folder_names_a_folder_that_is_not_a_class(tmp_path):
    root = _folder(tmp_path / "ev", extra="orange hexagon")
    with pytest.raises(CurateError, match="has a folder that is not a class of the eval task: 'orange hexagon'"):
        scan_eval_folder(root, list(CLASSES))


def test_eval_folder_names_in_decomposed_unicode_find_their_class(tmp_path):
    """macOS writes file names decomposed: 'café' as 'cafe' + a combining accent."""
    root = _folder(tmp_path / "ev", classes=["red cafe\u0301 circle"])
    assert scan_eval_folder(root, ["blue square", "red caf\u00e9 circle"])["val"][0][1] == 1


def test_eval_folder_exported_with_classes_txt_keeps_labels_two_names_share_a_folder_for(tmp_path):
    from helpers_images import make_image_manifest

    from manifests.export import export_manifest

    names = ("AC/DC", "AC:DC")  # both become the folder AC_DC; an export of AC:DC images alone names it so
    for split in ("train", "val", "test"):
        manifest = make_image_manifest(tmp_path / "src", per_class=[0, 2], classes=names, folder=split)
        export_manifest(manifest, "imagefolder", tmp_path / "ev" / split)
    assert sorted(p.name for p in (tmp_path / "ev" / "val").iterdir()) == ["AC_DC", "classes.txt", "manifest.parquet", "report.json"]
    samples = scan_eval_folder(tmp_path / "ev", list(names))
    assert {split: [label for _, label in rows] for split, rows in samples.items()} == {s: [1, 1] for s in ("train", "val", "test")}
    for split in ("train", "val", "test"):
        (tmp_path / "ev" / split / "classes.txt").unlink()
    with pytest.raises(CurateError, match="could be class 'AC/DC' or 'AC:DC' .*add the exporter's classes.txt"):
        scan_eval_folder(tmp_path / "ev", list(names))


def test_classes_whose_folders_differ_only_in_unicode_form_keep_their_labels(tmp_path):
    """'café/x' (composed) and 'cafe\u0301:x' (decomposed) became the folders café_x and cafe\u0301_x, which the
    scanner, comparing names in one Unicode form, took for one: class 0's images were labelled 1."""
    from helpers_images import make_image_manifest

    from manifests.export import export_manifest

    names = ("caf\u00e9/x", "cafe\u0301:x")
    for split in ("train", "val", "test"):
        manifest = make_image_manifest(tmp_path / "src", per_class=[1, 2], classes=names, folder=split)
        export_manifest(manifest, "imagefolder", tmp_path / "ev" / split)
    samples = scan_eval_folder(tmp_path / "ev", list(names))
    assert {split: sorted(label for _, label in rows) for split, rows in samples.items()} == {s: [0, 1, 1] for s in samples}


def test_classes_txt_folders_compare_as_class_names_do(tmp_path):
    """macOS writes the exported folder 'café_x' decomposed: classes.txt still says which class it is."""
    root = _folder(tmp_path / "ev", classes=["cafe\u0301_x"])
    for split in ("train", "val", "test"):
        (root / split / "classes.txt").write_text("1\tcaf\u00e9:x\tcaf\u00e9_x\n", encoding="utf-8")
    assert scan_eval_folder(root, ["caf\u00e9/x", "caf\u00e9:x"])["val"][0][1] == 1


def test_a_classes_txt_of_another_format_is_not_read(tmp_path):
    root = _folder(tmp_path / "ev", classes=["red circle", "green square"])
    for split in ("train", "val", "test"):
        (root / split / "classes.txt").write_text("red circle\ngreen square\n")  # one name a line, as many data sets ship
    assert sorted(label for _, label in scan_eval_folder(root, list(CLASSES))["val"]) == [0, 1]


def _row(i, name, label=None, source="real"):
    label = CLASSES.index(name) if label is None else label
    return {"uid": f"u{i}", "label": label, "class_name": name, "source": source, "caption": name, "image_path": f"{i}.png"}


def test_labels_are_mapped_by_class_name():
    table = pa.table({"class_name": ["purple cross", "Red Circle"], "label": pa.array([0, 3], pa.int32())})
    assert map_labels(table, list(CLASSES), "m").tolist() == [4, 0]


def test_train_manifest_errors(tmp_path):
    empty = write_rows(tmp_path / "empty", [])
    with pytest.raises(CurateError, match="is empty"):
        load_train_sources([empty], list(CLASSES))
    outside = write_rows(tmp_path / "outside", [_row(0, "red circle"), _row(1, "orange hexagon", label=9)])
    with pytest.raises(CurateError, match="1 class\\(es\\) not in the eval task: 'orange hexagon'"):
        load_train_sources([outside], list(CLASSES))
    no_images = write_rows(tmp_path / "noimg", [{k: v for k, v in _row(0, "red circle").items() if k != "image_path"}])
    with pytest.raises(CurateError, match="no images"):
        load_train_sources([no_images], list(CLASSES))
    with pytest.raises(CurateError, match="train-fraction"):
        load_train_sources([outside], list(CLASSES), fraction=0)


def test_the_same_manifest_twice_is_refused_and_shared_rows_are_named(tmp_path, caplog):
    rows = [_row(i, CLASSES[i % 2]) for i in range(10)]
    path = write_rows(tmp_path / "m", rows)
    with pytest.raises(CurateError, match=f"--train {tmp_path}/m/../m/manifest.parquet and --train {tmp_path}/m are the same manifest"):
        load_train_sources([tmp_path / "m", tmp_path / "m" / ".." / "m" / "manifest.parquet"], list(CLASSES))
    subset = write_rows(tmp_path / "sub", rows[:4])  # a filtered set beside the set it came from
    load_train_sources([path, subset], list(CLASSES))
    assert f"train manifest {subset} shares 4 uid(s) with the manifests before it" in caplog.text


def test_train_sources_keep_fraction_and_provenance(tmp_path):
    rows = [_row(i, CLASSES[i % 2]) for i in range(40)]
    path = write_rows(tmp_path / "m", rows)
    (tmp_path / "m" / "report.json").write_text('{"stage": "download", "task": "t", "other": 1}', encoding="utf-8")
    [source] = load_train_sources([path], list(CLASSES), fraction=0.25, seed=0)
    assert source.rows_total == 40 and source.rows == 10
    assert Counter(source.labels.tolist()) == {0: 5, 1: 5}
    assert source.provenance == {"stage": "download", "task": "t"}


@pytest.mark.parametrize("text", ["1", "[1, 2]", "{not json", "null"])
def test_a_report_that_is_no_json_object_gives_no_provenance(tmp_path, text):
    path = write_rows(tmp_path / "m", [_row(i, CLASSES[i % 2]) for i in range(4)])
    (tmp_path / "m" / "report.json").write_text(text, encoding="utf-8")
    [source] = load_train_sources([path], list(CLASSES))
    assert source.provenance == {}


def test_shared_uids_count_every_manifest_before(tmp_path, caplog):
    """The third manifest shares uids only with the second: the uids seen so far include it."""
    rows = [_row(i, CLASSES[i % 2]) for i in range(12)]
    paths = [write_rows(tmp_path / name, part) for name, part in (("a", rows[:4]), ("b", rows[4:8]), ("c", rows[6:12]))]
    load_train_sources(paths, list(CLASSES))
    assert f"train manifest {paths[2]} shares 2 uid(s) with the manifests before it" in caplog.text
    assert f"train manifest {paths[1]} shares" not in caplog.text


def test_manifest_dataset_reads_each_rows_own_image_across_table_chunks(tmp_path):
    from PIL import Image

    from train.data import ManifestDataset, TrainSource

    for i in range(5):
        Image.new("RGB", (10 + i, 4)).save(tmp_path / f"{i}.png")
    parts = [pa.Table.from_pylist([_row(i, CLASSES[i % 2]) for i in chunk]) for chunk in ([0, 1], [2, 3, 4])]
    table = pa.concat_tables(parts)
    assert table.column("uid").num_chunks == 2
    source = TrainSource(tmp_path / "manifest.parquet", tmp_path, table, np.array([7, 8, 9, 10, 11]), 5, {})
    dataset = ManifestDataset(source, transform=lambda image: image.size, source_index=3)
    assert len(dataset) == 5
    assert [dataset[i] for i in (4, 0, 2)] == [((14, 4), 11, 3), ((10, 4), 7, 3), ((12, 4), 9, 3)]
