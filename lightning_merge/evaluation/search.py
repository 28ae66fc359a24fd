"""Scaling coefficient search: ``W(lam) = W0 + lam * M`` is linear in ``lam``, so ``M`` is computed once.

Each ``lam`` of a grid is applied in place as ``param.copy_(W0 + lam * M)``, recomputed from ``W0`` every
time, so the weights never drift however many values are tried and no copy of the model is made.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from lightning_merge.functional._checks import check_finite_numbers, compute_dtype

if TYPE_CHECKING:
    from lightning_merge.evaluation.loop import MergedEvalLoop

DEFAULT_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))


class ScalingSearch(NamedTuple):
    """The chosen coefficient and the curve ``{lam: mean score over tasks}`` it was chosen from."""

    scaling: float
    curve: dict[float, float]


def check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    """The grid as a tuple of floats.

    Raises:
        ValueError: an empty grid or a value that is not a finite number.
    """
    return check_finite_numbers("grid", grid, non_empty=True)


def scaling_targets(
    model: nn.Module,
    base: Mapping[str, Tensor],
    merged_matrix: Mapping[str, Tensor],
    name: str = "merged_matrix",
) -> dict[str, Tensor]:
    """The model's tensors that ``W0 + lam * M`` writes, checked against ``base`` and ``merged_matrix``.

    Raises:
        ValueError: ``base`` and ``merged_matrix`` name different keys, a key the model lacks, or shapes
            differ.
    """
    if set(base) != set(merged_matrix):
        diff = sorted(set(base) ^ set(merged_matrix))
        raise ValueError(
            f"Expected `base` and `{name}` to hold the same keys, but they differ on {diff[:5]}."
        )
    state = model.state_dict(keep_vars=True)
    for key, matrix in merged_matrix.items():
        if key not in state:
            raise ValueError(
                f"Expected every key of `{name}` to name a parameter of the model, but got {key!r}."
            )
        shapes = {tuple(state[key].shape), tuple(base[key].shape), tuple(matrix.shape)}
        if len(shapes) != 1:
            raise ValueError(
                f"Expected matching shapes for {key!r}, but the model, `base` and `{name}` have"
                f" {sorted(shapes)}."
            )
    return {key: state[key] for key in merged_matrix}


@torch.no_grad()
def _apply(
    targets: dict[str, Tensor], base: Mapping[str, Tensor], matrix: Mapping[str, Tensor], lam: float
) -> None:
    for key, target in targets.items():
        dtype = compute_dtype(target.dtype)
        target.copy_(base[key].to(target.device, dtype) + lam * matrix[key].to(target.device, dtype))


def apply_scaling(
    model: nn.Module, base: Mapping[str, Tensor], merged_matrix: Mapping[str, Tensor], scaling: float
) -> None:
    """Set the merged parameters of ``model`` in place to ``W = W0 + lam * M``, with ``lam = scaling``.

    Computed in float32 (float64 for float64 parameters) and cast to the parameter's dtype; the result
    depends on ``scaling`` only, never on earlier calls.

    Example:
        >>> layer = torch.nn.Linear(2, 2, bias=False)
        >>> apply_scaling(layer, {"weight": torch.zeros(2, 2)}, {"weight": torch.eye(2)}, 0.5)
        >>> layer.weight.detach()
        tensor([[0.5000, 0.0000],
                [0.0000, 0.5000]])
    """
    _apply(scaling_targets(model, base, merged_matrix), base, merged_matrix, float(scaling))


def search_scaling(
    loop: MergedEvalLoop,
    model: nn.Module,
    base: Mapping[str, Tensor],
    merged_matrix: Mapping[str, Tensor],
    grid: Sequence[float] = DEFAULT_GRID,
) -> ScalingSearch:
    """Score ``W0 + lam * M`` for every ``lam`` of ``grid`` with ``loop`` and leave the model at the best one.

    The score of ``lam`` is the mean over tasks of the loop's primary metric, ``(1/T) sum_t score_t(lam)``,
    taken on the loop's dataloaders (pass the validation ones); the best is the highest (lowest when the
    metric's ``higher_is_better`` is False), the first in grid order on ties.

    Args:
        loop: scores the model on every task (its dataloaders are the validation data).
        model: holds ``W0 + lam * M`` for the keys of ``base`` when this returns.
        base: ``W0``, the pre-trained values of the merged keys.
        merged_matrix: ``M``, the merged task matrix of the same keys, computed once with scaling 1
            (``method.with_scaling(1.0).merge(task_vectors)`` per key).
        grid: the values of ``lam`` to try.
    """
    grid = check_grid(grid)
    targets = scaling_targets(model, base, merged_matrix)
    curve = {}
    for lam in grid:
        _apply(targets, base, merged_matrix, lam)
        curve[lam] = loop.run(model, log=False).mean[loop.metric]
    sign = 1.0 if loop.higher_is_better else -1.0
    best = max(grid, key=lambda lam: -math.inf if math.isnan(curve[lam]) else sign * curve[lam])
    _apply(targets, base, merged_matrix, best)
    return ScalingSearch(best, curve)
