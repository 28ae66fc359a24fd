"""Batches and shards: the default ``forward``, structure checks that name the task, and unpadded sharding."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, Sampler
from typing_extensions import override

Forward = Callable[[nn.Module, Any], "tuple[Tensor, Tensor]"]


def default_forward(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    """``(model(inputs), target)`` for a batch ``(inputs, target)``."""
    inputs, target = batch
    return model(inputs), target


def _describe(obj: Any) -> str:
    if isinstance(obj, tuple | list):
        return f"a {type(obj).__name__} of {len(obj)} ({', '.join(type(x).__name__ for x in obj)})"
    return f"a {type(obj).__name__}"


def check_batch(batch: Any, task: str) -> None:
    """Raise when ``default_forward`` cannot unpack a batch of ``task``."""
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise TypeError(
            f"Expected each batch of task {task!r} to be a pair `(inputs, target)`, but got"
            f" {_describe(batch)}."
            " HINT: pass `forward=` to score other batch structures."
        )


def check_output(output: Any, task: str) -> tuple[Tensor, Tensor]:
    """Raise unless ``forward`` returned a pair of tensors ``(preds, target)`` for ``task``."""
    pair = isinstance(output, tuple | list) and len(output) == 2
    if not (pair and all(isinstance(x, Tensor) for x in output)):
        raise TypeError(
            f"Expected `forward` to return a pair `(preds, target)` of tensors for task {task!r}, but got"
            f" {_describe(output)}."
        )
    return output[0], output[1]


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + R, rank + 2R, ...`` of a dataset of ``size`` samples over ``R`` replicas.

    Unlike ``DistributedSampler`` it never pads the last shard with repeated samples, so metrics whose states
    are summed across ranks equal a single-process run for any dataset size (shards may differ by one sample).
    """

    def __init__(self, size: int, num_replicas: int, rank: int) -> None:
        self.indices = range(rank, size, num_replicas)

    @override
    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def shard(loader: Iterable, num_replicas: int, rank: int, task: str) -> Iterable:
    """This rank's shard of a map-style ``DataLoader`` (same batch size, collate function and workers).

    Loaders that are not ``DataLoader``s, or already use a ``DistributedSampler``, are taken as sharded by the
    user.

    Raises:
        ValueError: a ``DataLoader`` that cannot be re-sharded (iterable dataset or custom batch sampler).
    """
    if num_replicas <= 1 or not isinstance(loader, DataLoader):
        return loader
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        raise ValueError(
            f"Expected the dataloader of task {task!r} to be re-shardable across {num_replicas} processes,"
            " but it has an iterable dataset or a custom batch sampler. HINT: pass a loader that yields this"
            " rank's shard with a `DistributedSampler`."
        )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=ShardSampler(len(loader.dataset), num_replicas, rank),  # type: ignore[arg-type]
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
    )
