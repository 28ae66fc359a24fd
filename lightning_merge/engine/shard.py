"""Key sharding: which rank merges which keys, balancing the method's estimated cost per key.

This stage owns :func:`shard_keys`, a deterministic greedy longest-processing-time assignment of a plan's merge keys
to ranks by ``method.cost(shape, num_tasks)``; the cost model itself is the method's. Every rank computes the same
assignment from the same plan, so no communication is needed to agree on it.
"""

from __future__ import annotations

import heapq

from lightning_merge.engine.plan import MergePlan
from lightning_merge.functional._checks import check_positive_int
from lightning_merge.methods import MergeMethod

__all__ = ["shard_keys"]


def shard_keys(plan: MergePlan, method: MergeMethod, num_tasks: int, world_size: int) -> list[list[str]]:
    """Assign the plan's merge keys to ``world_size`` ranks, balancing ``method.cost(shape, num_tasks)``.

    Greedy longest-processing-time: keys by decreasing cost (ties in plan order) each go to the least-loaded
    rank (ties to the lowest rank). Deterministic, so every rank computes the same assignment; each rank's
    keys are returned in plan order.

    Example:
        >>> from lightning_merge.methods import get_method
        >>> plan = MergePlan(("a", "b"), ("c",), (), {}, {"a": (8, 8), "b": (4, 4), "c": (4,)})
        >>> shard_keys(plan, get_method("average"), num_tasks=2, world_size=2)
        [['a'], ['b', 'c']]
    """
    check_positive_int("num_tasks", num_tasks)
    check_positive_int("world_size", world_size)
    order = {k: i for i, k in enumerate(plan.merge_keys)}
    by_cost = sorted(order, key=lambda k: (-method.cost(plan.shapes[k], num_tasks), order[k]))
    loads = [(0.0, rank) for rank in range(world_size)]
    assigned: list[list[str]] = [[] for _ in range(world_size)]
    for key in by_cost:
        load, rank = heapq.heappop(loads)
        assigned[rank].append(key)
        heapq.heappush(loads, (load + method.cost(plan.shapes[key], num_tasks), rank))
    return [sorted(keys, key=order.__getitem__) for keys in assigned]
