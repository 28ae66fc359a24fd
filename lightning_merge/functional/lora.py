"""LoRA task matrices in factored form (METHODS.md, "LoRA task matrices"): merges that never build ``m x n``.

A LoRA update is ``D = scale * B @ A`` with ``B`` ``(m, r)``, ``A`` ``(r, n)`` and ``scale = lora_alpha / r``
(rsLoRA, Kalajdzievski 2023, arXiv:2312.03732: ``lora_alpha / sqrt(r)``). Its thin SVD comes from two thin QR
factorizations and one ``r x r`` SVD, at ``O((m + n) r^2)`` cost:

``B = Q_B R_B``, ``A^T = Q_A R_A``, ``R_B R_A^T = X S Y^T``  =>  ``D = (Q_B X) (scale * S) (Q_A Y)^T``.

TSV-M and SFTM then run on at most ``sum_t r_t`` concatenated features through the methods' ``factors`` step,
and the merged ``M = L R^T`` is again a low-rank product, returned as balanced factors of rank at most
``sum_t k_t``.
Everything here is pure torch: no I/O, no Lightning or peft import, inputs never modified, no device choice.
Half-precision factors are computed in float32 (the methods' small systems in float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_merge.functional._checks import (
    Rank,
    check_positive_int,
    check_rank,
    check_scaling,
    compute_dtype,
    resolve_rank,
)
from lightning_merge.functional.merges import Factors
from lightning_merge.functional.svd import numerically_nonzero


class LowRankUpdate(NamedTuple):
    """The update ``scale * B @ A`` of one ``m x n`` matrix: ``B`` ``(m, r)``, ``A`` ``(r, n)``."""

    B: Tensor
    A: Tensor
    scale: float = 1.0


def lora_scale(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """peft's LoRA scale: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (arXiv:2312.03732).

    Example:
        >>> lora_scale(16, 8), lora_scale(16, 4, use_rslora=True)
        (2.0, 8.0)
    """
    check_positive_int("r", r)
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


def check_update(update: LowRankUpdate, name: str = "update") -> None:
    """Raise ``TypeError``/``ValueError`` unless ``update`` holds 2-D floating factors of matching rank."""
    B, A = update.B, update.A
    if not (isinstance(B, Tensor) and isinstance(A, Tensor) and B.is_floating_point() and A.is_floating_point()):
        got = ", ".join(getattr(x, "dtype", type(x).__name__).__str__() for x in (B, A))
        raise TypeError(f"Expected `{name}.B` and `{name}.A` to be floating-point tensors, but got {got}.")
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"Expected `{name}` to hold B (m, r) and A (r, n), but got B {tuple(B.shape)} and A {tuple(A.shape)}."
        )
    check_scaling(update.scale)


def lora_shape(update: LowRankUpdate) -> tuple[int, int]:
    """``(m, n)``, the shape of ``B @ A``."""
    return update.B.shape[0], update.A.shape[1]


def lora_dense(update: LowRankUpdate) -> Tensor:
    """The dense ``scale * B @ A`` (a reference and the merge into base weights; the merges never call it)."""
    check_update(update)
    dtype = compute_dtype(update.B.dtype)
    return update.scale * (update.B.to(dtype) @ update.A.to(dtype))


def lora_svd(update: LowRankUpdate) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``scale * B @ A`` without forming it (METHODS.md): QR of ``B`` and ``A^T``, SVD of ``R_B R_A^T``.

    Returns:
        ``U`` ``(m, q)``, ``s`` ``(q,)`` descending, ``V`` ``(n, q)`` in the compute dtype, where ``q <= r`` is the
        numerical rank: components with ``s <= s_max * sqrt(max(m, n)) * eps`` are dropped **(choice)**, the rule
        :func:`~lightning_merge.functional.svd.task_features` applies on the dense path
        (:func:`~lightning_merge.functional.svd.rank_tolerance`; a zero update keeps nothing). A negative
        ``scale`` flips the sign of ``U``.

    Example:
        >>> B, A = torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
        >>> U, s, V = lora_svd(LowRankUpdate(B, A, 0.5))
        >>> torch.allclose((U * s) @ V.T, 0.5 * B @ A), s.shape
        (True, torch.Size([2]))
    """
    check_update(update)
    dtype = compute_dtype(update.B.dtype)
    QB, RB = torch.linalg.qr(update.B.to(dtype) * update.scale)
    QA, RA = torch.linalg.qr(update.A.to(dtype).mT)
    X, S, Yh = torch.linalg.svd(RB @ RA.mT, full_matrices=False)
    keep = numerically_nonzero(S, lora_shape(update))
    return QB @ X[:, keep], S[keep], QA @ Yh[keep].mT


