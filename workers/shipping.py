"""Directories as bytes, for work that runs on another Ray node.

Nodes of a cluster share the database and the object store, nothing else: a path of the
dispatcher's data dir does not exist on a worker node. A job's small directories (the
parent adapter a rank stacks on, the version an evaluation task scores, the result a rank
sends back) therefore travel through Ray as `{relative path: bytes}`, and the receiving side
writes them into a directory of its own node.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

Files = dict[str, bytes]

# Fields of a training RankTask (workers/training/runner.py) that name a directory on the
# dispatcher's node: shipped with the task, rewritten where they do not exist.
TASK_INPUT_DIRS = ("parent_adapter_dir", "orthogonal_to_adapter")


def read_files(directory: Path) -> Files:
    """Every file under `directory`, by its relative POSIX path."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def write_files(files: Files, directory: Path) -> Path:
    """Write `files` under `directory` (created); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        target = directory / name
        if directory.resolve() not in target.resolve().parents:
            raise ValueError(f"refusing to write {name!r} outside {directory}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return directory


def changed_files(directory: Path, before: Files) -> Files:
    """Files under `directory` that are new or differ from `before` (what a task wrote)."""
    return {name: data for name, data in read_files(directory).items()
            if before.get(name) != data}


def task_inputs(task: Any) -> dict[str, Files]:
    """The task's input directories (TASK_INPUT_DIRS), read on the dispatcher's node."""
    out: dict[str, Files] = {}
    for name in TASK_INPUT_DIRS:
        path = getattr(task, name, None)
        if path and str(path) not in out and Path(path).is_dir():
            out[str(path)] = read_files(Path(path))
    return out


def task_on_this_node(task: Any, inputs: dict[str, Files]) -> tuple[Any, list[Path]]:
    """`task` with every input directory and the base model that this node lacks replaced
    by a local copy (the shipped files; the base model resolved into the task's data dir),
    and the temporary directories the copies are in (the caller removes them)."""
    from workers.model import base_model_on_this_node

    changes: dict[str, Any] = {}
    local: dict[str, str] = {}
    temporary: list[Path] = []
    for name in TASK_INPUT_DIRS:
        path = getattr(task, name, None)
        if not path or Path(path).is_dir():
            continue
        if str(path) not in inputs:
            raise RuntimeError(f"{name} {path} exists neither on this node nor in the task")
        if str(path) not in local:
            temporary.append(write_files(inputs[str(path)],
                                         Path(tempfile.mkdtemp(prefix="oblivio-input-"))))
            local[str(path)] = str(temporary[-1])
        changes[name] = local[str(path)]
    if not Path(task.base_model_path).is_dir():
        changes["base_model_path"] = str(base_model_on_this_node(
            task.base_model_path, task.base_model_sha256, task.base_model, task.data_dir))
    return (dataclasses.replace(task, **changes) if changes else task), temporary
