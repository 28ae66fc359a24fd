"""TSV-C, Task Singular Vectors Compress (Gargiulo et al., CVPR 2025, arXiv:2412.00081; METHODS.md, "TSV-C").

Each task is kept separately, compressed per matrix parameter to its top singular components:
``D_t ~ U_t[:, :k] diag(s_t[:k]) V_t[:, :k]^T``, stored in ``k (m + n + 1)`` numbers instead of ``m n``. By
Eckart-Young this is the best rank-``k`` approximation in the Frobenius norm: ``||D_t - trunc_k(D_t)||_F^2 =
sum_{i>k} s_i^2``. ``k`` is the ``rank`` option of TSV-M (an int, or a fraction of ``r = min(m, n)``; default
``max(1, floor(r / T))`` for ``T`` tasks compressed together), or the smallest ``k`` whose kept energy
``sum_{i<=k} s_i^2`` reaches ``energy * ||D_t||_F^2``.

**(choice)** Only 2-D task matrices are compressed here (:func:`tsv_c`); the caller keeps the other parameters
(biases, norms) whole, as METHODS.md says. Pure torch: no I/O, no Lightning import, inputs never modified.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lightning_merge.functional._checks import (
    Rank,
    check_positive_int,
    check_rank,
    compute_dtype,
    is_finite_number,
    resolve_rank,
)
from lightning_merge.functional.lora import LowRankUpdate
from lightning_merge.functional.svd import Solver, numerically_nonzero, rank_tolerance, truncated_svd

__all__ = ["Truncation", "check_energy", "compressed_numel", "energy_rank", "tsv_c", "tsv_c_tasks"]


class Truncation(NamedTuple):
    """The rank-``k`` truncation ``(U * s) @ V.T`` of one ``m x n`` matrix: ``U`` ``(m, k)``, ``s`` ``(k,)``
    descending, ``V`` ``(n, k)``. ``k = 0`` (empty factors) for a zero matrix."""

    U: Tensor
    s: Tensor
    V: Tensor

    @property
    def rank(self) -> int:
        return int(self.s.shape[0])

    def dense(self) -> Tensor:
        """The ``m x n`` matrix ``U diag(s) V^T``."""
        return (self.U * self.s) @ self.V.T

    def lora(self) -> LowRankUpdate:
        """Balanced LoRA factors of scale 1: ``B = U diag(sqrt(s))``, ``A = diag(sqrt(s)) V^T`` (METHODS.md)."""
        root = self.s.sqrt()
        return LowRankUpdate(self.U * root, (self.V * root).T.contiguous(), 1.0)


def compressed_numel(shape: tuple[int, int], k: int) -> int:
    """Numbers stored for a rank-``k`` truncation of an ``m x n`` matrix: ``k (m + n + 1)`` (``U``, ``s``, ``V``).

    Example:
        >>> compressed_numel((768, 768), 76) / (768 * 768)  # 10% of the rank, about 20% of the size
        0.198...
    """
    return k * (shape[0] + shape[1] + 1)


def check_energy(energy: object) -> None:
    """Raise ``ValueError`` unless ``energy`` is ``None`` or a float in ``(0, 1]``."""
    if energy is not None and not (is_finite_number(energy) and 0.0 < energy <= 1.0):
        raise ValueError(f"Expected argument `energy` to be None or a float in (0, 1], but got {energy!r}.")


def energy_rank(s: Tensor, total: float, energy: float, slack: float = 0.0) -> int | None:
    """The smallest ``k`` with ``sum_{i<=k} s_i^2 >= energy * total - slack`` (in float64), or ``None`` when all of
    ``s`` does not reach it.

    Example:
        >>> energy_rank(torch.tensor([3.0, 2.0, 1.0]), 14.0, 0.9)  # 9/14 = 0.64, 13/14 = 0.93
        2
    """
    kept = torch.cumsum(s.to(torch.float64) ** 2, dim=0)
    reached = torch.nonzero(kept >= energy * total - slack)
    return int(reached[0, 0]) + 1 if reached.numel() else None


def _check_matrix(task_matrix: object) -> Tensor:
    if not isinstance(task_matrix, Tensor) or not task_matrix.is_floating_point():
        got = getattr(task_matrix, "dtype", type(task_matrix).__name__)
        raise TypeError(f"Expected argument `task_matrix` to be a floating-point torch.Tensor, but got {got}.")
    if task_matrix.ndim != 2 or 0 in task_matrix.shape:
        raise ValueError(
            f"Expected argument `task_matrix` to be a non-empty 2-D matrix, but got shape {tuple(task_matrix.shape)}."
            " HINT: TSV-C compresses matrix parameters only; keep the other parameters whole."
        )
    if not bool(torch.isfinite(task_matrix).all()):
        raise ValueError("Expected argument `task_matrix` to be finite, but it contains NaN or Inf.")
    return task_matrix.to(compute_dtype(task_matrix.dtype))


def _drop_zero(U: Tensor, S: Tensor, V: Tensor, shape: torch.Size) -> Truncation:
    keep = numerically_nonzero(S, shape)
    return Truncation(U[:, keep], S[keep], V[:, keep])


def _energy_truncation(d: Tensor, energy: float, solver: Solver, oversample: int, niter: int) -> Truncation:
    # Doubling search: top-k SVDs with k = 8, 16, ... until the kept energy reaches the target. The kept energy of
    # a randomized truncation is a lower bound of the exact one (its singular values are those of a projection of
    # D), so the guarantee holds for what is stored; "exact" takes one full SVD and the exact smallest k.
    r = min(d.shape)
    total = float(torch.linalg.vector_norm(d.to(torch.float64)) ** 2)
    slack = rank_tolerance(d.shape, d.dtype) * total  # round-off of sum s_i^2 against ||D||_F^2
    k = r if solver == "exact" else min(r, 8)
    while True:
        U, S, V = truncated_svd(d, k, solver=solver, oversample=oversample, niter=niter)
        found = energy_rank(S, total, energy, slack)
        if found is not None or k == r:
            kept = found if found is not None else k
            return _drop_zero(U[:, :kept], S[:kept], V[:, :kept], d.shape)
        k = min(r, 2 * k)


def tsv_c(
    task_matrix: Tensor,
    *,
    rank: Rank = None,
    energy: float | None = None,
    num_tasks: int = 1,
    solver: Solver = "auto",
    oversample: int = 10,
    niter: int = 2,
) -> Truncation:
    """TSV-C of one task matrix (Gargiulo et al., CVPR 2025): its rank-``k`` truncation
    ``D ~ U[:, :k] diag(s[:k]) V[:, :k]^T``, the best rank-``k`` approximation (Eckart-Young).

    Args:
        task_matrix: the ``m x n`` task matrix ``D_t = W_t - W0`` of one matrix parameter (not modified); the SVD
            runs in float32 (float64 for float64 input) on its device.
        rank: ``k`` as in TSV-M: an int (clamped to ``r = min(m, n)``), a fraction of ``r`` (at least 1), or
            ``None`` for ``max(1, floor(r / num_tasks))``: then ``num_tasks`` compressed tasks together take about
            the storage of one task matrix (METHODS.md's default).
        energy: instead of ``rank``, the smallest ``k`` whose kept ``sum s_i^2`` reaches ``energy * ||D||_F^2``
            (up to a round-off slack of ``sqrt(max(m, n)) eps ||D||_F^2``; ``1.0`` keeps every numerically
            non-zero component). **(choice)** With ``solver="exact"`` ``k`` comes from the exact spectrum; otherwise
            from top-``k`` SVDs of growing ``k`` (8, 16, ...), whose kept energy is a lower bound of the exact
            one, so the stored truncation provably keeps at least ``energy`` of ``||D||_F^2``, and ``k`` exceeds
            the exact smallest one only when some ``s_i^2`` lies within the sketch's error of the threshold.
        num_tasks: ``T``, for the default ``rank``.
        solver, oversample, niter: see :func:`~lightning_merge.functional.svd.truncated_svd` (``"auto"``: the
            randomized SVD where it is faster and provably converged, else the exact one).

    Returns:
        The :class:`Truncation` ``(U, s, V)`` in the compute dtype. **(choice)** Components at round-off level
        (``s <= s_max sqrt(max(m, n)) eps``, the rule of TSV-M's :func:`~lightning_merge.functional.task_features`)
        are dropped, so a rank-``q`` matrix keeps at most ``q`` and a zero matrix none (``k = 0``).

    Raises:
        TypeError: a non-tensor or non-floating-point input. ValueError: not 2-D, NaN or Inf, a bad ``rank``,
            ``energy`` or ``num_tasks``, or both ``rank`` and ``energy``.

    Example:
        >>> d = torch.randn(6, 2, dtype=torch.float64) @ torch.randn(2, 5, dtype=torch.float64)  # rank 2
        >>> t = tsv_c(d, rank=4)
        >>> t.rank, torch.allclose(t.dense(), d)
        (2, True)
        >>> tsv_c(torch.diag(torch.tensor([3.0, 2.0, 1.0])), energy=0.9).s
        tensor([3., 2.])
    """
    check_rank(rank)
    check_energy(energy)
    check_positive_int("num_tasks", num_tasks)
    if rank is not None and energy is not None:
        raise ValueError(
            f"Expected at most one of the arguments `rank` and `energy`, but got rank={rank!r} and energy={energy!r}."
        )
    d = _check_matrix(task_matrix)
    if energy is not None:
        return _energy_truncation(d, float(energy), solver, oversample, niter)
    k = resolve_rank(rank, min(d.shape), num_tasks)
    return _drop_zero(*truncated_svd(d, k, solver=solver, oversample=oversample, niter=niter), d.shape)


def tsv_c_tasks(
    task_matrices: Tensor,
    *,
    rank: Rank = None,
    energy: float | None = None,
    solver: Solver = "auto",
    oversample: int = 10,
    niter: int = 2,
) -> list[Truncation]:
    """:func:`tsv_c` of the ``T`` task matrices of one parameter (``(T, m, n)``, ``num_tasks = T``), one truncation
    per task.

    With ``rank`` the ``T`` SVDs run as one batch, so ``solver="auto"`` decides for the parameter from the first
    task's sketch (:func:`~lightning_merge.functional.svd.truncated_svd` on a batch): where that sketch does not
    converge (real fine-tunes, whose spectra have no gap at ``k``) the other ``T - 1`` are not tried, and
    ``"auto"`` costs ``1/T`` of a sketch more than ``"exact"`` instead of a sketch per task. With ``energy`` each
    task takes its own search, as in :func:`tsv_c`.

    Example:
        >>> d = torch.randn(3, 6, 2, dtype=torch.float64) @ torch.randn(3, 2, 5, dtype=torch.float64)  # rank 2
        >>> [t.rank for t in tsv_c_tasks(d, rank=4)], torch.allclose(tsv_c_tasks(d, rank=4)[1].dense(), d[1])
        ([2, 2, 2], True)
    """
    if not isinstance(task_matrices, Tensor) or task_matrices.ndim != 3 or task_matrices.shape[0] == 0:
        got = tuple(task_matrices.shape) if isinstance(task_matrices, Tensor) else type(task_matrices).__name__
        raise ValueError(f"Expected argument `task_matrices` to be a (T, m, n) tensor with T >= 1, but got {got}.")
    T = task_matrices.shape[0]
    if energy is not None or T == 1:
        return [tsv_c(d, rank=rank, energy=energy, num_tasks=T, solver=solver, oversample=oversample, niter=niter)
                for d in task_matrices]
    check_rank(rank)
    d = task_matrices.to(compute_dtype(task_matrices.dtype)) if task_matrices.is_floating_point() else task_matrices
    for one in d:  # slices of the converted batch: checking copies nothing
        _check_matrix(one)
    k = resolve_rank(rank, min(d.shape[-2:]), T)
    U, S, V = truncated_svd(d, k, solver=solver, oversample=oversample, niter=niter)
    return [_drop_zero(*parts, d.shape[-2:]) for parts in zip(U, S, V, strict=True)]

