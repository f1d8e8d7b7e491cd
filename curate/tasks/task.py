"""Load and validate a task: YAML (DESIGN §2) or a plain text file with one class name per line."""

from __future__ import annotations

import dataclasses
import json
import unicodedata
from pathlib import Path
from typing import Any

import yaml

from curate.errors import CurateError, first_line

BUILTIN_DIR = Path(__file__).parent
_TASK_KEYS = {"name", "domain_text", "templates", "class_suffix", "backgrounds", "classes"}
_CLASS_KEYS = {"name", "aliases", "require_any", "exclude"}
DEFAULT_TEMPLATES = ("a photo of a {}.",)
_YAML_SUFFIXES = (".yaml", ".yml")
_KEPT_TAGS = ("tag:yaml.org,2002:null", "tag:yaml.org,2002:merge")


class _TextLoader(yaml.SafeLoader):
    """YAML whose plain scalars stay the text they are written as: a class 0777 is not 511, nor 1.10 1.1."""


_TextLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag in _KEPT_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


@dataclasses.dataclass(frozen=True)
class ClassSpec:
    """One class: its label is its index in the task's class list."""

    name: str
    aliases: tuple[str, ...] = ()
    require_any: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @property
    def terms(self) -> tuple[str, ...]:
        """The strings that name this class in a caption: its name, then its aliases."""
        return (self.name, *self.aliases)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    classes: tuple[ClassSpec, ...]
    domain_text: tuple[str, ...] = ()
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    class_suffix: str = ""
    backgrounds: tuple[str, ...] = ()
    source: str = ""

    @property
    def class_names(self) -> list[str]:
        return [spec.name for spec in self.classes]

    def to_dict(self) -> dict[str, Any]:
        """The task as YAML-ready data (classes without options stay bare strings)."""
        data: dict[str, Any] = {"name": self.name}
        for key in ("domain_text", "templates", "backgrounds"):
            if getattr(self, key):
                data[key] = list(getattr(self, key))
        if self.class_suffix:
            data["class_suffix"] = self.class_suffix
        data["classes"] = [_class_to_data(spec) for spec in self.classes]
        return data


def builtin_task_names() -> list[str]:
    return sorted(path.stem for path in BUILTIN_DIR.glob("*.yaml"))


def builtin_task(name: str) -> Task:
    """A builtin task by name, whatever the working folder holds."""
    return load_task(builtin_task_file(name))


def builtin_task_file(name: str) -> Path:
    """The YAML file of builtin task `name`: a reference to it that no file in the working folder can shadow."""
    path = _builtin_path(name)
    if path is None:
        raise CurateError(f"no builtin task '{name}' ({', '.join(builtin_task_names())})")
    return path


def _builtin_path(name: str) -> Path | None:
    """The file of builtin task `name`; None unless `name` is exactly one (not a path that happens to lead there)."""
    return BUILTIN_DIR / f"{name}.yaml" if name in builtin_task_names() else None


def load_task(ref: str | Path | Task) -> Task:
    """Load a builtin task by name, or a task file (.yaml/.yml/.json, or text: one class per line); a Task is returned as it is."""
    if isinstance(ref, Task):
        return ref
    path = Path(ref)
    builtin = _builtin_path(str(ref))
    if not path.is_file() and builtin is not None:
        path = builtin  # a folder named like a builtin task (e.g. an output folder) does not hide it
    elif path.is_dir():
        raise CurateError(f"task file {path} is a directory")
    elif not path.exists():
        known = ", ".join(builtin_task_names())
        raise CurateError(f"task '{ref}' is neither a file nor a builtin task ({known})")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is no part of the first class name
    except (OSError, UnicodeDecodeError) as exc:
        raise CurateError(f"cannot read task file {path}: {exc}") from None
    if path.suffix.lower() in _YAML_SUFFIXES:
        return task_from_data(_parse_yaml(text, path), source=str(path))
    if path.suffix.lower() == ".json":
        return task_from_data(_parse_json(text, path), source=str(path))
    return task_from_lines(text, name=path.stem, source=str(path))


