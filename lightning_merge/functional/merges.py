"""The merge methods as pure functions of one parameter's task vectors (METHODS.md is the specification).

Each function takes the ``T`` task vectors ``D_t = W_t - W0`` of one parameter (a sequence of tensors, or one
stacked ``(T, *shape)`` tensor) and returns the scaled merged task vector ``scaling * M`` in the input dtype, so
that the merged parameter is ``W0 + scaling * M``. Half-precision inputs are computed in float32 (the small
systems in float64). Inputs are never modified; nothing here chooses a device or does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_merge.functional._checks import (
    Rank,
    check_choice,
    check_density,
    check_rank,
    check_rcond,
    check_scaling,
    check_weights,
    compute_dtype,
    finite_as,
    resolve_rank,
    stack_task_vectors,
)
from lightning_merge.functional.svd import (
    SOLVERS,
    Solver,
    gram,
    gram_roots,
    orthogonalize,
    psd_solve,
    task_features,
)

TaskVectors = Sequence[Tensor] | Tensor
Basis = Literal["features", "orthogonal"]
Fit = Literal["response", "mapping"]
Factors = tuple[Tensor, Tensor]


def _dtype_of(task_vectors: TaskVectors) -> torch.dtype:
    first = task_vectors if isinstance(task_vectors, Tensor) else next(iter(task_vectors), None)
    return first.dtype if isinstance(first, Tensor) else torch.float32


def average(task_vectors: TaskVectors, *, scaling: float = 1.0, weights: Sequence[float] | None = None) -> Tensor:
    """Average of the task vectors: ``M = mean_t D_t``.

    Example:
        >>> average([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])])
        tensor([2., 3.])
    """
    check_scaling(scaling)
    check_weights(weights)
    return finite_as(scaling * stack_task_vectors(task_vectors, weights).mean(0), _dtype_of(task_vectors))


def task_arithmetic(
    task_vectors: TaskVectors, *, scaling: float = 0.3, weights: Sequence[float] | None = None
) -> Tensor:
    """Task arithmetic (Ilharco et al., ICLR 2023, arXiv:2212.04089): ``M = sum_t D_t``, default ``scaling = 0.3``.

    Example:
        >>> task_arithmetic([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])], scaling=1.0)
        tensor([4., 6.])
    """
    check_scaling(scaling)
    check_weights(weights)
    return finite_as(scaling * stack_task_vectors(task_vectors, weights).sum(0), _dtype_of(task_vectors))


#: CPU cache blocking of the linear merges: each block of this many bytes of the output is finished while it sits in
#: cache. 4 MiB was fastest among 64 KiB - 32 MiB for task arithmetic of 8 ViT-B/32 checkpoints on 2 EPYC cores
#: (0.31-0.36 s against 0.68-0.78 s unblocked; L2 512 KiB per core, L3 32 MiB).
BLOCK_BYTES = 4 * 2**20


def sum_of_differences(
    base: Tensor,
    finetuned: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    *,
    scaling: float = 1.0,
    add_base: bool = False,
) -> Tensor:
    """``scaling * sum_t w_t (W_t - W0)`` in the compute dtype, plus ``W0`` with ``add_base``.

    The linear merges (average, task arithmetic) need no ``(T, *shape)`` buffer: each input is read once and the
    difference is taken before accumulating, so nothing is lost to cancellation. On CPU the work is blocked:
    each block of :data:`BLOCK_BYTES` of the output gets all ``T`` differences, the scaling and the base while it
    sits in cache, so memory traffic is one read of every input and one write of the output (instead of a
    subtraction and an addition over whole tensors per task). Every element goes through the same operations in
    the same order whatever the block size, so the result does not depend on it (tested bitwise). A NaN or Inf in
    any input makes the result non-finite; only then are the tasks checked one by one, to name the culprit.

    Example:
        >>> sum_of_differences(torch.ones(2), [torch.full((2,), 3.0), torch.zeros(2)], weights=[1.0, 2.0])
        tensor([0., 0.])
        >>> sum_of_differences(torch.ones(2), [torch.full((2,), 3.0)], scaling=0.5, add_base=True)
        tensor([2., 2.])
    """
    return linear_merge(base, finetuned, weights, scaling, add_base)[0]


def linear_merge(
    base: Tensor,
    finetuned: Sequence[Tensor],
    weights: Sequence[float] | None,
    scaling: float,
    add_base: bool,
) -> tuple[Tensor, bool]:
    """:func:`sum_of_differences` and whether every value of it is finite (as far as a per-block sum tells)."""
    check_weights(weights, len(finetuned))
    check_scaling(scaling)
    w0 = base.to(compute_dtype(base.dtype))
    if not finetuned:
        return (w0.clone() if add_base else torch.zeros_like(w0)), True
    out = torch.empty_like(w0, memory_format=torch.contiguous_format)
    flat_out, flat_w0, flats = out.view(-1), w0.reshape(-1), [f.reshape(-1) for f in finetuned]
    numel = flat_out.numel()
    step = max(1, BLOCK_BYTES // w0.element_size()) if w0.device.type == "cpu" else max(1, numel)
    scratch = flat_out.new_empty(min(step, numel)) if len(flats) > 1 else None
    finite = True
    for start in range(0, numel, step):
        total, w = flat_out[start : start + step], flat_w0[start : start + step]
        for t, f in enumerate(flats):
            into = total if t == 0 else scratch[: total.numel()]  # type: ignore[index]
            torch.sub(f[start : start + step].to(w.dtype), w, out=into)
            if t > 0:
                total.add_(into, alpha=1.0 if weights is None else float(weights[t]))
            elif weights is not None:
                total.mul_(float(weights[0]))
        if scaling != 1.0:
            total.mul_(scaling)
        if add_base:
            total.add_(w)
        finite = finite and bool(torch.isfinite(total.sum()))
    if not finite:
        bad = [t for t, ft in enumerate(finetuned) if not torch.isfinite(ft.to(w0.dtype) - w0).all()]
        if bad:
            raise ValueError(f"Expected finite task vectors, but `task_vectors{bad}` contain NaN or Inf.")
    return out, finite


TIES_CHUNK = 1 << 20
"""Entries per task vector that TIES processes at a time: its temporaries are a few ``(T, TIES_CHUNK)`` buffers,
whatever the parameter's size."""


