"""Shared fixtures: small parquet metadata, task files, and a CLI runner."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def write_task(tmp_path: Path):
    """Write a YAML task from a dict (or a text task from a list of names); returns its path."""

    def write(data, name: str = "task") -> Path:
        if isinstance(data, list):
            path = tmp_path / f"{name}.txt"
            path.write_text("\n".join(data) + "\n", encoding="utf-8")
        else:
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        return path

    return write


@pytest.fixture
def write_laion(tmp_path: Path):
    """Write LAION-schema parquet from (url, caption) pairs plus optional extra columns; returns its path."""

    def write(rows, name: str = "part-0.parquet", **extra) -> Path:
        folder = tmp_path / "meta"
        folder.mkdir(exist_ok=True)
        table = {"URL": pa.array([r[0] for r in rows], pa.string()), "TEXT": pa.array([r[1] for r in rows], pa.string())}
        table.update(extra)
        path = folder / name
        pq.write_table(pa.table(table), path)
        return path

    return write


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA is present (never in CI)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def torch_one_thread():
    """Run a test with one torch thread (small models on a shared 2-core machine), then restore."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
