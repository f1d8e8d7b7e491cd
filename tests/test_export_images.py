"""Reading image-bearing manifests (manifests.images) and the webdataset / imagefolder exporters.

The manifests are built here (images as files, or in a webdataset tar laid out as img2dataset
writes it), so these tests need neither a server nor img2dataset.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers_cli import assert_cli_error
from helpers_http import image_bytes

from curate.cli import cli
from curate.errors import CurateError
from manifests import read_report, write_manifest
from manifests.images import iter_images, open_image, read_image

# class names that are unsafe as folder names; "a/b" and "a_b" both sanitise to "a_b"
CLASSES = ["red circle", "green/square", "a/b", "a_b", "..", "CON: <weird>?"]


def _rows(n: int = 12) -> list[dict]:
    return [
        {"uid": f"{i:04x}cafe", "label": i % len(CLASSES), "class_name": CLASSES[i % len(CLASSES)],
         "source": "retrieved", "caption": f"caption {i}" if i != 5 else None, "url": f"http://x/{i}.jpg",
         "clip_score": 0.25 + i / 100}
        for i in range(n)
    ]


def _payload(i: int) -> tuple[bytes, str]:
    """Row i's image: PNG for odd rows, JPEG for even rows, distinct sizes."""
    ext = "png" if i % 2 else "jpg"
    return image_bytes((10 * i, 255 - 10 * i, 7 * i), size=(20 + i, 10 + i), fmt="PNG" if ext == "png" else "JPEG"), ext


def files_manifest(folder: Path) -> Path:
    rows = _rows()
    (folder / "images" / "00000").mkdir(parents=True)
    for i, row in enumerate(rows):
        data, ext = _payload(i)
        row["image_path"] = f"images/00000/{i:06d}.{ext}"
        (folder / row["image_path"]).write_bytes(data)
    path = folder / "manifest.parquet"
    write_manifest(pa.Table.from_pylist(rows), path)
    return path


def webdataset_manifest(folder: Path) -> Path:
    """Two tars laid out like img2dataset's (key.jpg, key.txt, key.json members)."""
    rows = _rows()
    (folder / "shards").mkdir(parents=True)
    for shard in range(2):
        with tarfile.open(folder / "shards" / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard * 6, shard * 6 + 6):
                data, ext = _payload(i)
                key = f"{shard:05d}{i:04d}"
                rows[i].update(shard=f"shards/{shard:05d}.tar", key=key)
                for name, blob in ((f"{key}.txt", b"text"), (f"{key}.{ext}", data), (f"{key}.json", b"{}")):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    path = folder / "manifest.parquet"
    write_manifest(pa.Table.from_pylist(rows), path)
    return path


LAYOUTS = {"files": files_manifest, "webdataset": webdataset_manifest}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_iter_images_and_open_image(tmp_path, layout):
    manifest = LAYOUTS[layout](tmp_path)
    table = pq.read_table(manifest)
    seen = list(iter_images(table, tmp_path))
    assert [row["uid"] for row, _, _ in seen] == [r["uid"] for r in _rows()]
    for i, (row, data, ext) in enumerate(seen):
        assert (data, ext) == _payload(i)
    image = open_image(table.slice(3, 1).to_pylist()[0], tmp_path)
    assert image.mode == "RGB" and image.size == (23, 13)


def test_missing_images_give_clear_errors(tmp_path):
    no_images = pa.Table.from_pylist(_rows(2))
    with pytest.raises(CurateError, match="^manifest has no images: run curate download first$"):
        next(iter_images(no_images, tmp_path))
    manifest = files_manifest(tmp_path)
    (tmp_path / "images/00000/000001.png").unlink()
    with pytest.raises(CurateError, match="cannot read image of row 0001cafe: .*000001.png"):
        list(iter_images(pq.read_table(manifest), tmp_path))
    webdataset_manifest(tmp_path / "w")
    with pytest.raises(CurateError, match="no image for key 'nokey'"):
        read_image({"uid": "z", "shard": "shards/00000.tar", "key": "nokey"}, tmp_path / "w")


