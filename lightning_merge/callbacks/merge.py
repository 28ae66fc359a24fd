"""MergeCallback: collect the per-task fine-tunes and merge them at fit end, with the work split across ranks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_merge.callbacks import _checks, _compress, _lora, _tasks
from lightning_merge.callbacks._checks import Methods, PathLike
from lightning_merge.callbacks._checks import check_strategy as _check_strategy
from lightning_merge.callbacks._distributed import RankedStrategy, exchange, merge_shard, ranked
from lightning_merge.callbacks._files import MergedRun, log_merge, save_merged, save_snapshot
from lightning_merge.callbacks._hf import find_pretrained_model
from lightning_merge.callbacks._lora import MERGED_ADAPTER, check_lora_fit, find_peft_model, merge_lora_tasks
from lightning_merge.callbacks._tasks import task_dirname as _task_dirname
from lightning_merge.engine import MergePlan, plan_merge, shard_keys
from lightning_merge.engine import task_matrices as engine_task_matrices
from lightning_merge.io import CheckpointSource, open_source
from lightning_merge.io.writer import DEFAULT_MAX_SHARD_SIZE
from lightning_merge.lora import LoraAdapter
from lightning_merge.methods import MergeMethod, get_method

__all__ = ["MergeCallback"]

class MergeCallback(Callback):
    r"""Merge per-task fine-tunes of one pre-trained model when the last fit ends.

    Two workflows:

    1. ``tasks=[...]``: fine-tune the tasks with one ``Trainer.fit`` each, in one process or one job per task, passing
       a callback with the same ``tasks`` and ``dirpath``. Each fit must start from the pre-trained weights. The
       first fit snapshots them, each fit records its task's weights when it ends (rank zero writes them under
       ``dirpath``), and the fit that records the last missing task merges, whatever the order of the tasks.
    2. ``base=..., finetuned={task: checkpoint}``: tasks fine-tuned elsewhere (paths of Lightning ``.ckpt``,
       safetensors, Hugging Face folders, or ``ModelCheckpoint`` callbacks whose ``best_model_path`` is used); the
       merge happens when the current fit ends, into the module being fit.

    **Which task a fit is** (workflow 1), the first that is set of: this callback's ``task`` (the argument, or
    ``merge.task = "sst2"`` before the fit; a LightningCLI config sets it per run), the environment variable
    ``LIGHTNING_MERGE_TASK``, a ``merge_task`` attribute of the datamodule, then of the LightningModule, and only then
    the next declared task not recorded yet (one process fitting the tasks in order). A task that is not declared, or
    one already recorded (unless ``overwrite=True``), is refused when the fit starts, before training.

    **State across processes**: the recorded tasks are listed in ``dirpath/manifest.json``. A new process with the
    same ``tasks`` and ``dirpath`` resumes an unfinished run there: it adopts the recorded tasks, does not snapshot the
    base again (it warns when the module does not start from the recorded base) and records its own task; a finished
    run there is replaced by a new one; an unfinished run of other tasks is an error. Jobs of one run are meant to
    run one after another (the manifest is rewritten by each). A fit that ends with tasks still missing logs which;
    :meth:`merge_collected` merges the tasks recorded so far into a module, outside a Trainer.

    Layout of ``dirpath`` (task folder names: ``task-XX-<name>``, ``XX`` the declared index, the name with anything
    but ASCII letters, digits, ``-``, ``_`` and ``.`` replaced by ``_``; the same safe name for ``<task>`` below)::

        manifest.json          the run: tasks, recorded tasks, mode, each task's task-specific keys
        base/                  full fine-tunes: the pre-trained snapshot (safetensors)
        task-XX-<name>/        full: the module's state dict; LoRA: the peft adapter plus heads.safetensors
        merged/                full: the merged weights, heads/<task>.safetensors, merge_record.json
        merged_adapter/        LoRA: the merged peft adapter (PeftModel.from_pretrained(base_model, ...))
        merged_heads/          LoRA: <task>.safetensors, each task's task-specific tensors
        compressed/            full, with ``compress``: <task>/ (TSV-C: peft adapter + tsv_c.safetensors), record

    ``merged/`` holds ``model.safetensors`` (sharded above ``max_shard_size``) with the LightningModule's keys, the
    excluded ones from the base; when the module holds exactly one outermost ``transformers.PreTrainedModel`` (e.g.
    ``self.encoder``), it is instead that model's own ``save_pretrained`` folder with the merged weights (its names,
    loadable with ``AutoModel.from_pretrained``), plus its tokenizer and other non-weight files when its
    ``name_or_path`` is a local folder, and ``lightning_module.safetensors`` for the merged keys outside it. The
    :class:`~lightning_merge.io.record.MergeRecord` lists the files and the inputs' sizes and hashes.

    Under DDP the parameters are assigned to ranks by their estimated merge cost, each rank merges its share on its
    own device, and the results are exchanged through the strategy: every rank's module ends holding the same merged
    weights. Task-specific parameters matched by ``exclude`` (classification heads, one shape per task if need be)
    are not merged: the module keeps its own and each task's are in :attr:`heads` (keyed as in the LightningModule).
    :attr:`plan`, :attr:`base_source`, :attr:`task_sources` and :meth:`task_matrices` say what was merged from where.

    LoRA fits (workflow 1 with a ``peft.PeftModel`` inside the module): each task's adapter is recorded instead of the
    state dict, the adapters are merged in low-rank form with :func:`~lightning_merge.lora.merge_adapters` (TIES is
    refused when the first fit starts) on every rank, :attr:`merged_adapter` holds the result, and the module then
    computes ``W0 + lam * M`` (the update is added to the frozen base weights and the LoRA ``B`` factors are zeroed).
    Trainable parameters outside the ``PeftModel`` must be matched by ``exclude`` to be kept per task.

    Args:
        method: a registry name (``"tsv_m"``, ``"sftm"``, ``"ties"``, ``"task_arithmetic"``, ``"average"``) or a
            method object. method_options: the method's options, e.g. ``{"rank": 0.125}``.
        tasks: workflow 1, the declared task names. task: workflow 1, the task of the next fit (see above).
        base, finetuned: workflow 2, the pre-trained checkpoint and ``{task: checkpoint or ModelCheckpoint}``.
        exclude: glob patterns (or ``re:`` regexes) of task-specific keys, e.g. ``["head.*"]``.
        prefix: workflow 2, a key prefix to strip from the checkpoints (e.g. ``"model."``).
        dirpath: where task snapshots and the merged model go (default ``<default_root_dir>/merge``).
        device: where each rank merges (default: the strategy's root device; CPU in :meth:`merge_collected`).
        save_merged: write the merged folders on rank zero. max_shard_size: their shard size limit, in bytes.
        overwrite: let a fit record a task that is already recorded again (replacing its files).
        progress: a progress bar on rank zero while merging.
        compress: full fine-tunes, TSV-C (a :class:`~lightning_merge.compress.TSVC` or its options, e.g. ``{"rank":
            0.1}``): at the merge rank zero also writes every task's compressed update into ``dirpath/compressed``
            (:mod:`~lightning_merge.callbacks._compress`); :attr:`compressed` maps each task to its folder.

    With ``strategy="ddp_spawn"`` the fits run in child processes: the launching process gets the merged weights
    back in its module (Lightning returns rank zero's), but this object's attributes (``heads``, ``plan``,
    ``merge_seconds``) are filled in the children only; read ``dirpath`` there, or use ``strategy="ddp"``.

    Example::

        merge = MergeCallback("tsv_m", tasks=["mnist", "svhn"], exclude=["head.*"])
        for task in merge.tasks:
            merge.task = task
            Trainer(max_epochs=3, callbacks=[merge]).fit(make_module(task), datamodules[task])
        merge.heads["svhn"]  # the task's own head, for evaluation with the merged body
    """

    def __init__(
        self,
        method: str | MergeMethod = "tsv_m",
        method_options: Mapping[str, Any] | None = None,
        *,
        tasks: Sequence[str] | None = None,
        task: str | None = None,
        base: PathLike | None = None,
        finetuned: Mapping[str, PathLike | ModelCheckpoint] | None = None,
        exclude: Sequence[str] = (),
        prefix: str | None = None,
        dirpath: PathLike | None = None,
        device: str | torch.device | None = None,
        save_merged: bool = True,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        overwrite: bool = False,
        progress: bool = True,
        compress: _compress.Compress = None,
    ) -> None:
        self.method = get_method(method, **dict(method_options or {}))
        self.tasks = _checks.check_workflow(tasks, base, finetuned)
        self.task = _checks.check_task(task, self.tasks)
        self.base, self.finetuned = base, dict(finetuned) if finetuned is not None else None
        self.exclude = _checks.check_patterns(exclude)
        self.prefix, self.device, self.save_merged, self.progress = prefix, device, save_merged, progress
        self.max_shard_size, self.overwrite = max_shard_size, overwrite
        self.dirpath = _checks.check_dirpath(dirpath)
        self.compress = _compress.check_compress(compress, self.tasks)
        self.compressed: dict[str, Path] = {}
        self._run_id = uuid.uuid4().hex
        self._collected: list[str] = []
        self._fit_task: str | None = None  # the task of the current (or last) fit
        self._mode: str | None = None  # "full" or "lora", fixed by the first recorded task
        self._head_keys: dict[str, list[str]] = {}
        self._adopted = False  # this process took over another process's unfinished run
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
        """The tasks whose fine-tuned weights are recorded (workflow 1), in declared order."""
        return list(self._collected)

    @property
    def missing(self) -> list[str]:
        """The declared tasks not recorded yet (workflow 1)."""
        return [t for t in self.tasks if t not in self._collected] if self.finetuned is None else []

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
        if self.finetuned is None:
            self._start_task(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.finetuned is None:
            self._record(trainer, pl_module)
            if self.missing:
                return
        self.merge(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self._run_id, "tasks": list(self.tasks), "collected": list(self._collected),
                "task": self._fit_task, "mode": self._mode, "heads": dict(self._head_keys)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if list(state_dict.get("tasks", [])) != list(self.tasks):
            raise ValueError(
                f"Expected the checkpoint's MergeCallback tasks to be {list(self.tasks)}, but got"
                f" {state_dict.get('tasks')}. HINT: resume with the same `tasks`."
            )
        self._run_id, self._collected = state_dict["run_id"], _tasks.in_order(self.tasks, state_dict["collected"])
        self._fit_task, self._mode = state_dict.get("task"), state_dict.get("mode")
        self._head_keys = {t: list(k) for t, k in state_dict.get("heads", {}).items()}

    # ------------------------------------------------------------------------------------------------ the merge
    def merge(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Merge the recorded or given checkpoints into ``pl_module`` on every rank (called at fit end)."""
        strategy = ranked(trainer.strategy)
        self._merge_into(strategy, pl_module, self.progress and trainer.is_global_zero)
        log_merge(self.method, self.merge_seconds, self._num_merged(), strategy.world_size, trainer.loggers,
                  trainer.global_step)

    def merge_collected(self, module: torch.nn.Module) -> None:
        """Merge the tasks recorded so far in ``dirpath`` (workflow 1; workflow 2: the given ones) into ``module``.

        For a run whose last fits have not happened (or another process's run: a new ``MergeCallback`` with the same
        ``tasks`` and ``dirpath``). It runs in this process, outside a Trainer (world size 1, on ``device`` or CPU),
        writes the merged folders like the merge at fit end (their record lists the tasks merged), and fills the same
        attributes. ``module`` is the LightningModule (or any module with its keys), e.g. a fresh one built from the
        pre-trained weights (full fine-tunes) or the last fit's module (LoRA: its ``PeftModel`` receives the update).

        Raises:
            ValueError: no ``dirpath`` is known, or no task is recorded there.
        """
        if self.finetuned is None:
            if self.dirpath is None:
                raise ValueError("Expected `dirpath` to be set to merge the recorded tasks, but got None.")
            self._adopt_manifest(finished=True)
            if not self._collected:
                raise ValueError(f"Expected at least one task recorded in {str(self.dirpath)!r}, but none is.")
        strategy = SingleDeviceStrategy(device=torch.device(self.device if self.device is not None else "cpu"))
        self._merge_into(strategy, module, self.progress)
        log_merge(self.method, self.merge_seconds, self._num_merged(), 1, [], 0)

    def task_matrices(self, methods: Methods, *, progress: bool = True) -> dict[str, dict[str, Tensor]]:
        """``{name: {key: M}}``: each method's merged task matrix ``M`` (scaling 1) of every key the callback merged,
        from the same inputs (:func:`lightning_merge.engine.task_matrices`), e.g. for ``MergedEvalLoop.compare``.

        Args:
            methods: a registry name, a method object, a list of them, or a mapping ``{display name: method}``.
            progress: a progress bar per method.

        Raises:
            ValueError: before a merge of full fine-tunes has run in this process, or for LoRA fits (not yet).
        """
        named = _checks.named_methods(methods)
        _checks.check_full_merge(self._mode == "lora" or self.merged_adapter is not None, self.plan, self.base_source)
        assert self.plan is not None and self.base_source is not None  # checked above
        keys, tasks = list(self.plan.merge_keys), list(self.task_sources.values())
        return {name: dict(engine_task_matrices(method, self.base_source, tasks, keys, progress=progress))
                for name, method in named.items()}

    def _merge_into(self, strategy: RankedStrategy, module: torch.nn.Module, progress: bool) -> None:
        start = time.perf_counter()
        tasks = list(self.tasks) if self.finetuned is not None else list(self._collected)
        if self.finetuned is None and find_peft_model(module) is not None:
            _compress.check_mode(self.compress, "lora")
            folders = {t: self._task_dir(t) for t in tasks}
            output = self._dir() / MERGED_ADAPTER if self.save_merged else None
            self.merged_adapter, self.heads = merge_lora_tasks(strategy, module, self.method, folders, output)
            self.merge_seconds = time.perf_counter() - start
            return
        base, sources = self._sources(strategy, tasks)
        self.base_source, self.task_sources = base, sources
        self.plan = plan_merge(base, list(sources.values()), exclude=self.exclude)
        shards = shard_keys(self.plan, self.method, len(sources), strategy.world_size)
        device = torch.device(self.device) if self.device is not None else strategy.root_device
        mine = merge_shard(strategy, self.method, base, list(sources.values()), shards, device=device,
                           progress=progress)
        merged = exchange(strategy, self.plan, base, mine)
        _checks.load_into(module, merged)
        self.heads = {t: _tasks.source_heads(src, self.exclude) for t, src in sources.items()}
        self.merge_seconds = time.perf_counter() - start
        if self.save_merged:
            run = MergedRun(self.method, self.plan, base, sources, self.exclude, strategy.world_size, device,
                            self.merge_seconds)
            self._save_merged(strategy, module, run, merged)
        if self.compress is not None:
            self.compressed = _compress.save_compressed(strategy, self.compress, self._dir() / _compress.COMPRESSED,
                                                        base, sources, self.exclude, module, device, progress)

    def _sources(self, strategy: RankedStrategy, tasks: Sequence[str]
                 ) -> tuple[CheckpointSource, dict[str, CheckpointSource]]:
        if self.finetuned is None:
            base = open_source(self._dir() / "base", label="base snapshot")
            return base, {t: open_source(self._task_dir(t), label=f"task {t!r}") for t in tasks}
        given = strategy.broadcast({t: _checks.checkpoint_path(t, c) for t, c in self.finetuned.items()})
        base = open_source(self.base, prefix=self.prefix, label="base")  # type: ignore[arg-type]
        return base, {t: open_source(p, prefix=self.prefix, label=f"task {t!r}") for t, p in given.items()}

    # ------------------------------------------------------------------------------------------------ the tasks
    def _start_task(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before training: which task this fit is, checked; then the base snapshot, or the check against it."""
        task, origin = _tasks.resolve_task(self.task, trainer, pl_module, self.tasks, self._collected)
        resumed = trainer.ckpt_path is not None
        if resumed and self._fit_task is not None and origin.startswith("the next"):
            task, origin = self._fit_task, "the checkpoint being resumed"
        task, origin = trainer.strategy.broadcast((task, origin))
        self._fit_task = task = _tasks.check_fit_task(task, origin, self.tasks, self._collected, self.overwrite)
        if self._adopted and origin.startswith("the next"):
            raise ValueError(_tasks.implicit_resume_message(task, self._dir(), self._collected))
        self._adopted = False
        self._check_task_module(task, pl_module)
        if resumed or self._mode == "lora":
            return
        if not self._collected:
            self._snapshot(trainer.strategy, pl_module, self._dir() / "base")
            self._write_manifest(trainer.strategy)  # the folder is a run's from its first snapshot on
        else:
            _tasks.check_starts_from_base(self._dir() / "base", pl_module.state_dict(), self.exclude, task)

    def _check_task_module(self, task: str, pl_module: pl.LightningModule) -> None:
        mode = "lora" if check_lora_fit(pl_module, self.method) else "full"
        if self._collected and self._mode not in (None, mode):
            raise ValueError(
                f"Expected task {task!r} to be a {self._mode} fine-tune like the recorded tasks {self._collected},"
                f" but it is a {mode} one. HINT: fine-tune every task the same way (LoRA or full)."
            )
        _compress.check_mode(self.compress, mode)
        self._mode = mode
        _tasks.check_head_keys(task, _tasks.excluded(pl_module.state_dict(), self.exclude), self._head_keys)
        if mode == "lora":
            _lora.warn_unrecorded(pl_module, find_peft_model(pl_module), self.exclude)

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At fit end: write this task's weights (or adapter and heads), then the manifest."""
        task = self._fit_task
        assert task is not None  # set by on_fit_start
        heads = _tasks.head_state(pl_module.state_dict(), self.exclude)
        _tasks.check_head_values(task, heads)
        self._snapshot(trainer.strategy, pl_module, self._task_dir(task), heads)
        self._collected = _tasks.in_order(self.tasks, [*self._collected, task])
        self._head_keys[task] = sorted(heads)
        self._write_manifest(trainer.strategy)
        done = f"{len(self._collected)}/{len(self.tasks)}"
        rank_zero_info(f"MergeCallback: recorded task {task!r} ({done}) in {self._dir()}.")
        if self.missing:
            rank_zero_info(_tasks.missing_message(self.missing))

    # ---------------------------------------------------------------------------------------------- files
    def _num_merged(self) -> int:
        return len(self.tasks) if self.finetuned is not None else len(self._collected)

    def _dir(self) -> Path:
        assert self.dirpath is not None  # set in setup, or given
        return self.dirpath

    def _task_dir(self, task: str) -> Path:
        return self._dir() / _task_dirname(self.tasks.index(task), task)

    def _snapshot(self, strategy: pl.strategies.Strategy, pl_module: pl.LightningModule, folder: Path,
                  heads: Mapping[str, Tensor] | None = None) -> None:
        peft_model = find_peft_model(pl_module)
        if strategy.is_global_zero and peft_model is not None:
            _lora.save_task_adapter(peft_model, folder, heads or {})
        elif strategy.is_global_zero:
            state = {k: v.detach().cpu().contiguous().clone() for k, v in pl_module.state_dict().items()}
            save_snapshot(state, folder)
        strategy.barrier("MergeCallback.snapshot")

    def _save_merged(self, strategy: RankedStrategy, module: torch.nn.Module, run: MergedRun,
                     merged: Mapping[str, Tensor]) -> None:
        if strategy.is_global_zero:
            state = {k: merged[k] if k in merged else run.base.get_tensor(k) for k in run.base.keys()}
            save_merged(self._dir() / "merged", state, self.heads, run, max_shard_size=self.max_shard_size,
                        hf_model=find_pretrained_model(module))
        strategy.barrier("MergeCallback.save_merged")

    def _write_manifest(self, strategy: pl.strategies.Strategy) -> None:
        if strategy.is_global_zero:
            _tasks.write_manifest(self._dir(), self.state_dict())
        strategy.barrier("MergeCallback.manifest")

    def _adopt_manifest(self, finished: bool = False) -> None:
        # ddp_spawn children, and later processes of the same run (one job per task), learn the run from disk
        if self.finetuned is not None:
            _tasks.check_run_folders(self._dir(), ())
            return
        found = _tasks.read_manifest(self._dir())
        if found is None:
            _tasks.check_run_folders(self._dir(), self.tasks)  # not a run's folder: replace only what is ours
        state, message = _tasks.adopt_manifest(found, self._run_id, self.tasks, self._dir(), finished)
        if message:
            rank_zero_info(message)
        if state is not None:
            self._adopted = self._adopted or state["run_id"] != self._run_id
            self.load_state_dict(state)
