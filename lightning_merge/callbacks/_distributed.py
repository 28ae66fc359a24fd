"""Distributed steps of the merge at fit end, through the Lightning strategy only (every rank, same order)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_merge.engine import MergePlan, merge_keys
from lightning_merge.functional._checks import numel
from lightning_merge.io import CheckpointSource
from lightning_merge.methods import MergeMethod

# the strategies a merge runs under (sharded ones are refused): both know their rank and the number of ranks
RankedStrategy = pl.strategies.ParallelStrategy | pl.strategies.SingleDeviceStrategy


def ranked(strategy: pl.strategies.Strategy) -> RankedStrategy:
    """``strategy`` as one that knows its rank and the number of ranks (every Lightning strategy but custom ones)."""
    if not isinstance(strategy, pl.strategies.ParallelStrategy | pl.strategies.SingleDeviceStrategy):
        raise TypeError(
            f"Expected the trainer's strategy to be a single-device or parallel strategy, but got"
            f" {type(strategy).__name__}."
        )
    return strategy

BUCKET_BYTES = 64 * 2**20


def merge_shard(
    strategy: RankedStrategy,
    method: MergeMethod,
    base: CheckpointSource,
    tasks: Sequence[CheckpointSource],
    shards: Sequence[Sequence[str]],
    *,
    device: torch.device,
    progress: bool,
) -> dict[str, Tensor]:
    """Merge this rank's keys; if any rank fails, every rank raises (no rank is left waiting at a collective)."""
    mine: dict[str, Tensor] = {}
    error: BaseException | None = None
    try:
        mine = dict(merge_keys(method, base, tasks, shards[strategy.global_rank], device=device, progress=progress))
    except Exception as err:  # re-raised below, after the other ranks have heard of it
        error = err
    raise_if_any_failed(strategy, error)
    return mine


def raise_if_any_failed(strategy: RankedStrategy, error: BaseException | None) -> None:
    """All-reduce a failure flag: the failing rank re-raises its error, the others raise a ``RuntimeError``."""
    if strategy.world_size == 1:
        if error is not None:
            raise error
        return
    flag = torch.tensor([float(error is not None)], device=strategy.root_device)
    failed = int(strategy.reduce(flag, reduce_op="sum").item())
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"The merge failed on {failed} other rank(s); their error messages say why.")


def exchange(strategy: RankedStrategy, plan: MergePlan, base: CheckpointSource,
             mine: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Give every rank every merged tensor: byte buffers of up to 64 MiB, summed across ranks.

    Each key is owned by exactly one rank and the others contribute zeros, so the sum is the owner's bytes exactly,
    whatever the dtype.
    """
    if strategy.world_size == 1:
        return dict(mine)
    merged: dict[str, Tensor] = {}
    for bucket in _buckets(plan, base):
        total = sum(n for _, _, n in bucket)
        buffer = torch.zeros(total, dtype=torch.uint8, device=strategy.root_device)
        for key, offset, n in bucket:
            if key in mine:
                buffer[offset:offset + n] = _as_bytes(mine[key]).to(buffer.device)
        buffer = strategy.reduce(buffer, reduce_op="sum").cpu()
        for key, offset, n in bucket:
            merged[key] = buffer[offset:offset + n].view(base.dtype(key)).reshape(plan.shapes[key]).clone()
    return merged


def _as_bytes(tensor: Tensor) -> Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _buckets(plan: MergePlan, base: CheckpointSource) -> Iterator[list[tuple[str, int, int]]]:
    bucket: list[tuple[str, int, int]] = []
    offset = 0
    for key in plan.merge_keys:
        n = numel(plan.shapes[key]) * base.dtype(key).itemsize
        if bucket and offset + n > BUCKET_BYTES:
            yield bucket
            bucket, offset = [], 0
        bucket.append((key, offset, n))
        offset += n
    if bucket:
        yield bucket
