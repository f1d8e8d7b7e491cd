from __future__ import annotations

import json

import pytest

from curate.cli import cli
from curate.errors import CurateError
from curate.tasks import builtin_task, builtin_task_names, load_task

EXPECTED_SIZES = {"fgvc-aircraft": 100, "stanford-cars": 196, "flowers102": 102, "oxford-pets": 37, "imagenet-100": 100, "demo": 5}


@pytest.mark.parametrize(("name", "size"), sorted(EXPECTED_SIZES.items()))
def test_builtin_tasks_load_with_expected_sizes(name, size):
    task = load_task(name)
    assert len(task.classes) == size
    assert task.domain_text and task.templates
    assert all("{}" in t for t in task.templates)
    assert len({c.name.casefold() for c in task.classes}) == size


def test_builtin_names_listed():
    assert set(EXPECTED_SIZES) <= set(builtin_task_names())


def test_ambiguous_flower_and_pet_names_need_a_domain_word():
    flowers = {c.name: c for c in load_task("flowers102").classes}
    assert "flower" in flowers["rose"].require_any
    pets = {c.name: c for c in load_task("oxford-pets").classes}
    assert "dog" in pets["Boxer"].require_any


def test_yaml_task_with_options(write_task):
    path = write_task({"name": "t", "domain_text": ["a photo of a flower"], "classes": ["tulip", {"name": "rose", "aliases": ["roses"], "require_any": ["flower"], "exclude": ["rose gold"]}, 707]})
    task = load_task(path)
    assert task.class_names == ["tulip", "rose", "707"]
    assert task.classes[1].terms == ("rose", "roses")
    assert task.templates == ("a photo of a {}.",)


def test_text_task_one_class_per_line(write_task):
    task = load_task(write_task(["# aircraft", "737-800", "", "  A320  "], name="planes"))
    assert task.name == "planes"
    assert task.class_names == ["737-800", "A320"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "t", "classes": []}, "no classes"),
        ({"name": "t"}, "no classes"),
        ({"name": "t", "classes": ["Rose", "rose"]}, "duplicate class name 'rose'"),
        ({"name": "t", "classes": ["caf\u00e9", "cafe\u0301"]}, "duplicate class name 'cafe\u0301'"),  # one name, two forms
        ({"name": "t", "classes": [{"name": "rose", "aliases": ["Tulip"]}, "tulip"]},
         "alias 'Tulip' of class 'rose' also names class 'tulip'"),
        ({"name": "t", "classes": [{"name": "a", "aliases": ["rose  bush"]}, {"name": "b", "aliases": ["Rose Bush"]}]},
         "alias 'Rose Bush' of class 'b' also names class 'a'"),
        ({"name": "t", "classes": [{"name": "rose", "aliases": [""]}]}, "an entry of 'aliases' is empty"),
        ({"name": "t", "classes": ["x"], "colour": 1}, "unknown key(s) ['colour']"),
        ({"name": "t", "classes": [{"name": "x", "alias": ["y"]}]}, "unknown key(s) ['alias']"),
        ({"name": "t", "classes": ["x"], "templates": ["a photo"]}, "has no '{}' placeholder"),
        ({"name": "t", "classes": ["x"], "templates": ["a {{}} photo"]}, "has no '{}' placeholder"),
        ({"name": "t", "classes": ["x"], "templates": ["a {} on a {surface}"]},
         "template 'a {} on a {surface}' is not a format string with one '{}' for the class name (KeyError: 'surface')"),
        ({"name": "t", "classes": ["x"], "templates": ["a {} and a {}"]}, "(IndexError"),
        ({"name": "t", "classes": "rose"}, "'classes' must be a list (one entry per class), got str"),
        ({"name": "t", "classes": 737}, "'classes' must be a list (one entry per class), got str"),
        ({"name": "t", "classes": {"rose": {"exclude": ["rose gold"]}}}, "'classes' must be a list (one entry per class), got dict"),
        (["# only a comment"], "no classes"),
    ],
)
def test_invalid_tasks_fail_with_one_clear_error(write_task, data, message):
    with pytest.raises(CurateError) as error:
        load_task(write_task(data))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_yaml_scalars_keep_their_spelling_as_class_names(tmp_path):
    """YAML 1.1 reads 0777 as 511, 12:30 as 750 and 1.10 as 1.1: a class name is the text as written."""
    path = tmp_path / "t.yaml"
    path.write_text("name: t\nclasses: [0777, 1.10, 12:30, 007, true, 2001-01-01, 1e3, {name: x, aliases: ~}]\n")
    assert load_task(path).class_names == ["0777", "1.10", "12:30", "007", "true", "2001-01-01", "1e3", "x"]


def test_a_byte_order_mark_is_not_part_of_the_first_class(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbfrose\ntulip\n")
    assert load_task(path).class_names == ["rose", "tulip"]


def test_json_task_files(tmp_path):
    """JSON is read as JSON: YAML refuses tab indents and reads the escape of a 🌹 as two lone surrogates."""
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"name": "t", "classes": ["rose \U0001F339", "tulip"]}, indent="\t"))
    assert load_task(path).class_names == ["rose \U0001F339", "tulip"]
    path.write_text('{"classes": ["rose",}')
    with pytest.raises(CurateError, match="is not valid JSON: "):
        load_task(path)


def test_unknown_task_name():
    with pytest.raises(CurateError, match="neither a file nor a builtin task"):
        load_task("no-such-task")


def test_a_missing_path_never_falls_back_to_a_yaml_file_beside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "planes.yaml").write_text("name: planes\nclasses: [A320]\n", encoding="utf-8")
    for ref in (str(tmp_path / "planes"), "../tasks/demo"):  # the second once led from the builtin folder to demo
        with pytest.raises(CurateError, match="is neither a file nor a builtin task"):
            load_task(ref)
    with pytest.raises(CurateError, match="no builtin task 'planes'"):
        builtin_task("planes")


def test_a_folder_named_like_a_builtin_task_does_not_hide_it(tmp_path, monkeypatch, runner):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # e.g. `curate demo --out demo`
    (tmp_path / "stanford-cars").write_text("only one class\n", encoding="utf-8")
    assert len(load_task("demo").classes) == 5
    with pytest.raises(CurateError, match="is a directory"):
        load_task(tmp_path / "demo")
    listed = runner.invoke(cli, ["tasks"])
    assert listed.exit_code == 0, listed.output
    assert "demo                5 classes" in listed.output and "stanford-cars     196 classes" in listed.output


def test_cli_lists_and_shows_tasks(runner):
    listed = runner.invoke(cli, ["tasks"])
    assert listed.exit_code == 0
    assert "fgvc-aircraft" in listed.output and " 100 classes" in listed.output
    shown = runner.invoke(cli, ["tasks", "show", "demo"])
    assert shown.exit_code == 0
    assert "- red circle" in shown.output and "name: demo" in shown.output