def _chunks(size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive ranges of ``TIES_CHUNK`` entries (the last one shorter) covering ``size``."""
    for start in range(0, size, TIES_CHUNK):
        yield start, min(start + TIES_CHUNK, size)


def _cut_off(row: Tensor, keep: int) -> tuple[Tensor, int]:
    """The ``keep``-th largest magnitude of the 1-D ``row`` and how many entries of exactly that magnitude are among
    the ``keep`` largest, in two (float32) or four (float64) passes of ``TIES_CHUNK`` entries.

    A radix select on the bits of ``|x|``: for non-negative floats the bit patterns, read as integers, are ordered
    like the values, so each pass histograms the next 16 bits of the entries that share the bits found so far.
    Nothing of ``row``'s size is allocated (``topk`` or ``kthvalue`` take 16-28 bytes per entry).
    """
    bits = 32 if row.dtype == torch.float32 else 64
    as_int = torch.int32 if bits == 32 else torch.int64
    prefix, rank = 0, keep  # the cut-off is the rank-th largest of the entries whose high bits are `prefix`
    for shift in range(bits - 16, -1, -16):
        counts = torch.zeros(1 << 16, dtype=torch.int64, device=row.device)
        for start, stop in _chunks(row.numel()):
            pattern = row[start:stop].abs().view(as_int)
            if shift < bits - 16:
                pattern = pattern[(pattern >> (shift + 16)) == prefix]
            counts += torch.bincount(((pattern >> shift) & 0xFFFF).long(), minlength=1 << 16)
        from_top = counts.flip(0).cumsum(0)
        index = int(torch.searchsorted(from_top, rank))  # the first digit, from the top, reaching the rank
        rank -= int(from_top[index - 1]) if index else 0
        prefix = (prefix << 16) | (0xFFFF - index)
    return torch.tensor(prefix, dtype=as_int).view(row.dtype).to(row.device), rank


def _trim_masks(flat: Tensor, density: float) -> Callable[[int, int], Tensor]:
    """``mask(start, stop)``: which entries ``start:stop`` of each contiguous row ``flat[t]`` TIES keeps, the
    ``ceil(density * numel)`` largest magnitudes of each task vector; at the cut-off, magnitudes that tie are kept
    in index order (the first ones), so the result does not depend on a sort's order. Called with consecutive
    ranges from 0."""
    tasks, size = flat.shape
    keep = math.ceil(density * size)
    if keep >= size:
        return lambda start, stop: torch.ones((tasks, stop - start), dtype=torch.bool, device=flat.device)
    cut_offs = [_cut_off(row, keep) for row in flat]
    cut = torch.stack([c for c, _ in cut_offs]).unsqueeze(1)
    at_cut = [n for _, n in cut_offs]  # entries at the cut-off still to keep, per task

    def mask(start: int, stop: int) -> Tensor:
        magnitude = flat[:, start:stop].abs()
        kept = magnitude > cut
        equal = magnitude == cut
        for t in range(tasks):
            if at_cut[t]:
                kept[t] |= equal[t] & (equal[t].cumsum(0) <= at_cut[t])
                at_cut[t] -= min(at_cut[t], int(equal[t].sum()))
        return kept

    return mask


def trim_magnitude(deltas: Tensor, density: float) -> Tensor:
    """Keep the ``ceil(density * numel)`` largest-magnitude entries of each ``deltas[t]``, zero the rest; magnitudes
    that tie at the cut-off are kept in index order (row-major), the first ones."""
    check_density(density)
    # not flatten(1): 0-d parameters (e.g. a logit scale) are (T,); one copy if `deltas` is not contiguous
    flat = deltas.reshape(deltas.shape[0], -1).contiguous()
    out = torch.empty_like(flat)
    mask = _trim_masks(flat, density)
    for start, stop in _chunks(flat.shape[1]):
        torch.mul(flat[:, start:stop], mask(start, stop), out=out[:, start:stop])
    return out.view_as(deltas)


def ties(
    task_vectors: TaskVectors,
    *,
    density: float = 0.2,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """TIES-Merging (Yadav et al., NeurIPS 2023, arXiv:2306.01708), per-tensor trim (like peft and mergekit).

    1. Trim: keep the top ``density`` fraction of each task vector by magnitude.
    2. Elect: the sign of the sum of the trimmed values, per entry.
    3. Disjoint mean: average the non-zero trimmed entries that agree with the elected sign.

    The trim keeps ``ceil(density * numel)`` entries per task vector; magnitudes that tie at the cut-off (bf16 task
    vectors tie often) are kept in index order, the first ones (mergekit's sort breaks them in no stated order).
    The cut-off comes from a radix select and the rest runs ``TIES_CHUNK`` entries at a time, so the memory beyond
    the ``(T, *shape)`` task vectors is a few ``(T, TIES_CHUNK)`` buffers and the merged tensor (``topk`` took
    about 30 bytes per entry of every task vector, 7 GiB for two 32000 x 4096 embeddings).

    Example:
        >>> ties([torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])], density=1.0)
        tensor([ 2., -2.])
    """
    check_density(density)
    check_scaling(scaling)
    check_weights(weights)
    stacked = stack_task_vectors(task_vectors, weights).contiguous()
    flat = stacked.reshape(stacked.shape[0], -1)
    mask = _trim_masks(flat, density)
    merged = torch.empty(flat.shape[1], dtype=flat.dtype, device=flat.device)
    for start, stop in _chunks(flat.shape[1]):  # temporaries of a few (T, TIES_CHUNK), not (T, numel)
        trimmed = flat[:, start:stop] * mask(start, stop)
        elected = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
        torch.div((trimmed * agree).sum(0), agree.sum(0).clamp_min(1), out=merged[start:stop])
    return finite_as(merged.view(stacked.shape[1:]).mul_(scaling), _dtype_of(task_vectors))


def tsv_m_factors(U: Tensor, s: Tensor, V: Tensor) -> Factors:
    """TSV-M steps 3-4 on concatenated features: ``M = U_perp diag(s) V_perp^T``, returned as
    ``(U_perp diag(s), V_perp)``."""
    return orthogonalize(U) * s.to(U.dtype), orthogonalize(V)


def sftm_factors(
    U: Tensor, s: Tensor, V: Tensor, *, basis: Basis = "features", rcond: float | None = None, fit: Fit = "response"
) -> Factors:
    """SFTM steps 3-4 on concatenated features, returned as factors ``(L, R)`` with ``M = L diag(alpha) R^T``.

    The bases: ``basis="features"`` takes ``L = U``, ``R = V``; ``basis="orthogonal"`` takes TSV-M's
    ``L = U_perp = U (U^T U)^{+1/2}``, ``R = V_perp``. With ``C_U = L^T U`` and ``C_V = R^T V`` (the Grams
    ``G_U = U^T U``, ``G_V = V^T V`` in the features basis, their roots in the orthogonal one), ``alpha`` solves, in
    float64, minimum norm:

    - ``fit="response"`` (the paper): ``u_ti^T M v_ti = s_ti`` for every kept feature, ``(C_U * C_V) alpha = s``;
    - ``fit="mapping"`` (METHODS.md): least squares over each feature's whole output,
      ``min sum ||M v_ti - s_ti u_ti||^2``, whose normal equations are ``((L^T L) * (C_V C_V^T)) alpha =
      (C_U * C_V) s``; in the features basis ``(G_U * (G_V G_V)) alpha = (G_U * G_V) s``.

    Every system matrix is an element-wise product of PSD matrices, so PSD (Schur).
    """
    rows = max(U.shape[0], V.shape[0])
    if basis == "features":
        cu, cv = gram(U), gram(V)
        left, right, basis_gram = U, V, cu
    else:
        (cu, iu), (cv, iv) = gram_roots(U), gram_roots(V)  # U^T U_perp = G_U^{1/2}, symmetric
        left, right = U @ iu.to(U.dtype), V @ iv.to(V.dtype)
        basis_gram = iu @ cu @ cu @ iu  # U_perp^T U_perp: the projector on the kept range
    response = cu * cv
    if fit == "response":
        alpha = psd_solve(response, s, rcond, U.dtype, rows)
    else:
        alpha = psd_solve(basis_gram * (cv @ cv.mT), response @ s.to(response.dtype), rcond, U.dtype, rows)
    return left * alpha.to(U.dtype), right


def _svd_merge(
    task_vectors: TaskVectors,
    factors: Callable[[Tensor, Tensor, Tensor], Factors],
    *,
    rank: Rank,
    scaling: float,
    solver: Solver,
    weights: Sequence[float] | None,
) -> Tensor:
    """The pipeline shared by TSV-M and SFTM: matrices go through features -> factors, the rest is averaged."""
    check_rank(rank)
    check_scaling(scaling)
    check_choice("solver", solver, SOLVERS)
    check_weights(weights)
    deltas = stack_task_vectors(task_vectors, weights)
    if deltas.ndim != 3 or deltas.numel() == 0:  # an empty matrix has no features: its merge is empty too
        merged = deltas.mean(0)
    else:
        T, m, n = deltas.shape
        U, s, V = task_features(deltas, resolve_rank(rank, min(m, n), T), solver=solver)
        left, right = factors(U, s, V)
        merged = left @ right.mT
    return finite_as(scaling * merged, _dtype_of(task_vectors))


def tsv_m(
    task_vectors: TaskVectors,
    *,
    rank: Rank = None,
    scaling: float = 1.0,
    solver: Solver = "auto",
    weights: Sequence[float] | None = None,
) -> Tensor:
    """TSV-M, Task Singular Vectors Merge (Gargiulo et al., CVPR 2025, arXiv:2412.00081).

    For a matrix parameter: keep the top ``k`` singular triplets of each task matrix (``k = max(1, r // T)`` by
    default, ``rank`` an int or a fraction of ``r = min(m, n)``), concatenate them into ``U``, ``s``, ``V``, replace
    ``U`` and ``V`` by their polar factors and return ``scaling * U_perp diag(s) V_perp^T``. Other parameters
    (biases, norms, any tensor that is not 2-D) are averaged. See :func:`~lightning_merge.functional.svd.task_features`
    and :func:`~lightning_merge.functional.svd.orthogonalize` for the choices made on degenerate inputs.

    Example:
        >>> d = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5]))
        >>> tsv_m([d], rank=2)  # one task: its rank-2 truncation
        tensor([[3., 0., 0., 0.],
                [0., 2., 0., 0.],
                [0., 0., 0., 0.],
                [0., 0., 0., 0.]])
    """
    return _svd_merge(task_vectors, tsv_m_factors, rank=rank, scaling=scaling, solver=solver, weights=weights)


def sftm(
    task_vectors: TaskVectors,
    *,
    rank: Rank = None,
    scaling: float = 1.0,
    basis: Basis = "features",
    rcond: float | None = None,
    solver: Solver = "auto",
    weights: Sequence[float] | None = None,
    fit: Fit = "response",
) -> Tensor:
    """SFTM, Superpose Features from Task Matrix (Qiu, Wu, Yao, arXiv:2502.10698; EMNLP 2025).

    For a matrix parameter: keep the top ``k`` singular triplets ``(u_ti, s_ti, v_ti)`` of each task matrix (same
    budget as :func:`tsv_m`), and solve for ``M = sum alpha_ti u_ti v_ti^T`` such that ``u_ti^T M v_ti = s_ti`` for
    every kept feature: ``((U^T U) * (V^T V)) alpha = s``, minimum-norm least squares in float64 with eigenvalues
    below ``rcond * max`` cut (``None``: the inputs' round-off level). ``basis="orthogonal"`` (this project's
    extension) keeps the same constraints but superposes TSV-M's orthogonalized features. ``fit="mapping"``
    (METHODS.md's second reading) chooses the coefficients that preserve each kept feature's whole mapping in least
    squares, ``min sum ||M v_ti - s_ti u_ti||^2``, instead of only its own response (see :func:`sftm_factors`).
    Other parameters are averaged.

    Example:
        >>> d = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5]))
        >>> torch.allclose(sftm([d, d], rank=2), tsv_m([d], rank=2))  # identical tasks: one truncation, not two
        True
    """
    check_choice("basis", basis, ("features", "orthogonal"))
    check_choice("fit", fit, ("response", "mapping"))
    if rcond is not None:
        check_rcond(rcond)

    def factors(U: Tensor, s: Tensor, V: Tensor) -> Factors:
        return sftm_factors(U, s, V, basis=basis, rcond=rcond, fit=fit)

    return _svd_merge(task_vectors, factors, rank=rank, scaling=scaling, solver=solver, weights=weights)
