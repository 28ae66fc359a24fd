"""The default metric of the evaluation and the checks on user metric factories."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from typing_extensions import override

MetricFactory = Callable[[], Metric | MetricCollection]


class Accuracy(Metric):
    """Top-1 accuracy ``correct / total`` that needs no ``num_classes``.

    ``preds`` are scores ``(N, C)`` (the arg-max is taken) or labels ``(N,)``. It equals
    ``torchmetrics.classification.MulticlassAccuracy(num_classes=C, average="micro")``, so one picklable
    default serves tasks whose heads have different numbers of classes. The states are counts summed across
    processes, so a sharded run gives exactly the single-process value.

    Example:
        >>> metric = Accuracy()
        >>> metric.update(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        >>> metric.compute()
        tensor(0.5000)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    correct: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    @override
    def update(self, preds: Tensor, target: Tensor) -> None:
        labels = preds.argmax(dim=-1) if preds.ndim == target.ndim + 1 else preds
        if labels.shape != target.shape:
            raise ValueError(
                f"Expected `preds` of shape (N, C) or (N,) for `target` of shape {tuple(target.shape)}, but"
                f" got {tuple(preds.shape)}."
            )
        self.correct += (labels == target).sum()
        self.total += target.numel()

    @override
    def compute(self) -> Tensor:
        return self.correct.float() / self.total


def metric_name(metric: Metric) -> str:
    """The snake-case class name, e.g. ``MeanSquaredError`` -> ``mean_squared_error``."""
    return re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", type(metric).__name__).lower()


def build_metrics(factory: MetricFactory, task: str) -> MetricCollection:
    """A fresh collection from the task's factory; a single metric is named by :func:`metric_name`.

    Raises:
        TypeError: the factory builds something other than a torchmetrics ``Metric`` or ``MetricCollection``.
    """
    metric = factory()
    if isinstance(metric, MetricCollection):
        return metric
    if isinstance(metric, Metric):
        return MetricCollection({metric_name(metric): metric})
    raise TypeError(
        f"Expected argument `metrics` to build a torchmetrics Metric or MetricCollection for task {task!r},"
        f" but got {type(metric).__name__}."
    )


def task_factories(
    metrics: MetricFactory | Mapping[str, MetricFactory], tasks: list[str]
) -> dict[str, MetricFactory]:
    """One factory per task, from one factory for all tasks or a mapping that must cover every task.

    Raises:
        ValueError: a task without a factory.
        TypeError: a factory that is not callable.
    """
    factories = dict(metrics) if isinstance(metrics, Mapping) else dict.fromkeys(tasks, metrics)
    for task in tasks:
        if task not in factories:
            raise ValueError(
                f"Expected argument `metrics` to hold a factory for every task, but task {task!r} has none."
            )
        if not callable(factories[task]):
            kind = type(factories[task]).__name__
            raise TypeError(f"Expected argument `metrics` to be callable for task {task!r}, but got {kind}.")
    return {task: factories[task] for task in tasks}


def compute_scores(collection: MetricCollection, task: str) -> dict[str, float]:
    """``compute`` once (torchmetrics synchronizes the states across processes here) and return plain floats.

    Raises:
        ValueError: a metric that does not reduce to a scalar.
    """
    scores = {}
    for name, value in collection.compute().items():
        value = torch.as_tensor(value)
        if value.numel() != 1:
            raise ValueError(
                f"Expected metric {name!r} of task {task!r} to compute a scalar, but got shape"
                f" {tuple(value.shape)}."
            )
        scores[name] = float(value.item())
    return scores
