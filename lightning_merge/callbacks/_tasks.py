"""Which task a fit is, where its files go, and the run's state on disk (the manifest), across processes.

Workflow 1 of :class:`~lightning_merge.callbacks.MergeCallback` records one task per ``Trainer.fit``. The task of a
fit is resolved by :func:`resolve_task`; every recorded task is listed in ``dirpath/manifest.json``, rewritten
atomically by rank zero after each record, so that a new process with the same ``tasks`` and ``dirpath`` (one job per
task) resumes the run: :func:`adopt_manifest`. Task names become file and folder names only through
:func:`safe_name`, checked once at construction by :func:`check_task_names`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_merge.engine import compile_exclude, plan_merge
from lightning_merge.io import CheckpointSource, open_source
from lightning_merge.io.output import not_replaceable

TASK_ENV = "LIGHTNING_MERGE_TASK"
MANIFEST = "manifest.json"
_MAX_NAME = 128


def safe_name(task: str) -> str:
    """``task`` as a file name: ASCII letters, digits, ``-``, ``_`` and ``.`` kept, anything else (path separators
    included) replaced by ``_``, and a leading ``.`` too (no hidden file, no ``..``)."""
    safe = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "_" for c in task)
    return "_" + safe[1:] if safe.startswith(".") else safe


def task_dirname(index: int, task: str) -> str:
    """The folder of the task declared at ``index``: ``task-XX-<safe name>``."""
    return f"task-{index:02d}-{safe_name(task)}"


def check_task_names(tasks: Sequence[str] | None) -> tuple[str, ...]:
    """The declared task names, checked: a sequence of non-empty str without NUL, distinct, and still distinct as file
    names (:func:`safe_name`, compared case-insensitively for case-insensitive file systems)."""
    names = list(tasks) if tasks is not None and not isinstance(tasks, str) else []
    if not names or not all(isinstance(t, str) and t and "\0" not in t for t in names) or len(set(names)) != len(names):
        raise ValueError(f"Expected argument `tasks` to be a sequence of distinct task names, but got {tasks!r}.")
    seen: dict[str, str] = {}
    for task in names:
        key = safe_name(task).casefold()
        if key in seen or len(safe_name(task)) > _MAX_NAME:
            reason = f"{seen[key]!r} and {task!r} have the same" if key in seen else f"{task!r} has a too long"
            raise ValueError(
                f"Expected argument `tasks` to hold names that stay distinct as file names, but {reason} file name"
                f" {safe_name(task)!r}. HINT: names keep ASCII letters, digits, '-', '_' and '.', other characters"
                f" become '_' (at most {_MAX_NAME} characters); rename one of them."
            )
        seen[key] = task
    return tuple(names)


def resolve_task(explicit: str | None, trainer: Any, pl_module: Any,
                 tasks: Sequence[str], collected: Sequence[str]) -> tuple[str | None, str]:
    """The task of this fit and where it came from, in this order: ``explicit`` (the callback's ``task``), the
    environment variable ``LIGHTNING_MERGE_TASK``, a ``merge_task`` attribute of the datamodule, then of the
    LightningModule, and only then the first declared task not recorded yet (``None`` when all are)."""
    if explicit is not None:
        return explicit, "the MergeCallback's `task`"
    if os.environ.get(TASK_ENV):
        return os.environ[TASK_ENV], f"the environment variable {TASK_ENV}"
    for owner, obj in (("the datamodule", getattr(trainer, "datamodule", None)), ("the LightningModule", pl_module)):
        value = getattr(obj, "merge_task", None) if obj is not None else None
        if value is not None:
            return value, f"`merge_task` of {owner}"
    remaining = [t for t in tasks if t not in collected]
    return (remaining[0] if remaining else None), "the next declared task not recorded yet"


def check_fit_task(task: Any, origin: str, tasks: Sequence[str], collected: Sequence[str], overwrite: bool) -> str:
    """Refuse, before training, a task that is not declared, or one already recorded (unless ``overwrite``)."""
    if task is None:
        raise ValueError(f"MergeCallback already merged its tasks {list(tasks)}. HINT: use a new MergeCallback.")
    if not isinstance(task, str) or task not in tasks:
        raise ValueError(
            f"Expected the task of this fit (from {origin}) to be one of the declared tasks {list(tasks)}, but got"
            f" {task!r}."
        )
    if task in collected and not overwrite:
        raise ValueError(
            f"Expected the task of this fit (from {origin}) to be one not recorded yet, but {task!r} is already"
            f" recorded (recorded: {list(collected)}; declared: {list(tasks)}). HINT: pass overwrite=True to record"
            " it again, or name another task."
        )
    return task


def in_order(tasks: Sequence[str], recorded: Sequence[str]) -> list[str]:
    """The recorded tasks in declared order."""
    return [t for t in tasks if t in set(recorded)]


def missing_message(missing: Sequence[str]) -> str:
    return (
        f"MergeCallback: tasks {list(missing)} are not recorded yet; the fit that records the last of them merges. To"
        " merge the recorded ones now: `merge.merge_collected(module)` (in another process: a MergeCallback with the"
        " same `tasks` and `dirpath`)."
    )


def implicit_resume_message(task: str, dirpath: Path, collected: Sequence[str]) -> str:
    return (
        f"Expected this fit to name its task when it resumes the unfinished run in {str(dirpath)!r} (recorded:"
        f" {list(collected)}), but it names none, and taking the next declared task ({task!r}) would pair its data"
        " with a task only by the order of the runs (e.g. a loop over the tasks re-run after an interruption). HINT:"
        " name each fit's task (MergeCallback(task=...), LIGHTNING_MERGE_TASK, or a `merge_task` attribute of the"
        " datamodule), or start a new run with another `dirpath`."
    )


def check_starts_from_base(base_folder: Path, state: Mapping[str, Tensor], exclude: Sequence[str], task: str) -> None:
    """Warn when the module of ``task`` does not start from the recorded pre-trained snapshot."""
    base = open_source(base_folder, label="base snapshot")
    plan = plan_merge(base, [open_source(dict(state), label="the module")], exclude=exclude, strict=False)
    changed = [k for k in plan.merge_keys if not torch.equal(base.get_tensor(k), state[k].detach().cpu())]
    if changed:
        rank_zero_warn(
            f"MergeCallback: task {task!r} does not start from the pre-trained weights ({len(changed)} parameters"
            f" differ, e.g. {changed[0]!r}). HINT: build each task's module from the pre-trained weights, not from"
            " the previous task's fine-tune."
        )


# ------------------------------------------------------------------------------------------------ the manifest
def read_manifest(dirpath: Path) -> dict[str, Any] | None:
    """The manifest in ``dirpath`` (``None`` when there is none), checked: a folder may come from elsewhere."""
    path = dirpath / MANIFEST
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"Expected {str(path)!r} to hold MergeCallback's JSON manifest, but it does not parse ({err})."
                         " HINT: use another `dirpath`, or delete the file to start a new run there.") from None
    if not _is_manifest(state):
        raise ValueError(
            f"Expected {str(path)!r} to hold MergeCallback's manifest (a run_id string, the tasks and collected lists"
            " of task names, heads as {task: [keys]}), but it does not. HINT: use another `dirpath`, or delete the"
            " file to start a new run there."
        )
    return state


def _is_manifest(state: Any) -> bool:
    def names(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    heads = state.get("heads", {}) if isinstance(state, dict) else None
    return (isinstance(state, dict) and isinstance(state.get("run_id"), str) and names(state.get("tasks"))
            and names(state.get("collected")) and isinstance(heads, dict)
            and all(isinstance(k, str) and names(v) for k, v in heads.items()))


def write_manifest(dirpath: Path, state: Mapping[str, Any]) -> None:
    tmp = dirpath / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(dict(state)))
    os.replace(tmp, dirpath / MANIFEST)


# the folders a run writes in `dirpath` besides the task folders (callbacks/merge.py, _lora.py, _compress.py)
RUN_FOLDERS = ("base", "merged", "merged_adapter", "merged_heads", "compressed")


def check_run_folders(dirpath: Path, tasks: Sequence[str]) -> None:
    """Refuse, before training, a ``dirpath`` without a manifest (not a run's folder, or workflow 2) that holds a
    folder the run would replace and that is not this library's output (see
    :func:`~lightning_merge.io.output.not_replaceable`: a folder whose valid record lists its files, or an empty
    one)."""
    names = [*RUN_FOLDERS, *(task_dirname(i, task) for i, task in enumerate(tasks))]
    for path in (dirpath / name for name in names):
        reason = not_replaceable(path) if path.exists() or path.is_symlink() else None
        if reason is not None:
            raise ValueError(
                f"Expected `dirpath` {str(dirpath)!r} to hold no folder a run replaces unless lightning-merge wrote"
                f" it, but {str(path)!r} {reason} and there is no {MANIFEST} of a run. HINT: use another `dirpath`,"
                " or move that folder away."
            )


def adopt_manifest(state: Mapping[str, Any] | None, run_id: str, tasks: Sequence[str], dirpath: Path,
                   finished: bool = False) -> tuple[dict[str, Any] | None, str]:
    """What to take over from the manifest ``state`` found in ``dirpath``, and a message for the log.

    The same run (e.g. the children of ``ddp_spawn``): everything. Another process's unfinished run of the same
    tasks: everything (it resumes). A finished run, or one that recorded no task yet (its first fit was
    interrupted): nothing (a new run starts). Another run with other tasks that is unfinished: an error, since its
    files would be mixed with this one's.
    """
    if state is None:
        return None, ""
    complete = set(state.get("collected", [])) >= set(state.get("tasks", []))
    if state.get("run_id") == run_id:
        return dict(state), ""
    if not state.get("collected"):
        return None, f"MergeCallback: {dirpath} holds a run that recorded no task; a new run starts there."
    same_tasks = list(state.get("tasks", [])) == list(tasks)
    if complete and not (finished and same_tasks):
        return None, f"MergeCallback: {dirpath} holds a finished run; a new run starts there."
    if not same_tasks:
        raise ValueError(
            f"Expected `dirpath` {str(dirpath)!r} to hold no unfinished run or one of the same tasks {list(tasks)},"
            f" but it holds an unfinished run of the tasks {state.get('tasks')} (recorded: {state.get('collected')})."
            " HINT: use another `dirpath`, the same `tasks`, or delete the folder."
        )
    missing = [t for t in tasks if t not in state.get("collected", [])]
    return dict(state), (
        f"MergeCallback: resuming the run in {dirpath}: recorded {state.get('collected')}, missing {missing}."
    )


# ------------------------------------------------------------------------------------------------ heads
def excluded(keys: Iterable[str], exclude: Sequence[str]) -> list[str]:
    """The ``keys`` matched by ``exclude`` (globs, or regexes after ``re:``, as in the merge plan), in order."""
    matchers = compile_exclude(exclude)
    return [k for k in keys if any(m(k) for m in matchers)]


def head_state(state: Mapping[str, Tensor], exclude: Sequence[str]) -> dict[str, Tensor]:
    """The keys of ``state`` matched by ``exclude`` (the task-specific ones), as detached contiguous CPU copies."""
    return {k: state[k].detach().cpu().contiguous().clone() for k in excluded(state, exclude)}


def source_heads(source: CheckpointSource, exclude: Sequence[str]) -> dict[str, Tensor]:
    """The task-specific tensors of a recorded or given task: its own keys matched by ``exclude`` (its shapes)."""
    return {k: source.get_tensor(k) for k in excluded(source.keys(), exclude)}


def check_head_keys(task: str, keys: Sequence[str], recorded: Mapping[str, Sequence[str]]) -> None:
    """Refuse a task whose task-specific keys differ from those of the tasks recorded before (shapes may differ)."""
    for other, other_keys in recorded.items():
        if other == task or set(other_keys) == set(keys):
            continue
        key = sorted(set(keys) ^ set(other_keys))[0]
        where = f"task {task!r} has it but {other!r} does not" if key in keys else f"{other!r} has it, {task!r} not"
        raise ValueError(
            f"Expected the keys matched by `exclude` of task {task!r} to be those of the recorded task {other!r},"
            f" but key {key!r} differs ({where}). HINT: every task's module needs the same task-specific modules"
            " (their shapes may differ, e.g. the number of classes); check `exclude`."
        )


def check_head_values(task: str, head: Mapping[str, Tensor]) -> None:
    """Refuse a task whose task-specific tensors hold NaN or Inf (a diverged fit), naming the task and the key."""
    for key, value in head.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"Expected the task-specific tensor {key!r} of task {task!r} to be finite, but it holds NaN or Inf."
                " HINT: the fit diverged; lower the learning rate and fit this task again."
            )
