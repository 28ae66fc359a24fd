"""What :class:`~lightning_merge.MergeCallback` merged, as the inputs of ``MergedEvalLoop.compare``.

The loop reads the callback through :class:`MergedCallback` (the attributes it sets when it merges), so evaluation
does not depend on the callbacks package: the base's values of the merged keys, each task's fine-tuned values read
lazily from its source (:class:`SourceState`: the ``T`` fine-tuned models are never all in memory), and the merged
task matrices, computed by the callback (``merge.task_matrices``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

from torch import Tensor

from lightning_merge.engine.plan import MergePlan
from lightning_merge.io.protocol import CheckpointSource
from lightning_merge.methods import MergeMethod

__all__ = ["Methods", "MergedCallback", "SourceState", "check_merged"]

Methods = str | MergeMethod | Sequence[str | MergeMethod] | Mapping[str, str | MergeMethod]


class MergedCallback(Protocol):
    """What the loop reads from a :class:`~lightning_merge.MergeCallback` once it has merged."""

    @property
    def heads(self) -> Mapping[str, Mapping[str, Tensor]]: ...

    @property
    def plan(self) -> MergePlan | None: ...

    @property
    def base_source(self) -> CheckpointSource | None: ...

    @property
    def task_sources(self) -> Mapping[str, CheckpointSource]: ...

    def task_matrices(self, methods: Methods, *, progress: bool = True) -> dict[str, dict[str, Tensor]]: ...


def check_merged(merge: MergedCallback) -> tuple[MergePlan, CheckpointSource]:
    """The plan and base source of a callback that has merged.

    Raises:
        TypeError: ``merge`` is not a merge callback.
        ValueError: it has not merged (yet), or merged LoRA adapters (no plan of full weights).
    """
    missing = [name for name in ("heads", "plan", "base_source", "task_sources", "task_matrices")
               if not hasattr(merge, name)]
    if missing:
        raise TypeError(
            f"Expected argument `merge` to be a MergeCallback, but got a {type(merge).__name__} without {missing}."
        )
    if merge.plan is None or merge.base_source is None:
        raise ValueError(
            "Expected argument `merge` to be a MergeCallback that has merged full weights, but it has not merged."
            " HINT: evaluate after the last task's fit (the merge runs at its end); LoRA merges give"
            " `merge.merged_adapter` instead."
        )
    return merge.plan, merge.base_source


class SourceState(Mapping[str, Tensor]):
    """The tensors of ``keys`` of ``source``, each read when accessed (never all held at once).

    Example:
        >>> import torch
        >>> from lightning_merge.io import open_source
        >>> state = SourceState(open_source({"w": torch.ones(2), "b": torch.zeros(1)}), ["w"])
        >>> list(state), state["w"]
        (['w'], tensor([1., 1.]))
    """

    def __init__(self, source: CheckpointSource, keys: Sequence[str]) -> None:
        self.source, self._keys = source, list(keys)
        self._known = set(self._keys)

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._known:
            raise KeyError(key)
        return self.source.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
