"""Shared fixtures: small parquet metadata, task files, a CLI runner."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers_images import write_task_file


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def write_task(tmp_path: Path):
    """Write a YAML task from a dict (or a text task from a list of names) into tmp_path; returns its path."""

    def write(data, name: str = "task") -> Path:
        return write_task_file(tmp_path, data, name)

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


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch thread for a module's tests and module fixtures (small models on a shared 2-core
    machine: they do not gain from more), restored when the module is done."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