def test_undecodable_images_name_their_file(tmp_path):
    manifest = files_manifest(tmp_path)
    rows = pq.read_table(manifest).to_pylist()
    (tmp_path / rows[0]["image_path"]).write_bytes(b"not an image at all")
    (tmp_path / rows[2]["image_path"]).write_bytes(_payload(2)[0][:200])  # a JPEG cut short
    with pytest.raises(CurateError, match=r"^cannot decode image of row 0000cafe: .*/000000.jpg is not an image format Pillow reads$"):
        open_image(rows[0], tmp_path)
    with pytest.raises(CurateError, match=r"^cannot decode image of row 0002cafe: .*/000002.jpg: \w"):
        open_image(rows[2], tmp_path)
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "bad.tar", "w") as tar:
        info = tarfile.TarInfo("k7.jpg")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"junk"))
    with pytest.raises(CurateError, match=r"^cannot decode image of row z: .*/shards/bad.tar:k7 is not an image format Pillow reads$"):
        open_image({"uid": "z", "shard": "shards/bad.tar", "key": "k7"}, tmp_path)


def test_sixteen_bit_and_float_grey_images_are_scaled_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    ramp = np.arange(64 * 64).reshape(64, 64) * 16  # 0 .. 65520
    Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "deep.png")  # Pillow reads it as I;16
    Image.fromarray((ramp / 65535).astype(np.float32)).save(tmp_path / "float.tiff")
    Image.fromarray((ramp // 257).astype(np.int32)).save(tmp_path / "small.tiff")  # 32-bit ints, 8-bit values
    expected = np.rint(ramp / 257)
    for name in ("deep.png", "float.tiff", "small.tiff"):
        pixels = np.asarray(open_image({"uid": name, "image_path": name}, tmp_path))
        assert pixels.shape == (64, 64, 3) and np.abs(pixels[..., 0] - expected).max() <= 1, name


def test_an_image_too_large_to_decode_names_its_file(tmp_path, monkeypatch):
    from PIL import Image

    manifest = files_manifest(tmp_path)
    row = pq.read_table(manifest).to_pylist()[1]
    with Image.open(tmp_path / row["image_path"]) as image:
        pixels = image.width * image.height
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels // 3)  # Pillow refuses images over twice the limit
    with pytest.raises(CurateError, match=r"^cannot decode image of row 0001cafe: .*/000001.png: Image size .* exceeds limit"):
        open_image(row, tmp_path)


def test_export_onto_its_own_manifest_is_refused(tmp_path):
    manifest = files_manifest(tmp_path / "m")
    for out in (manifest, manifest.parent):
        result = CliRunner().invoke(cli, ["export", "--manifest", str(manifest), "--format", "csv", "--out", str(out), "--overwrite"])
        assert_cli_error(result, f"output directory {out} holds the input {manifest}")
    assert pq.read_table(manifest).num_rows == 12


def _refuse(constant: str):
    raise ValueError(f"not JSON: {constant}")


def test_csv_and_jsonl_write_columns_they_have_no_type_for_as_text(tmp_path):
    """A manifest carries unknown columns through: lists and bytes become JSON text in CSV, dates ISO text."""
    import datetime
    import decimal

    import pandas as pd

    table = pa.table({
        "uid": ["a", "b"], "label": pa.array([0, 0], pa.int32()), "class_name": ["rose"] * 2, "source": ["retrieved"] * 2,
        "caption": ["x", "y"], "tags": pa.array([["p", "q"], None]), "blob": pa.array([b"\x00\xff", b"hi"]),
        "taken": pa.array([datetime.datetime(2020, 1, 2, 3, 4), None]), "price": pa.array([decimal.Decimal("1.50"), None]),
        "laion_similarity": pa.array([float("nan"), float("inf")]),  # LAION's float columns hold NaN
    })
    manifest = tmp_path / "m" / "manifest.parquet"
    manifest.parent.mkdir()
    pq.write_table(table, manifest)
    for fmt in ("csv", "jsonl"):
        assert _export(manifest, fmt, tmp_path / fmt).exit_code == 0
    csv = pd.read_csv(tmp_path / "csv" / "manifest.csv", keep_default_na=False)
    assert csv["tags"].tolist() == ['["p", "q"]', ""] and csv["blob"].tolist() == ["AP8=", "aGk="]
    rows = [json.loads(line, parse_constant=_refuse) for line in (tmp_path / "jsonl" / "manifest.jsonl").read_text().splitlines()]
    assert [r["laion_similarity"] for r in rows] == [None, None]
    assert [(r["tags"], r["blob"], r["taken"], r["price"]) for r in rows] == [
        (["p", "q"], "AP8=", "2020-01-02T03:04:00", "1.50"), (None, "aGk=", None, None)]


def test_uids_that_become_one_webdataset_key_are_one_error(tmp_path):
    manifest = files_manifest(tmp_path / "m")
    table = pq.read_table(manifest).slice(0, 2)
    table = table.set_column(0, "uid", pa.array(["u.1", "u_1"])).set_column(2, "class_name", pa.array(["rose", "rose"]))
    table = table.set_column(1, "label", pa.array([0, 0], pa.int32()))
    pq.write_table(table, manifest)
    result = _export(manifest, "webdataset", tmp_path / "out")
    assert_cli_error(result, "two rows map to the exported name 'u_1' (the second has uid 'u_1'); names are uids with '.'",
                     tmp_path / "out")


def _export(manifest: Path, fmt: str, out: Path):
    return CliRunner().invoke(cli, ["export", "--manifest", str(manifest), "--format", fmt, "--out", str(out)],
                              catch_exceptions=False)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_webdataset_export_round_trip(tmp_path, layout):
    import webdataset as wds

    manifest = LAYOUTS[layout](tmp_path / "m")
    out = tmp_path / "wds"
    result = _export(manifest, "webdataset", out)
    assert result.exit_code == 0, result.output
    assert "exported 12 rows as webdataset" in result.stdout
    rows = _rows()
    samples = list(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [r["uid"] for r in rows]
    for i, (sample, row) in enumerate(zip(samples, rows)):
        data, ext = _payload(i)
        assert sample[ext] == data and sorted(sample) == sorted(["__key__", "__url__", "__local_path__", ext, "cls", "txt", "json"])
        assert int(sample["cls"]) == row["label"]
        assert sample["txt"].decode() == (row["caption"] or "")
        meta = json.loads(sample["json"])
        assert meta["uid"] == row["uid"] and meta["class_name"] == row["class_name"] and meta["url"] == row["url"]
        assert meta["clip_score"] == pytest.approx(row["clip_score"])
        assert not {"label", "caption", "image_path", "shard", "key"} & set(meta)
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert len(tar.getnames()) == 4 * len(rows)
    assert read_report(out)["files"] == ["shard-000000.tar", "manifest.parquet"]
    _assert_the_export_is_a_dataset(out, rows)


def test_webdataset_export_is_the_same_bytes_at_another_time(tmp_path, monkeypatch):
    import time

    manifest = files_manifest(tmp_path / "m")
    assert _export(manifest, "webdataset", tmp_path / "a").exit_code == 0
    later = time.time() + 3600
    monkeypatch.setattr(time, "time", lambda: later)  # tar members would carry the export's time
    assert _export(manifest, "webdataset", tmp_path / "b").exit_code == 0
    assert (tmp_path / "a" / "shard-000000.tar").read_bytes() == (tmp_path / "b" / "shard-000000.tar").read_bytes()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_imagefolder_export_round_trip(tmp_path, layout):
    manifest = LAYOUTS[layout](tmp_path / "m")
    out = tmp_path / "folders"
    result = _export(manifest, "imagefolder", out)
    assert result.exit_code == 0, result.output
    header, *lines = (out / "classes.txt").read_text(encoding="utf-8").splitlines()
    assert header.startswith("# label<TAB>class name<TAB>folder") and lines == [
        "0\tred circle\tred circle", "1\tgreen/square\tgreen_square", "2\ta/b\ta_b", "3\ta_b\ta_b_3",
        "4\t..\tclass_4", "5\tCON: <weird>?\tCON_ _weird__",
    ]
    folders = {int(label): folder for label, _, folder in (line.split("\t") for line in lines)}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(folders.values())
    for i, row in enumerate(_rows()):
        data, ext = _payload(i)
        assert (out / folders[row["label"]] / f"{row['uid']}.{ext}").read_bytes() == data
    assert sum(1 for p in out.rglob("*") if p.is_file() and p.parent != out) == 12
    _assert_the_export_is_a_dataset(out, _rows())


def _assert_the_export_is_a_dataset(out: Path, rows: list[dict]) -> None:
    """OUT/manifest.parquet holds the rows in order, their images found where the export put them."""
    exported = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [row["uid"] for row in exported] == [row["uid"] for row in rows]
    for i, row in enumerate(exported):
        assert read_image(row, out)[0] == _payload(i)[0] and row["clip_score"] == pytest.approx(rows[i]["clip_score"])


def test_export_of_a_manifest_without_images_fails_cleanly(tmp_path):
    manifest = tmp_path / "manifest.parquet"
    write_manifest(pa.Table.from_pylist(_rows(3)), manifest)
    for fmt in ("webdataset", "imagefolder"):
        out = tmp_path / f"out-{fmt}"
        result = _export(manifest, fmt, out)
        assert_cli_error(result, "curate: error: manifest has no images: run curate download first", out)
        assert result.stderr.strip() == "curate: error: manifest has no images: run curate download first"
        assert not list(tmp_path.glob(f".out-{fmt}*"))


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "img2dataset"])
def test_table_exports_find_the_images_from_where_the_export_lies(tmp_path, fmt):
    """image_path stayed relative to the source manifest's folder: none of them existed beside manifest.csv."""
    import pandas as pd

    manifest = files_manifest(tmp_path / "runs" / "downloaded")
    out = tmp_path / "exports" / fmt
    assert _export(manifest, fmt, out).exit_code == 0
    if fmt == "csv":
        paths = pd.read_csv(out / "manifest.csv")["image_path"].tolist()
    elif fmt == "jsonl":
        paths = pd.read_json(out / "manifest.jsonl", lines=True)["image_path"].tolist()
    else:
        paths = pq.read_table(out / "img2dataset_input.parquet").column("image_path").to_pylist()
    assert paths[0] == "../../runs/downloaded/images/00000/000000.jpg"
    assert [(out / path).read_bytes() for path in paths] == [_payload(i)[0] for i in range(12)]


def test_an_empty_image_path_stays_empty_in_table_exports(tmp_path):
    """"" (no image) became the source manifest's folder, '../m'."""
    from manifests.images import rebase_images

    table = pa.table({"image_path": ["", None, "a/1.jpg"]})
    assert rebase_images(table, tmp_path / "m", tmp_path / "e").column("image_path").to_pylist() == ["", None, "../m/a/1.jpg"]


def test_imagefolder_class_names_that_are_the_exports_files_or_hold_tabs(tmp_path):
    """Class 'classes.txt' crashed the export (a folder where the file goes); a tab or line break in a name made
    classes.txt unreadable, and every class lost its folder's label."""
    from manifests.export import read_class_folders

    names = ["classes.txt", "Manifest.parquet", "report.json", "dog\tbreed", "two\nlines", "back\\slash \\t", "cat"]
    table = pq.read_table(files_manifest(tmp_path / "m"))
    labels = [i % len(names) for i in range(table.num_rows)]
    table = table.set_column(1, "label", pa.array(labels, pa.int32()))
    table = table.set_column(2, "class_name", pa.array([names[label] for label in labels]))
    pq.write_table(table, tmp_path / "m" / "manifest.parquet")
    out = tmp_path / "folders"
    result = _export(tmp_path / "m" / "manifest.parquet", "imagefolder", out)
    assert result.exit_code == 0, result.output
    folders = read_class_folders(out)
    assert sorted(folders.values()) == sorted(names)
    assert {name: folder for folder, name in folders.items()}["classes.txt"] == "classes.txt_0"
    assert (out / "classes.txt").is_file() and (out / "manifest.parquet").is_file() and (out / "report.json").is_file()
    assert sum(1 for folder in folders if (out / folder).is_dir()) == len(names)
    listing = (out / "classes.txt").read_bytes()
    (out / "classes.txt").write_bytes(listing.replace(b"\n", b"\r\n"))  # as git's autocrlf or an editor saves it
    assert read_class_folders(out) == folders
    (out / "classes.txt").write_text("0\tC:\\temp\tC__temp\n", encoding="utf-8")  # written before escapes, no header
    assert read_class_folders(out) == {"C__temp": "C:\\temp"}


@pytest.mark.parametrize(("uid", "message"), [("", "has empty values in column 'uid'"), (" ", "has empty values in column 'uid'"),
                                              ("..", "uid '..' leaves no exported name")])
def test_a_uid_that_leaves_no_file_name_is_refused(tmp_path, uid, message):
    """An empty uid was written as the tar members '.jpg', '.cls', ...: webdataset read the sample as nothing."""
    manifest = files_manifest(tmp_path / "m")
    table = pq.read_table(manifest)
    pq.write_table(table.set_column(0, "uid", pa.array([uid, *table.column("uid").to_pylist()[1:]])), manifest)
    for fmt in ("webdataset", "imagefolder") if uid == ".." else ("webdataset",):
        out = tmp_path / f"out-{fmt}"
        if fmt == "webdataset" and uid == "..":
            assert _export(manifest, fmt, out).exit_code == 0  # '..' is key '__'
            continue
        assert_cli_error(_export(manifest, fmt, out), message, out)


def test_an_output_folder_that_cannot_be_made_is_one_error(tmp_path):
    manifest = files_manifest(tmp_path / "m")
    assert_cli_error(_export(manifest, "csv", Path("/proc/curate-export")), "cannot create a folder in /proc for /proc/curate-export")