def _check_updates(updates: Sequence[LowRankUpdate]) -> tuple[int, int]:
    if len(updates) == 0:
        raise ValueError("Expected argument `updates` to hold at least one LoRA update, but got an empty sequence.")
    for t, update in enumerate(updates):
        check_update(update, f"updates[{t}]")
        if lora_shape(update) != lora_shape(updates[0]):
            raise ValueError(
                f"Expected every update to have the shape {lora_shape(updates[0])} of `updates[0]`, but"
                f" `updates[{t}]` is {lora_shape(update)}."
            )
    return lora_shape(updates[0])


def lora_task_features(updates: Sequence[LowRankUpdate], k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenated top-``k`` features of ``T`` LoRA updates (TSV-M steps 1-2 on factors).

    Task ``t`` contributes ``k_t = min(k, q_t)`` features, ``q_t <= r_t`` its numerical rank, so tasks of
    different ranks concatenate directly. Returns ``U`` ``(m, F)``, ``s`` ``(F,)``, ``V`` ``(n, F)``,
    ``F = sum_t k_t``, task by task, like :func:`~lightning_merge.functional.svd.task_features`.
    """
    _check_updates(updates)
    parts = [lora_svd(update) for update in updates]
    dtype = parts[0][0].dtype
    U = torch.cat([p[0][:, :k].to(dtype) for p in parts], dim=1)
    s = torch.cat([p[1][:k].to(dtype) for p in parts])
    V = torch.cat([p[2][:, :k].to(dtype) for p in parts], dim=1)
    return U, s, V


def lora_compact(update: LowRankUpdate) -> LowRankUpdate:
    """Balanced factors of minimal rank for the same product: ``(U diag(sqrt s), diag(sqrt s) V^T, 1)``.

    The SVD of :func:`lora_svd` gives equal column norms in both factors (the product is unchanged up to
    round-off) and drops numerically zero components **(choice)**. A zero product gives rank-1 zero factors,
    since a LoRA module needs ``r >= 1``.

    Example:
        >>> B = torch.ones(4, 3, dtype=torch.float64)  # rank 1 in disguise
        >>> out = lora_compact(LowRankUpdate(B, torch.ones(3, 5, dtype=torch.float64)))
        >>> out.B.shape, out.A.shape, torch.allclose(out.B @ out.A, B @ torch.ones(3, 5, dtype=torch.float64))
        (torch.Size([4, 1]), torch.Size([1, 5]), True)
    """
    U, s, V = lora_svd(update)
    if s.numel() == 0:
        m, n = lora_shape(update)
        return LowRankUpdate(U.new_zeros(m, 1), V.new_zeros(1, n))
    root = s.sqrt()
    return LowRankUpdate(U * root, (V * root).mT.contiguous())


def lora_balance(update: LowRankUpdate) -> LowRankUpdate:
    """The same product as a sum of balanced rank-one terms: ``(B diag(c), diag(1 / c) A, 1)``, ``scale`` folded in.

    ``c_j = sqrt(|a_j| / |scale b_j|)`` gives each term ``scale b_j a_j^T`` equal column and row norms (for TSV-M's
    ``(U_perp diag(s), V_perp)`` this is ``U_perp diag(sqrt s)``, ``diag(sqrt s) V_perp^T``). Terms whose norm
    ``|scale b_j| |a_j|`` is at most ``max_j(.) * r * eps`` are dropped **(choice: they are below round-off)**; a
    zero product gives rank-1 zero factors. ``O((m + n) r)``: the cheap alternative to :func:`lora_compact`.

    Example:
        >>> out = lora_balance(LowRankUpdate(torch.tensor([[4.0], [0.0]]), torch.tensor([[1.0, 0.0]]), 0.25))
        >>> out.B.T, out.A
        (tensor([[1., 0.]]), tensor([[1., 0.]]))
    """
    check_update(update)
    dtype = compute_dtype(update.B.dtype)
    B, A = update.B.to(dtype), update.A.to(dtype)
    col, row = B.norm(dim=0) * abs(update.scale), A.norm(dim=1)
    keep = _above_round_off(col * row)
    if not keep.any():
        return LowRankUpdate(B.new_zeros(B.shape[0], 1), A.new_zeros(1, A.shape[1]))
    if not keep.all():
        B, A, col, row = B[:, keep], A[keep], col[keep], row[keep]
    c = (row / col).sqrt()
    return LowRankUpdate(B * (c * update.scale), A / c[:, None])


def _above_round_off(norms: Tensor) -> Tensor:
    # The rank-one terms of a sum of r terms that are not at its round-off level, max_j(norm) * r * eps: norms of
    # terms, not singular values, so not the numerical rank of rank_tolerance.
    if norms.numel() == 0:
        return norms > 0
    return norms > norms.amax() * len(norms) * torch.finfo(norms.dtype).eps


def _finish(update: LowRankUpdate, compact: bool) -> LowRankUpdate:
    return lora_compact(update) if compact else lora_balance(update)


def lora_merge(
    updates: Sequence[LowRankUpdate],
    factors: Callable[[Tensor, Tensor, Tensor], Factors],
    *,
    rank: Rank = None,
    scaling: float = 1.0,
    compact: bool = False,
) -> LowRankUpdate:
    """TSV-M or SFTM of ``T`` LoRA updates of one matrix, in factored form: ``scaling * M = B' @ A'``.

    1. Features: per task the top ``k_t = min(k, q_t)`` triplets of :func:`lora_svd`, with the budget
       ``k = resolve_rank(rank, min(m, n), T)`` of the dense path (``max(1, min(m, n) // T)`` by default), so the
       kept features are those the dense path keeps **(choice: clamped to the adapter's rank; e.g. T=8, r_t=16,
       2048 x 2048 gives k = 256 and keeps all 16)**.
    2. ``(L, R) = factors(U, s, V)`` with ``M = L R^T``: a method's ``factors`` step, e.g.
       :func:`~lightning_merge.functional.merges.tsv_m_factors` or ``SFTM(...).factors``.
    3. ``scaling * L R^T`` as balanced factors of rank at most ``F = sum_t k_t`` and ``scale = 1``:
       :func:`lora_balance` (default), or with ``compact=True`` :func:`lora_compact`, the SVD of the product at
       ``O((m + n) F^2)`` more, whose rank is the numerical rank of ``M`` (smaller when tasks share features).

    Equals ``tsv_m`` / ``sftm`` on the dense ``scale_t * B_t @ A_t`` (exact solver) up to round-off, at
    ``O((m + n) F^2 + F^3)`` cost. Per-task weights go into each update's ``scale``.

    Example:
        >>> from lightning_merge.functional.merges import tsv_m, tsv_m_factors
        >>> ups = [LowRankUpdate(torch.randn(8, 2, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64), 0.5)
        ...        for _ in range(2)]
        >>> out = lora_merge(ups, tsv_m_factors)
        >>> dense = tsv_m([lora_dense(u) for u in ups], solver="exact")
        >>> out.B.shape[1] <= 4, torch.allclose(out.B @ out.A, dense)
        (True, True)
    """
    check_rank(rank)
    check_scaling(scaling)
    m, n = _check_updates(updates)
    U, s, V = lora_task_features(updates, resolve_rank(rank, min(m, n), len(updates)))
    if s.numel() == 0:  # every task is zero: so is the merge
        return lora_balance(LowRankUpdate(U.new_zeros(m, 1), V.new_zeros(1, n)))
    left, right = factors(U, s, V)
    return _finish(LowRankUpdate(left, right.mT, scaling), compact)


def lora_sum(updates: Sequence[LowRankUpdate], *, scaling: float = 1.0, compact: bool = False) -> LowRankUpdate:
    """``scaling * sum_t scale_t B_t A_t`` exactly, as factors of rank at most ``sum_t r_t``.

    Task arithmetic is ``lora_sum(updates, scaling=lam)``, the average ``lora_sum(updates, scaling=1 / T)``:
    ``[s_1 B_1 ... s_T B_T] @ [A_1; ...; A_T]`` is the sum, then :func:`lora_balance` (or :func:`lora_compact`).

    Example:
        >>> ups = [LowRankUpdate(torch.randn(5, 2), torch.randn(2, 4), 2.0) for _ in range(3)]
        >>> out = lora_sum(ups)
        >>> torch.allclose(out.B @ out.A, sum(lora_dense(u) for u in ups), atol=1e-5)
        True
    """
    check_scaling(scaling)
    _check_updates(updates)
    dtype = compute_dtype(updates[0].B.dtype)
    B = torch.cat([u.B.to(dtype) * (scaling * u.scale) for u in updates], dim=1)
    A = torch.cat([u.A.to(dtype) for u in updates], dim=0)
    return _finish(LowRankUpdate(B, A), compact)