def task_from_lines(text: str, name: str, source: str = "") -> Task:
    """A text task: one class name per line; blank lines and lines starting with '#' are skipped."""
    names = [line.strip() for line in text.splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    return task_from_data({"name": name, "classes": names}, source=source)


def task_from_data(data: Any, source: str = "<data>") -> Task:
    """Validate parsed YAML data and build a Task; every problem is one CurateError line."""
    where = f"task {source}"
    if not isinstance(data, dict):
        raise CurateError(f"{where}: expected a mapping with 'name' and 'classes'")
    unknown = sorted(set(data) - _TASK_KEYS)
    if unknown:
        raise CurateError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_TASK_KEYS)}")
    listed = data.get("classes") or []
    if not isinstance(listed, list):
        raise CurateError(f"{where}: 'classes' must be a list (one entry per class), got {type(listed).__name__}")
    classes = tuple(_parse_class(item, i, where) for i, item in enumerate(listed))
    if not classes:
        raise CurateError(f"{where}: no classes")
    _check_unique_names(classes, where)
    templates = _string_list(data, "templates", where) or DEFAULT_TEMPLATES
    for template in templates:
        _check_template(template, where)
    return Task(
        name=_string(data.get("name") or Path(source).stem, "name", where),
        classes=classes,
        domain_text=_string_list(data, "domain_text", where),
        templates=templates,
        class_suffix=_string(data.get("class_suffix", ""), "class_suffix", where, allow_empty=True),
        backgrounds=_string_list(data, "backgrounds", where),
        source=source,
    )


def _check_template(template: str, where: str) -> None:
    """A template is filled with str.format(class name): a '{}' for it, and no other field."""
    marker = "\x00class\x00"
    try:
        filled = template.format(marker)
    except (IndexError, KeyError, ValueError) as exc:
        raise CurateError(f"{where}: template {template!r} is not a format string with one '{{}}' for the class name "
                          f"({type(exc).__name__}: {exc})") from None
    if marker not in filled:
        raise CurateError(f"{where}: template {template!r} has no '{{}}' placeholder for the class name")


def _parse_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CurateError(f"task file {path} is not valid JSON: {exc}") from None


def _parse_yaml(text: str, path: Path) -> Any:
    try:
        return yaml.load(text, Loader=_TextLoader)
    except yaml.YAMLError as exc:
        raise CurateError(f"task file {path} is not valid YAML: {first_line(exc)}") from None


def _parse_class(item: Any, index: int, where: str) -> ClassSpec:
    if not isinstance(item, dict):
        return ClassSpec(name=_string(item, f"classes[{index}]", where))
    unknown = sorted(set(item) - _CLASS_KEYS)
    if unknown:
        raise CurateError(f"{where}: classes[{index}] has unknown key(s) {unknown}; allowed: {sorted(_CLASS_KEYS)}")
    name = _string(item.get("name"), f"classes[{index}].name", where)
    lists = {key: _string_list(item, key, f"{where}: class '{name}'") for key in ("aliases", "require_any", "exclude")}
    return ClassSpec(name=name, **lists)


def _check_unique_names(classes: tuple[ClassSpec, ...], where: str) -> None:
    """Class names are unique, and each alias belongs to one class: a caption naming a shared one would
    name both classes, always."""
    names: set[str] = set()
    for spec in classes:
        if _term_key(spec.name) in names:
            raise CurateError(f"{where}: duplicate class name {spec.name!r}")
        names.add(_term_key(spec.name))
    owner = {_term_key(spec.name): spec.name for spec in classes}
    for spec in classes:
        for alias in spec.aliases:
            other = owner.setdefault(_term_key(alias), spec.name)
            if other != spec.name:
                raise CurateError(f"{where}: alias {alias!r} of class {spec.name!r} also names class {other!r}")


def name_key(name: str) -> str:
    """How class names compare (task files, manifests, eval folders): case aside, and in one Unicode form
    (macOS writes file names decomposed)."""
    return unicodedata.normalize("NFC", name).casefold()


def _term_key(term: str) -> str:
    return " ".join(name_key(term).split())  # as captions match it: any case, any run of whitespace


def _string(value: Any, what: str, where: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise CurateError(f"{where}: {what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise CurateError(f"{where}: {what} is empty")
    return value if allow_empty else value.strip()


def _string_list(data: dict, key: str, where: str) -> tuple[str, ...]:
    value = data.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise CurateError(f"{where}: '{key}' must be a list of strings")
    return tuple(_string(v, f"an entry of '{key}'", where) for v in value)


def _class_to_data(spec: ClassSpec) -> Any:
    options = {k: list(getattr(spec, k)) for k in ("aliases", "require_any", "exclude") if getattr(spec, k)}
    return {"name": spec.name, **options} if options else spec.name
