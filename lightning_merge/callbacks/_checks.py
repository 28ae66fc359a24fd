"""Argument checks and small steps of :class:`~lightning_merge.callbacks.MergeCallback` (its constructor and merge)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import Tensor

from lightning_merge.callbacks._tasks import check_task_names
from lightning_merge.engine import MergePlan
from lightning_merge.io import CheckpointSource
from lightning_merge.methods import MergeMethod, get_method

PathLike = str | os.PathLike
SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)
Methods = str | MergeMethod | Sequence[str | MergeMethod] | Mapping[str, str | MergeMethod]


def check_task(task: str | None, tasks: Sequence[str]) -> str | None:
    """The ``task`` argument: ``None`` or one of the declared ``tasks``."""
    if task is not None and (not isinstance(task, str) or task not in tasks):
        raise ValueError(f"Expected argument `task` to be None or one of the tasks {list(tasks)}, but got {task!r}.")
    return task


def named_methods(methods: Methods) -> dict[str, MergeMethod]:
    """``{display name: method}`` from a registry name, a method object, a sequence of those, or such a mapping."""
    listed: Any = [methods] if isinstance(methods, str | MergeMethod) else methods
    items: list[tuple[Any, Any]] = []
    if isinstance(listed, Mapping):
        items = list(listed.items())
    elif isinstance(listed, Sequence):
        items = [(m if isinstance(m, str) else getattr(m, "name", None), m) for m in listed]
    names = [n for n, _ in items]
    if not items or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ValueError(
            "Expected argument `methods` to be a method name, a method object, a list of them with distinct names,"
            f" or a mapping {{display name: method}}, but got {methods!r}."
        )
    return {name: get_method(method) for name, method in items}


def check_workflow(tasks: Sequence[str] | None, base: PathLike | None,
                   finetuned: Mapping[str, Any] | None) -> tuple[str, ...]:
    if (tasks is None) == (finetuned is None):
        raise ValueError(
            "Expected exactly one of the arguments `tasks` (fine-tune the tasks with this callback, one fit each) and"
            f" `finetuned` (checkpoints of tasks fine-tuned elsewhere), but got tasks={tasks!r} and"
            f" finetuned={finetuned!r}."
        )
    if finetuned is not None:
        if base is None or not isinstance(finetuned, Mapping) or not finetuned:
            raise ValueError(
                "Expected argument `finetuned` to be a non-empty mapping {task: checkpoint} together with `base`, but"
                f" got finetuned={finetuned!r} and base={base!r}."
            )
        return check_task_names(list(finetuned))
    return check_task_names(tasks)


def check_dirpath(dirpath: PathLike | None) -> Path | None:
    """The ``dirpath`` argument: ``None`` (the default folder) or a non-empty path; ``""`` (an unset shell variable)
    would make the working directory the run's folder."""
    if dirpath is None:
        return None
    if not isinstance(dirpath, str | os.PathLike) or not isinstance(os.fspath(dirpath), str) or not os.fspath(dirpath):
        raise ValueError(f"Expected argument `dirpath` to be None or a folder path, but got {dirpath!r}.")
    if "\0" in os.fspath(dirpath):
        raise ValueError(f"Expected argument `dirpath` to be None or a folder path, but {dirpath!r} holds a NUL.")
    return Path(dirpath)


def check_patterns(exclude: Sequence[str]) -> tuple[str, ...]:
    if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
        raise TypeError(f"Expected argument `exclude` to be a list of patterns, but got {exclude!r}.")
    return tuple(exclude)


def check_strategy(strategy: pl.strategies.Strategy) -> None:
    if isinstance(strategy, SHARDED_STRATEGIES):
        raise ValueError(
            f"MergeCallback does not support the sharded strategy {type(strategy).__name__}: each rank holds only"
            " part of every parameter. HINT: merge with strategy='ddp' (or one device), or merge the saved"
            " checkpoints with the `lightning-merge` command."
        )


def checkpoint_path(task: str, checkpoint: PathLike | ModelCheckpoint) -> str:
    if isinstance(checkpoint, ModelCheckpoint):
        if not checkpoint.best_model_path:
            raise ValueError(f"The ModelCheckpoint given for task {task!r} has no `best_model_path` yet.")
        return checkpoint.best_model_path
    return os.fspath(checkpoint)


def load_into(pl_module: torch.nn.Module, merged: Mapping[str, Tensor]) -> None:
    unknown = sorted(set(merged) - set(pl_module.state_dict()))
    if unknown:
        raise ValueError(
            f"The merged checkpoints have keys the module does not, e.g. {unknown[:3]}. HINT: pass `prefix` to"
            " strip a key prefix such as 'model.'."
        )
    pl_module.load_state_dict(dict(merged), strict=False)



def check_full_merge(lora: bool, plan: MergePlan | None, base: CheckpointSource | None) -> None:
    """Refuse :meth:`MergeCallback.task_matrices` for LoRA fits (not yet) and before a merge has run."""
    if lora:
        raise ValueError(
            "MergeCallback.task_matrices supports full fine-tunes only, but this run merged LoRA adapters. HINT:"
            " merge the adapters of dirpath/task-XX-<task> with lightning_merge.lora.merge_adapters per method."
        )
    if plan is None or base is None:
        raise ValueError(
            "Expected a merge to have run before MergeCallback.task_matrices, but none has. HINT: call it after"
            " the fit that merges (with ddp_spawn: in the children), or after merge_collected()."
        )
