"""Evaluation of merged models: per-task scores, reference rows, the scaling search and the report.

Data flows one way: the merge core gives ``M`` per key; this package applies ``W0 + lam * M``, scores it on
every task with the task's own head (of any shape: :mod:`~lightning_merge.evaluation.heads`) and reports
``{task: {metric: value}}`` per model. ``MergedEvalLoop.from_callback`` and ``compare_callback`` evaluate what a
``MergeCallback`` merged in two calls. Task-routed rows (task ``t`` run with its own update ``W0 + D_t``, e.g. its
TSV-C compression: ``compare(..., routed=...)``, ``compare_callback(..., compressed=...)``) sit beside the merged
ones, with each task's retained score (routed / own fine-tune).
"""

from lightning_merge.evaluation._data import Forward, ShardSampler, default_forward
from lightning_merge.evaluation.heads import HeadSwap, check_heads
from lightning_merge.evaluation.loop import MergedEvalLoop
from lightning_merge.evaluation.metrics import Accuracy, MetricFactory
from lightning_merge.evaluation.report import EvalResult, MergeReport
from lightning_merge.evaluation.search import DEFAULT_GRID, ScalingSearch, apply_scaling, search_scaling

__all__ = [
    "DEFAULT_GRID",
    "Accuracy",
    "EvalResult",
    "Forward",
    "HeadSwap",
    "MergeReport",
    "MergedEvalLoop",
    "MetricFactory",
    "ScalingSearch",
    "ShardSampler",
    "apply_scaling",
    "check_heads",
    "default_forward",
    "search_scaling",
]
