"""The streaming merge engine: plan the keys, shard them across ranks, merge parameter by parameter, write.

Data flows one way: checkpoint sources (:mod:`lightning_merge.io`) -> this per-key loop -> a method object
(:mod:`lightning_merge.methods`, the math). One module per stage: :mod:`~lightning_merge.engine.plan` (which keys are
merged, checked up front), :mod:`~lightning_merge.engine.shard` (which rank merges which keys),
:mod:`~lightning_merge.engine.stream` (the per-key merge), :mod:`~lightning_merge.engine.checkpoints` (the merge
to disk) and :mod:`~lightning_merge.engine.distributed` (the same merge split across the processes of ``torchrun``).
At most the inputs of two keys are held at once, and the output is streamed to disk as it is produced, so memory stays
bounded by the largest parameter, not by the model size times ``T``. Never imports Lightning.

Example:
    >>> import torch
    >>> from lightning_merge.io import open_source
    >>> from lightning_merge.methods import get_method
    >>> base = {"w": torch.zeros(4, 4), "b": torch.zeros(4), "step": torch.tensor(3)}
    >>> tuned = [{"w": torch.eye(4), "b": torch.ones(4), "step": torch.tensor(9)} for _ in range(2)]
    >>> plan = plan_merge(open_source(base), [open_source(t) for t in tuned])
    >>> plan.merge_keys, plan.skipped
    (('w', 'b'), {'step': 'non-floating-point buffer (torch.int64), copied from the base'})
    >>> sources = [open_source(t) for t in tuned]
    >>> merged = dict(merge_keys(get_method("average"), open_source(base), sources, plan.merge_keys))
    >>> merged["b"]
    tensor([1., 1., 1., 1.])
"""

from __future__ import annotations

from lightning_merge.engine.checkpoints import merge_checkpoints, merge_record
from lightning_merge.engine.plan import MergePlan, compile_exclude, plan_merge
from lightning_merge.engine.shard import shard_keys
from lightning_merge.engine.stream import DTYPES, merge_keys, task_matrices
from lightning_merge.io.record import RECORD_FILE, MergeRecord

__all__ = [
    "DTYPES",
    "RECORD_FILE",
    "MergePlan",
    "MergeRecord",
    "compile_exclude",
    "merge_checkpoints",
    "merge_keys",
    "merge_record",
    "plan_merge",
    "shard_keys",
    "task_matrices",
]

