"""MergedEvalLoop: score a merged model on every task with that task's own head, next to reference models."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info
from torch import Tensor, nn

from lightning_merge.compress import TSVC
from lightning_merge.evaluation._callback import MergedCallback, Methods, SourceState, check_merged
from lightning_merge.evaluation._data import Forward, check_batch, check_output, default_forward, shard
from lightning_merge.evaluation._routed import (
    CompressedTasks,
    check_compressed,
    check_routed,
    method_names,
    routed_state,
)
from lightning_merge.evaluation._states import State, check_dataloaders, check_states, load_state
from lightning_merge.evaluation.heads import HeadSwap, check_heads
from lightning_merge.evaluation.metrics import (
    Accuracy,
    MetricFactory,
    build_metrics,
    compute_scores,
    task_factories,
)
from lightning_merge.evaluation.report import FINETUNED, PRETRAINED, EvalResult, MergeReport
from lightning_merge.evaluation.search import (
    DEFAULT_GRID,
    apply_scaling,
    check_grid,
    scaling_targets,
    search_scaling,
)

if TYPE_CHECKING:
    import lightning.pytorch as pl

@contextmanager
def _scoring(model: nn.Module, keys: set[str]) -> Iterator[HeadSwap]:
    """Eval mode without gradients, heads of ``keys`` swappable; restores the training flag and the model's own
    tensors of ``keys`` (its head) on exit."""
    swap = HeadSwap(model, keys)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield swap
    finally:
        model.train(training)
        swap.restore()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


class MergedEvalLoop:
    r"""Score a model on every task: each task's data runs through the shared body and the task's own head.

    For task ``t`` the loop loads ``heads[t]`` into the model, runs
    ``forward(model, batch) -> (preds, target)`` over ``dataloaders[t]`` in eval mode without gradients,
    updates a fresh metric per batch and computes it once: ``scores[t][metric]``, with
    ``mean[metric] = (1/T) sum_t scores[t][metric]``. A head may have another shape than the model's (another
    number of classes): it then replaces the model's tensor for that task (:class:`~lightning_merge.evaluation.heads
    .HeadSwap`). Every task's head is checked before any work (:func:`~lightning_merge.evaluation.heads.check_heads`),
    and the model's own head (objects and values) and training flag are restored afterwards. A plain class, not a
    Lightning loop (those are no extension point). :meth:`from_callback` and :meth:`compare_callback` evaluate what a
    :class:`~lightning_merge.MergeCallback` merged.

    Under a distributed ``trainer`` (``world_size > 1``) each rank scores its shard of every ``DataLoader``:
    the loader is rebuilt on a sampler that takes every ``world_size``-th sample and, unlike
    ``DistributedSampler``, pads nothing; torchmetrics sums the states across ranks in ``compute``, so
    count-based metrics equal a single-process run exactly. Loaders that already use a ``DistributedSampler``
    are used as they are (it pads uneven shards with repeated samples). Every rank must call the loop in the
    same order.

    Args:
        dataloaders: ``{task: dataloader}``.
        heads: ``{task: {parameter name: tensor}}``, the task-specific parameters with their full
            ``state_dict`` names (``"head.weight"``), each the model's shape or another first dimension (classes);
            ``None`` when the model has none.
        metrics: a factory of a torchmetrics ``Metric`` or ``MetricCollection`` (or ``{task: factory}``);
            picklable (a class or ``functools.partial``, not a lambda) for ``ddp_spawn``. Default: top-1
            :class:`Accuracy`.
        forward: ``forward(model, batch) -> (preds, target)``; the default takes batches ``(inputs, target)``.
            Batches are moved to the model's device first.
        trainer: shards the data, reduces, and receives ``merged/<task>/<metric>`` through its loggers.
        metric: the primary metric (scaling search, normalized scores, table); default: the first one.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> model = nn.Sequential(nn.Identity(), nn.Linear(2, 2))  # body "0", head "1"
        >>> heads = {"keep": {"1.weight": torch.eye(2), "1.bias": torch.zeros(2)},
        ...          "swap": {"1.weight": torch.eye(2).flip(0), "1.bias": torch.zeros(2)}}
        >>> data = TensorDataset(torch.eye(2), torch.tensor([0, 1]))
        >>> loop = MergedEvalLoop({task: DataLoader(data, batch_size=2) for task in heads}, heads)
        >>> result = loop.run(model)
        >>> result.scores, result.mean
        ({'keep': {'accuracy': 1.0}, 'swap': {'accuracy': 0.0}}, {'accuracy': 0.5})
    """

    def __init__(
        self,
        dataloaders: Mapping[str, Iterable],
        heads: Mapping[str, State] | None = None,
        metrics: MetricFactory | Mapping[str, MetricFactory] = Accuracy,
        forward: Forward = default_forward,
        trainer: pl.Trainer | None = None,
        metric: str | None = None,
    ) -> None:
        self.dataloaders = check_dataloaders(dataloaders)
        self.tasks = list(self.dataloaders)
        self.heads = check_states(heads, self.tasks, "heads")
        self.metrics = metrics
        self.factories = task_factories(metrics, self.tasks)
        if not callable(forward):
            raise TypeError(f"Expected argument `forward` to be callable, but got {type(forward).__name__}.")
        self.forward = forward
        self.trainer = trainer
        self.metric, self.higher_is_better = self._primary_metric(metric)

    def _primary_metric(self, metric: str | None) -> tuple[str, bool]:
        collections = {task: build_metrics(factory, task) for task, factory in self.factories.items()}
        name = metric or str(next(iter(collections[self.tasks[0]])))
        for task, collection in collections.items():
            if name not in collection:
                raise ValueError(
                    f"Expected argument `metric` to name a metric of every task, but task {task!r} has"
                    f" {list(collection)}, not {name!r}."
                )
        return name, getattr(collections[self.tasks[0]][name], "higher_is_better", True) is not False

    @classmethod
    def from_callback(
        cls,
        merge: MergedCallback,
        dataloaders: Mapping[str, Iterable],
        metrics: MetricFactory | Mapping[str, MetricFactory] = Accuracy,
        forward: Forward = default_forward,
        trainer: pl.Trainer | None = None,
        metric: str | None = None,
    ) -> MergedEvalLoop:
        """The loop over the tasks a :class:`~lightning_merge.MergeCallback` merged, with their heads
        (``merge.heads``, of any shape); then :meth:`compare_callback` scores the merges.

        Raises:
            ValueError: ``merge`` has not merged, or a task of ``dataloaders`` it did not merge.
        """
        check_merged(merge)
        unknown = [task for task in check_dataloaders(dataloaders) if task not in merge.task_sources]
        if unknown:
            raise ValueError(
                f"Expected argument `dataloaders` to name tasks that `merge` merged {list(merge.task_sources)},"
                f" but got {unknown[0]!r}."
            )
        heads = {task: dict(head) for task, head in merge.heads.items()}
        return cls(dataloaders, heads if any(heads.values()) else None, metrics, forward, trainer, metric)

    def compare_callback(
        self,
        model: nn.Module,
        merge: MergedCallback,
        methods: Methods = ("tsv_m",),
        val_dataloaders: Mapping[str, Iterable] | None = None,
        grid: Sequence[float] = DEFAULT_GRID,
        progress: bool = True,
        verbose: bool = True,
        compressed: TSVC | Mapping[str, TSVC | Mapping[str, Any]] | None = None,
    ) -> MergeReport:
        """:meth:`compare` on what ``merge`` merged: the pre-trained model, each task's fine-tune and ``methods``.

        Reads the base's values of the merged keys (``merge.plan.merge_keys`` of ``merge.base_source``), each task's
        fine-tuned values lazily from ``merge.task_sources`` (one task at a time), and each method's merged task
        matrix from ``merge.task_matrices(methods, progress=progress)``. The heads, the model's keys and
        ``compressed`` are checked first, before those minutes of work.

        Args:
            model: the callback's module (or one with its keys); left at the best method's chosen ``lam``.
            merge: a :class:`~lightning_merge.MergeCallback` that has merged.
            methods: registry names or method objects (rows named by ``method.name``), or ``{row name: method}``.
            val_dataloaders, grid, verbose: see :meth:`compare`. progress: show ``task_matrices``' progress bar.
            compressed: task-routed TSV-C rows (:mod:`~lightning_merge.evaluation._routed`), ``{row name: TSVC or
                its options}`` (a ``TSVC`` alone: row ``"tsv_c"``): task ``t`` scored with ``W0 + trunc_k(D_t)``,
                computed in memory from the same inputs (``merge.compress`` gives the options the callback wrote).

        Raises:
            ValueError: ``merge`` has not merged, a head that does not fit the model (naming the task and the key),
                a merged key the model lacks or has in another shape, or a bad ``compressed`` option or row name.
        """
        plan, base_source = check_merged(merge)
        tsvc = check_compressed(compressed, [PRETRAINED, FINETUNED, *method_names(methods)])
        check_heads(model, self.heads, self.tasks)
        keys = list(plan.merge_keys)
        base = {key: base_source.get_tensor(key) for key in keys}
        scaling_targets(model, base, base, "merge.plan.merge_keys")
        finetuned = {task: SourceState(source, keys) for task, source in merge.task_sources.items()}
        routed = {name: CompressedTasks(method, base, merge.task_sources, keys, plan.matrix_keys, _device(model))
                  for name, method in tsvc.items()}
        merged = merge.task_matrices(methods, progress=progress)
        return self.compare(model, base, merged, finetuned, val_dataloaders, grid, verbose, routed)

    def with_dataloaders(self, dataloaders: Mapping[str, Iterable]) -> MergedEvalLoop:
        """The same loop (heads, metrics, forward, trainer) on other dataloaders, e.g. the validation ones."""
        loop = MergedEvalLoop(dataloaders, self.heads, self.metrics, self.forward, self.trainer, self.metric)
        if loop.tasks != self.tasks:
            raise ValueError(f"Expected dataloaders for the tasks {self.tasks}, but got {loop.tasks}.")
        return loop

    def run(self, model: nn.Module, prefix: str = "merged", log: bool = True) -> EvalResult:
        """Score ``model`` on every task with its head; log ``<prefix>/<task>/<metric>`` and the means."""
        result = EvalResult(self._scores(model, self.tasks))
        if log:
            self._log(prefix, result)
        return result

    def run_routed(self, model: nn.Module, base: State, updates: Mapping[str, State], prefix: str = "routed",
                   log: bool = True) -> EvalResult:
        """Score the task-routed model: task ``t`` with ``base + updates[t]`` (``W0 + D_t``, no ``lam``) and its
        head, e.g. each task's TSV-C update; log ``<prefix>/<task>/<metric>``. The model is left at ``base``.

        Raises:
            ValueError: a task without an update, or an update key ``base`` lacks or has in another shape.
        """
        updates = check_routed({prefix: updates}, self.tasks, base, [])[prefix]
        scores = {}
        for task in self.tasks:
            load_state(model, routed_state(base, updates[task], f"updates[{task!r}]"), f"updates[{task!r}]")
            scores.update(self._scores(model, [task]))
        load_state(model, base, "base")
        result = EvalResult(scores)
        if log:
            self._log(prefix, result)
        return result

    def _scores(self, model: nn.Module, tasks: Sequence[str]) -> dict[str, dict[str, float]]:
        check_heads(model, self.heads, tasks)
        head_keys = set().union(*(self.heads[t] for t in tasks)) if self.heads else set()
        with _scoring(model, head_keys) as swap:
            return {task: self._score_task(model, task, swap) for task in tasks}

    def _score_task(self, model: nn.Module, task: str, swap: HeadSwap) -> dict[str, float]:
        if self.heads is not None:
            swap.load(self.heads[task])
        device = _device(model)
        collection = build_metrics(self.factories[task], task).to(device)
        num_batches = 0
        for batch in self._loader(task):
            collection.update(*self._predict(model, task, move_data_to_device(batch, device)))
            num_batches += 1
        self._check_not_empty(task, num_batches, device)
        return compute_scores(collection, task)

    def _predict(self, model: nn.Module, task: str, batch: Any) -> tuple[Tensor, Tensor]:
        if self.forward is default_forward:
            check_batch(batch, task)
        return check_output(self.forward(model, batch), task)

    def _loader(self, task: str) -> Iterable:
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) if self.trainer else None
        if not kwargs:
            return self.dataloaders[task]
        return shard(self.dataloaders[task], kwargs["num_replicas"], kwargs["rank"], task)

    def _check_not_empty(self, task: str, num_batches: int, device: torch.device) -> None:
        total = torch.tensor(float(num_batches), device=device)
        if self.trainer is not None and self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
        if total.item() == 0:
            raise ValueError(
                f"Expected the dataloader of task {task!r} to yield at least one batch, but it is empty."
            )

    def _log(self, prefix: str, result: EvalResult) -> None:
        metrics = {f"{prefix}/{t}/{m}": v for t, scores in result.scores.items() for m, v in scores.items()}
        self._log_values({**metrics, **{f"{prefix}/mean/{m}": v for m, v in result.mean.items()}})

    def _log_values(self, metrics: dict[str, float]) -> None:
        if self.trainer is None:
            return
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.trainer.global_step)

    def compare(
        self,
        model: nn.Module,
        base: State,
        merged_matrices: Mapping[str, State] | None = None,
        finetuned: Mapping[str, State] | None = None,
        val_dataloaders: Mapping[str, Iterable] | None = None,
        grid: Sequence[float] = DEFAULT_GRID,
        verbose: bool = True,
        routed: Mapping[str, Mapping[str, State]] | None = None,
    ) -> MergeReport:
        """Score the pre-trained model, each task's own fine-tuned model, every method's merge and task-routed models.

        Rows: ``"pretrained"`` (``base`` loaded, with each task's head), ``"finetuned"`` (task ``t`` scored
        with ``finetuned[t]`` and its head) and one per method ``name``: ``W0 + lam * merged_matrices[name]`` at the
        ``lam`` of ``grid`` with the best mean score on ``val_dataloaders`` (:func:`search_scaling`; on this
        loop's own dataloaders when none are given, which flatters the merge). The model is left at the best
        method's chosen ``lam`` (at ``base`` when ``merged_matrices`` is empty). The table is logged on rank zero when
        ``verbose``.

        Args:
            model: the model to load the states into; its heads are restored afterwards.
            base: ``W0`` of the merged keys.
            merged_matrices: ``{method name: M}``, each merged task matrix computed once with scaling 1, for the keys
                of ``base``.
            finetuned: ``{task: state}`` of each task's fine-tuned model, keys within those of ``base`` and
                the task's head.
            val_dataloaders: ``{task: dataloader}`` for the scaling search.
            grid: the values of ``lam`` to try.
            verbose: log the table with ``rank_zero_info``.
            routed: ``{row name: {task: {key: D_t}}}``, task-routed rows after the methods' (:meth:`run_routed`:
                task ``t`` with ``base + D_t``, e.g. its TSV-C update), with :meth:`MergeReport.retained` per task.
        """
        merged_matrices, grid = dict(merged_matrices or {}), check_grid(grid)
        check_heads(model, self.heads, self.tasks)  # before any work: heads of any shape, checked up front
        for name, matrix in merged_matrices.items():
            scaling_targets(model, base, matrix, f"merged_matrices[{name!r}]")
        own = self._check_finetuned(base, finetuned)
        routed = check_routed(routed, self.tasks, base, [PRETRAINED, FINETUNED, *merged_matrices])
        searcher = self if val_dataloaders is None else self.with_dataloaders(val_dataloaders)
        rows = {PRETRAINED: self._score_state(model, base), **self._score_finetuned(model, own)}
        scaling, curves = {}, {}
        for name, matrix in merged_matrices.items():
            scaling[name], curves[name] = search_scaling(searcher, model, base, matrix, grid)
            rows[name] = self.run(model, prefix=f"merged/{name}")
            self._log_values({f"merged/{name}/scaling": scaling[name]})
        rows.update({name: self.run_routed(model, base, updates, f"routed/{name}") for name, updates in routed.items()})
        report = MergeReport(self.metric, rows, scaling, curves, self.higher_is_better, list(routed))
        self._leave_at_best(model, base, merged_matrices, report)
        if verbose:
            rank_zero_info(f"Merge report:\n{report.to_table()}")
        return report

    def _score_state(self, model: nn.Module, base: State) -> EvalResult:
        load_state(model, base, "base")
        return self.run(model, prefix=PRETRAINED)

    def _score_finetuned(self, model: nn.Module, finetuned: dict[str, State] | None) -> dict[str, EvalResult]:
        if finetuned is None:
            return {}
        scores = {}
        for task in self.tasks:
            head = (self.heads or {}).get(task, {})  # scored with heads[task], which may have another shape
            body = {k: v for k, v in finetuned[task].items() if k not in head}
            load_state(model, body, f"finetuned[{task!r}]")
            scores.update(self._scores(model, [task]))
        result = EvalResult(scores)
        self._log(FINETUNED, result)
        return {FINETUNED: result}

    def _check_finetuned(self, base: State, finetuned: Mapping[str, State] | None) -> dict[str, State] | None:
        states = check_states(finetuned, self.tasks, "finetuned")
        for task, state in (states or {}).items():
            self._check_finetuned_keys(base, state, task)
        return states

    def _check_finetuned_keys(self, base: State, state: State, task: str) -> None:
        extra = sorted(set(state) - set(base) - set((self.heads or {}).get(task, {})))
        if extra:
            raise ValueError(
                f"Expected the keys of `finetuned[{task!r}]` to be merged keys (those of `base`) or the"
                f" task's head, but got {extra[:5]}. HINT: pass task-specific parameters in `heads`."
            )

    def _leave_at_best(
        self, model: nn.Module, base: State, merged_matrices: dict[str, State], report: MergeReport
    ) -> None:
        if report.best is None:
            load_state(model, base, "base")
        else:
            apply_scaling(model, base, merged_matrices[report.best], report.scaling[report.best])
