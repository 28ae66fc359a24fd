"""Key sharding: which rank merges which keys, balancing the method's estimated cost per key.

This stage owns :func:`shard_keys`, a deterministic greedy longest-processing-time assignment of a plan's merge keys
to ranks by ``method.cost(shape, num_tasks)``; the cost model itself is the method's. Every rank computes the same
assignment from the same plan, so no communication is needed to agree on it.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from lightning_merge.engine.plan import MergePlan
from lightning_merge.functional._checks import check_positive_int
from lightning_merge.methods import MergeMethod

__all__ = ["balance", "shard_keys"]


def shard_keys(plan: MergePlan, method: MergeMethod, num_tasks: int, world_size: int) -> list[list[str]]:
    """Assign the plan's merge keys to ``world_size`` ranks, balancing ``method.cost(shape, num_tasks)``.

    Greedy longest-processing-time (:func:`balance`): keys by decreasing cost (ties in plan order) each go to the
    least-loaded rank (ties to the lowest rank). Deterministic, so every rank computes the same assignment; each
    rank's keys are returned in plan order.

    Example:
        >>> from lightning_merge.methods import get_method
        >>> plan = MergePlan(("a", "b"), ("c",), (), {}, {"a": (8, 8), "b": (4, 4), "c": (4,)})
        >>> shard_keys(plan, get_method("average"), num_tasks=2, world_size=2)
        [['a'], ['b', 'c']]
    """
    check_positive_int("num_tasks", num_tasks)
    check_positive_int("world_size", world_size)
    keys = plan.merge_keys
    shares = balance([method.cost(plan.shapes[k], num_tasks) for k in keys], world_size)
    return [[keys[i] for i in share] for share in shares]


def balance(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """The indices of ``costs`` split into ``world_size`` shares of about equal total cost, each in index order.

    Greedy longest-processing-time: by decreasing cost (ties by index), each to the least-loaded share (ties to the
    lowest); within 4/3 of the best split. Also splits the input files to hash by their sizes.

    Example:
        >>> balance([5, 1, 4, 2], 2)
        [[0, 1], [2, 3]]
    """
    check_positive_int("world_size", world_size)
    loads = [(0.0, rank) for rank in range(world_size)]
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        shares[rank].append(i)
        heapq.heappush(loads, (load + costs[i], rank))
    return [sorted(share) for share in shares]
