"""MergeCallback: collect the per-task fine-tunes and merge them at fit end, with the work split across ranks."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_merge.callbacks._distributed import exchange, merge_shard, ranked
from lightning_merge.callbacks._files import MergedRun, save_merged, save_snapshot
from lightning_merge.callbacks._lora import (
    MERGED_ADAPTER,
    check_lora_fit,
    find_peft_model,
    merge_lora_tasks,
    save_task_adapter,
)
from lightning_merge.engine import MergePlan, plan_merge, shard_keys
from lightning_merge.io import CheckpointSource, open_source
from lightning_merge.lora import LoraAdapter
from lightning_merge.methods import MergeMethod, get_method

log = logging.getLogger(__name__)
PathLike = str | os.PathLike
MANIFEST = "manifest.json"
SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


class MergeCallback(Callback):
    r"""Merge per-task fine-tunes of one pre-trained model when the last fit ends.

    Two workflows:

    1. ``tasks=[...]``: fine-tune the tasks one after another, one ``Trainer.fit`` each, passing this same callback.
       Each fit must start from the pre-trained weights. The callback snapshots them when the first fit starts,
       records each task's weights when its fit ends (rank zero writes them under ``dirpath``), and merges when the
       last task's fit ends.
    2. ``base=..., finetuned={task: checkpoint}``: tasks fine-tuned elsewhere (paths of Lightning ``.ckpt``,
       safetensors, Hugging Face folders, or ``ModelCheckpoint`` callbacks whose ``best_model_path`` is used); the
       merge happens when the current fit ends, into the module being fit.

    Under DDP the parameters are assigned to ranks by their estimated merge cost, each rank merges its share on its
    own device, and the results are exchanged through the strategy: every rank's module ends holding the same merged
    weights. Task-specific parameters matched by ``exclude`` (classification heads) are not merged; the module keeps
    its own, each task's are in :attr:`heads`; :attr:`plan`, :attr:`base_source` and :attr:`task_sources` say what
    was merged from where (e.g. to compare methods with ``MergedEvalLoop.compare``); and rank zero writes
    ``dirpath/merged`` (safetensors of the merged weights, excluded keys from the base, ``heads/<task>.safetensors``
    and ``merge_record.json``, a :class:`~lightning_merge.io.record.MergeRecord` with the inputs' sizes and hashes).

    LoRA fits (workflow 1 with a ``peft.PeftModel`` inside the module): each task's adapter is recorded under
    ``dirpath/task-XX-<task>`` (a peft adapter folder), the adapters are merged in low-rank form with
    :func:`~lightning_merge.lora.merge_adapters` (average, task arithmetic, TSV-M or SFTM; TIES is refused when the
    first fit starts) on every rank, rank zero writes ``dirpath/merged_adapter`` (loadable with
    ``PeftModel.from_pretrained``, also in :attr:`merged_adapter`), and the module then computes ``W0 + lam * M``:
    the merged update is added to its frozen base weights and its LoRA ``B`` factors are zeroed. Only the factors
    are merged: other parameters of the module (outside the ``PeftModel``) are left as the last fit ended them.

    Args:
        method: a registry name (``"tsv_m"``, ``"sftm"``, ``"ties"``, ``"task_arithmetic"``, ``"average"``) or a
            method object. method_options: the method's options, e.g. ``{"rank": 0.125}``.
        tasks: workflow 1, the task names in the order of the fits.
        base, finetuned: workflow 2, the pre-trained checkpoint and ``{task: checkpoint or ModelCheckpoint}``.
        exclude: glob patterns (or ``re:`` regexes) of task-specific keys, e.g. ``["head.*"]``.
        prefix: workflow 2, a key prefix to strip from the checkpoints (e.g. ``"model."``).
        dirpath: where task snapshots and the merged model go (default ``<default_root_dir>/merge``).
        device: where each rank merges (default: the strategy's root device).
        save_merged: write ``dirpath/merged`` on rank zero.
        progress: a progress bar on rank zero while merging.

    With ``strategy="ddp_spawn"`` the fits run in child processes: the launching process gets the merged weights
    back in its module (Lightning returns rank zero's), but this object's attributes (``heads``, ``plan``,
    ``merge_seconds``) are filled in the children only; read ``dirpath/merged`` (``merge_record.json``,
    ``heads/<task>.safetensors``) there, or use ``strategy="ddp"``.

    Example::

        merge = MergeCallback("tsv_m", tasks=["mnist", "svhn"], exclude=["head.*"])
        for task in merge.tasks:
            Trainer(max_epochs=3, callbacks=[merge]).fit(make_module(task), datamodules[task])
        merge.heads["svhn"]  # the task's own head, for evaluation with the merged body
    """

    def __init__(
        self,
        method: str | MergeMethod = "tsv_m",
        method_options: Mapping[str, Any] | None = None,
        *,
        tasks: Sequence[str] | None = None,
        base: PathLike | None = None,
        finetuned: Mapping[str, PathLike | ModelCheckpoint] | None = None,
        exclude: Sequence[str] = (),
        prefix: str | None = None,
        dirpath: PathLike | None = None,
        device: str | torch.device | None = None,
        save_merged: bool = True,
        progress: bool = True,
    ) -> None:
        self.method = get_method(method, **dict(method_options or {}))
        self.tasks = _check_workflow(tasks, base, finetuned)
        self.base, self.finetuned = base, dict(finetuned) if finetuned is not None else None
        self.exclude = _check_patterns(exclude)
        self.prefix, self.device, self.save_merged, self.progress = prefix, device, save_merged, progress
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self._run_id = uuid.uuid4().hex
        self._collected: list[str] = []
        self.heads: dict[str, dict[str, Tensor]] = {}
        self.plan: MergePlan | None = None
        self.base_source: CheckpointSource | None = None
        self.task_sources: dict[str, CheckpointSource] = {}
        self.merge_seconds: float | None = None
        self.merged_adapter: LoraAdapter | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method.name, tasks=self.tasks)

    @property
    def collected(self) -> list[str]:
        """The tasks whose fine-tuned weights are recorded (workflow 1)."""
        return list(self._collected)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _check_strategy(trainer.strategy)
        default = Path(trainer.default_root_dir) / "merge"
        self.dirpath = Path(trainer.strategy.broadcast(str(self.dirpath or default)))
        self._adopt_manifest()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.finetuned is not None or trainer.ckpt_path is not None:
            return
        if len(self._collected) == len(self.tasks):
            raise ValueError(f"MergeCallback already merged its tasks {self.tasks}. HINT: use a new MergeCallback.")
        if check_lora_fit(pl_module, self.method):  # LoRA: the frozen base stays in the module, no snapshot
            return
        if not self._collected:
            self._snapshot(trainer, pl_module, "base")
        else:
            self._check_starts_from_base(pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.finetuned is None:
            index = len(self._collected)
            self._snapshot(trainer, pl_module, _task_dirname(index, self.tasks[index]))
            self._collected.append(self.tasks[index])
            self._write_manifest(trainer)
            rank_zero_info(f"MergeCallback: recorded task {self.tasks[index]!r} ({index + 1}/{len(self.tasks)}).")
            if len(self._collected) < len(self.tasks):
                return
        self.merge(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self._run_id, "tasks": list(self.tasks), "collected": list(self._collected)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if list(state_dict.get("tasks", [])) != list(self.tasks):
            raise ValueError(
                f"Expected the checkpoint's MergeCallback tasks to be {list(self.tasks)}, but got"
                f" {state_dict.get('tasks')}. HINT: resume with the same `tasks`."
            )
        self._run_id, self._collected = state_dict["run_id"], list(state_dict["collected"])

    # ------------------------------------------------------------------------------------------------ the merge
    def merge(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Merge the recorded or given checkpoints into ``pl_module`` on every rank (called at fit end)."""
        start = time.perf_counter()
        if self.finetuned is None and find_peft_model(pl_module) is not None:
            self._merge_lora(trainer, pl_module, start)
            return
        base, tasks = self._sources(trainer)
        self.base_source, self.task_sources = base, tasks
        self.plan = plan_merge(base, list(tasks.values()), exclude=self.exclude)
        shards = shard_keys(self.plan, self.method, len(tasks), trainer.world_size)
        device = torch.device(self.device) if self.device is not None else trainer.strategy.root_device
        progress = self.progress and trainer.is_global_zero
        strategy = ranked(trainer.strategy)
        mine = merge_shard(strategy, self.method, base, list(tasks.values()), shards, device=device, progress=progress)
        merged = exchange(strategy, self.plan, base, mine)
        _load_into(pl_module, merged)
        self.heads = {t: {k: src.get_tensor(k) for k in self.plan.excluded_keys} for t, src in tasks.items()}
        self.merge_seconds = time.perf_counter() - start
        if self.save_merged:
            run = MergedRun(self.method, self.plan, base, tasks, self.exclude, trainer.world_size, device,
                            self.merge_seconds)
            self._save_merged(trainer, run, merged)
        self._log(trainer, len(tasks))

    def _merge_lora(self, trainer: pl.Trainer, pl_module: pl.LightningModule, start: float) -> None:
        assert self.dirpath is not None
        folders = [self.dirpath / _task_dirname(i, t) for i, t in enumerate(self.tasks)]
        output = self.dirpath / MERGED_ADAPTER if self.save_merged else None
        self.merged_adapter = merge_lora_tasks(trainer, pl_module, self.method, folders, output)
        self.merge_seconds = time.perf_counter() - start
        self._log(trainer, len(self.tasks))

    def _sources(self, trainer: pl.Trainer) -> tuple[CheckpointSource, dict[str, CheckpointSource]]:
        if self.finetuned is None:
            assert self.dirpath is not None
            base = open_source(self.dirpath / "base", label="base snapshot")
            paths = {t: self.dirpath / _task_dirname(i, t) for i, t in enumerate(self.tasks)}
            return base, {t: open_source(p, label=f"task {t!r}") for t, p in paths.items()}
        given = trainer.strategy.broadcast({t: _checkpoint_path(t, c) for t, c in self.finetuned.items()})
        base = open_source(self.base, prefix=self.prefix, label="base")  # type: ignore[arg-type]
        return base, {t: open_source(p, prefix=self.prefix, label=f"task {t!r}") for t, p in given.items()}

    def _log(self, trainer: pl.Trainer, num_tasks: int) -> None:
        rank_zero_info(
            f"MergeCallback: merged {num_tasks} tasks with {self.method.name} {self.method.options()} in"
            f" {self.merge_seconds:.2f} s on {trainer.world_size} rank(s)."
        )
        params = {f"merge/{k}": v for k, v in self.method.options().items()}
        for logger in trainer.loggers:
            logger.log_hyperparams({"merge/method": self.method.name, **params})
            logger.log_metrics({"merge/seconds": float(self.merge_seconds or 0.0), "merge/num_tasks": num_tasks},
                               step=trainer.global_step)

    # ---------------------------------------------------------------------------------------------- files
    def _snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> None:
        assert self.dirpath is not None
        peft_model = find_peft_model(pl_module)
        if trainer.is_global_zero and peft_model is not None:
            save_task_adapter(peft_model, self.dirpath / name)
        elif trainer.is_global_zero:
            state = {k: v.detach().cpu().contiguous().clone() for k, v in pl_module.state_dict().items()}
            save_snapshot(state, self.dirpath / name)
        trainer.strategy.barrier("MergeCallback.snapshot")

    def _save_merged(self, trainer: pl.Trainer, run: MergedRun, merged: Mapping[str, Tensor]) -> None:
        assert self.dirpath is not None
        if trainer.is_global_zero:
            state = {k: merged[k] if k in merged else run.base.get_tensor(k) for k in run.base.keys()}
            save_merged(self.dirpath / "merged", state, self.heads, run)
        trainer.strategy.barrier("MergeCallback.save_merged")

    def _write_manifest(self, trainer: pl.Trainer) -> None:
        assert self.dirpath is not None
        if trainer.is_global_zero:
            tmp = self.dirpath / f".{MANIFEST}.tmp"
            tmp.write_text(json.dumps(self.state_dict()))
            os.replace(tmp, self.dirpath / MANIFEST)
        trainer.strategy.barrier("MergeCallback.manifest")

    def _adopt_manifest(self) -> None:
        # With ddp_spawn the fits run in child processes, so this instance learns what they recorded from disk.
        assert self.dirpath is not None
        path = self.dirpath / MANIFEST
        if path.is_file() and self.finetuned is None:
            state = json.loads(path.read_text())
            if state.get("run_id") == self._run_id:
                self._collected = list(state["collected"])

    def _check_starts_from_base(self, pl_module: pl.LightningModule) -> None:
        assert self.dirpath is not None
        base = open_source(self.dirpath / "base", label="base snapshot")
        state = pl_module.state_dict()
        plan = plan_merge(base, [open_source(dict(state), label="the module")], exclude=self.exclude, strict=False)
        changed = [k for k in plan.merge_keys if not torch.equal(base.get_tensor(k), state[k].detach().cpu())]
        if changed:
            rank_zero_warn(
                f"MergeCallback: task {self.tasks[len(self._collected)]!r} does not start from the pre-trained"
                f" weights ({len(changed)} parameters differ, e.g. {changed[0]!r}). HINT: build each task's module"
                " from the pre-trained weights, not from the previous task's fine-tune."
            )


def _check_workflow(tasks: Sequence[str] | None, base: PathLike | None,
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
        return tuple(finetuned)
    names = list(tasks) if tasks is not None and not isinstance(tasks, str) else []
    if not names or not all(isinstance(t, str) and t for t in names) or len(set(names)) != len(names):
        raise ValueError(f"Expected argument `tasks` to be a sequence of distinct task names, but got {tasks!r}.")
    return tuple(names)


def _check_patterns(exclude: Sequence[str]) -> tuple[str, ...]:
    if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
        raise TypeError(f"Expected argument `exclude` to be a list of patterns, but got {exclude!r}.")
    return tuple(exclude)


def _check_strategy(strategy: pl.strategies.Strategy) -> None:
    if isinstance(strategy, SHARDED_STRATEGIES):
        raise ValueError(
            f"MergeCallback does not support the sharded strategy {type(strategy).__name__}: each rank holds only"
            " part of every parameter. HINT: merge with strategy='ddp' (or one device), or merge the saved"
            " checkpoints with the `lightning-merge` command."
        )


def _checkpoint_path(task: str, checkpoint: PathLike | ModelCheckpoint) -> str:
    if isinstance(checkpoint, ModelCheckpoint):
        if not checkpoint.best_model_path:
            raise ValueError(f"The ModelCheckpoint given for task {task!r} has no `best_model_path` yet.")
        return checkpoint.best_model_path
    return os.fspath(checkpoint)


def _task_dirname(index: int, task: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task)
    return f"task-{index:02d}-{safe}"


def _load_into(pl_module: pl.LightningModule, merged: Mapping[str, Tensor]) -> None:
    unknown = sorted(set(merged) - set(pl_module.state_dict()))
    if unknown:
        raise ValueError(
            f"The merged checkpoints have keys the module does not, e.g. {unknown[:3]}. HINT: pass `prefix` to"
            " strip a key prefix such as 'model.'."
        )
    pl_module.load_state_dict(dict(merged), strict=False)

