"""Directories shipped to another node: what a rank gets where the dispatcher's paths do not exist."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from workers.model.base_model import _weights_sha256
from workers.shipping import changed_files, read_files, task_inputs, task_on_this_node, write_files


@dataclass
class _Task:
    base_model_path: str
    base_model_sha256: str
    base_model: str
    data_dir: str
    parent_adapter_dir: str | None = None
    orthogonal_to_adapter: str | None = None


def test_a_missing_input_directory_is_written_from_the_shipped_files(tmp_path, tiny_model_dir):
    parent = write_files({"adapter_config.json": b"{}", "sub/w.bin": b"\x00\x01"},
                         tmp_path / "parent")
    task = _Task(str(tiny_model_dir), "", "", str(tmp_path), parent_adapter_dir=str(parent),
                 orthogonal_to_adapter=str(parent))
    inputs = task_inputs(task)
    assert list(inputs) == [str(parent)]  # one copy for both fields

    # On this node the path exists: the task is left as it is.
    same, temporary = task_on_this_node(task, inputs)
    assert same is task and temporary == []

    elsewhere = _Task(**{**task.__dict__, "parent_adapter_dir": str(tmp_path / "gone"),
                         "orthogonal_to_adapter": str(tmp_path / "gone")})
    local, temporary = task_on_this_node(elsewhere, {str(tmp_path / "gone"): inputs[str(parent)]})
    assert local.parent_adapter_dir == local.orthogonal_to_adapter == str(temporary[0])
    assert read_files(Path(local.parent_adapter_dir)) == read_files(parent)

    with pytest.raises(RuntimeError, match="exists neither on this node nor in the task"):
        task_on_this_node(elsewhere, {})


def test_a_node_without_the_base_model_path_resolves_the_spec_and_checks_its_weights(
        tmp_path, tiny_model_dir):
    sha = _weights_sha256(Path(tiny_model_dir))
    task = _Task(str(tmp_path / "head-only" / "model"), sha, str(tiny_model_dir), str(tmp_path))
    local, _ = task_on_this_node(task, {})
    assert Path(local.base_model_path) == Path(tiny_model_dir).resolve()

    planned_elsewhere = _Task(task.base_model_path, "0" * 64, str(tiny_model_dir), str(tmp_path))
    with pytest.raises(RuntimeError, match="the job was planned on"):
        task_on_this_node(planned_elsewhere, {})


def test_shipped_files_never_land_outside_their_directory_and_changes_are_found(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        write_files({"../escape": b"x"}, tmp_path / "d")
    directory = write_files({"a": b"1", "b": b"2"}, tmp_path / "v")
    before = read_files(directory)
    (directory / "b").write_bytes(b"3")
    (directory / "report.json").write_bytes(b"{}")
    assert changed_files(directory, before) == {"b": b"3", "report.json": b"{}"}
