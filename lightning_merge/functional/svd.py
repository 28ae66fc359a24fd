"""Shared linear-algebra steps of the SVD-based merges: truncated SVD, task features, polar orthogonalization,
PSD solves and the STI diagnostic. Every merge method is a composition of these (METHODS.md)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_merge.functional._checks import check_choice, check_non_negative_int

Solver = Literal["auto", "exact", "randomized"]
SOLVERS = ("auto", "exact", "randomized")
log = logging.getLogger(__name__)


SEPARATION_TOL = 1e-4


def rank_tolerance(shape: Sequence[int], dtype: torch.dtype) -> float:
    """Relative size ``sqrt(max(m, n)) * eps`` at or below which a singular value of an ``m x n`` matrix (the last
    two entries of ``shape``) counts as numerically zero: ``s <= s_max * rank_tolerance(shape, dtype)``.

    **(choice)** One rule for the dense path (:func:`task_features`, and the ``"auto"`` solver's test of a rank
    below ``k``) and the factored LoRA path (:func:`~lightning_merge.functional.lora.lora_svd`), so both keep the
    same components of the same update. It is the dense path's documented rule (README), not ``max(m, n) * eps``
    (28x larger on a 768 x 768 layer): the round-off tail of an exactly rank-deficient matrix measures 1-2.5
    ``eps s_max`` up to 64 x 64 and 3-5 at 768 x 768 on the dense path, at most 1.5 on the factored one (thin QRs
    and an ``r x r`` SVD), below ``sqrt(max(m, n))`` in every case from ``max(m, n) >= 8`` on, so the tighter
    rule is safe on either path. On tiny matrices (``max(m, n) <= 5``) a round-off component of up to
    ``3 eps s_max`` may be kept.

    Example:
        >>> rank_tolerance((768, 768), torch.float32) == 768**0.5 * torch.finfo(torch.float32).eps
        True
    """
    return max(shape[-2:]) ** 0.5 * torch.finfo(dtype).eps


def numerically_nonzero(s: Tensor, shape: Sequence[int]) -> Tensor:
    """The mask of the singular values ``s`` (``(..., q)``, of ``m x n`` matrices) above :func:`rank_tolerance`
    relative to the largest of each row: ``s > s_max * sqrt(max(m, n)) * eps``. A zero matrix keeps nothing.

    Example:
        >>> numerically_nonzero(torch.tensor([[2.0, 1e-3, 1e-9]]), (4, 4))
        tensor([[ True,  True, False]])
    """
    if s.shape[-1] == 0:
        return s > 0
    return s > s.amax(dim=-1, keepdim=True) * rank_tolerance(shape, s.dtype)


def use_randomized(k: int, r: int, oversample: int = 10) -> bool:
    """The first half of the ``"auto"`` rule: try the randomized solver only when the sketch ``k + oversample`` is at
    most a quarter of ``r`` (there it is 5-7x faster than ``torch.linalg.svd``; above, the gain fades)."""
    return r >= 64 and 4 * (k + oversample) <= r


def svd_merge_cost(m: int, n: int, k: int, num_tasks: int, oversample: int = 10) -> float:
    """Estimated floating-point operations of TSV-M or SFTM on ``num_tasks`` ``m x n`` task matrices with ``k``
    features each (for balancing work across ranks; an estimate, not a measurement).

    Per task, the SVD the ``"auto"`` rule picks (:func:`use_randomized`): randomized, 6 products with the matrix
    (``2 niter + 2``, ``niter = 2``) of ``2 m n (k + oversample)`` each, or exact, ``4 m n r + 8 r^3`` with
    ``r = min(m, n)`` (the SVD's count), divided by :data:`GRAM_SPEEDUP` where :func:`exact_top_k` takes the Gram
    route (aspect at least :data:`GRAM_ASPECT`; **a choice**: the measured median speed-up, not a flop count, which
    would price the float64 Gram above the SVD that it beats). Then the factors step on ``F = T k`` features: Gram
    matrices and products, ``2 (m + n) F^2``, and the ``F x F`` eigendecompositions and solves, ``20 F^3``.

    Example:
        >>> svd_merge_cost(768, 768, 96, 8) > svd_merge_cost(768, 768, 96, 4)
        True
    """
    r = min(m, n)
    per_task: float
    if use_randomized(k, r, oversample):
        per_task = 6 * 2 * m * n * (k + oversample)
    else:
        per_task = 4 * m * n * r + 8 * r**3
        if max(m, n) >= GRAM_ASPECT * r:
            per_task /= GRAM_SPEEDUP
    features = num_tasks * k
    return float(num_tasks * per_task + 2 * (m + n) * features**2 + 20 * features**3)


def converged(S: Tensor, k: int, exponent: int, tol: float = SEPARATION_TOL, zero_tol: float = 0.0) -> bool:
    """The second half of the ``"auto"`` rule: is a sketch's top-``k`` subspace trustworthy?

    The error of a randomized top-``k`` subspace shrinks like ``(s_q / s_k) ** exponent`` (Halko, Martinsson, Tropp
    2011, Thm. 10.8; Saibaba 2019 for the angles), ``q = k + oversample``, read off the sketch's own singular values;
    ``exponent`` is the power of the spectral filter the sketch applied, ``2 * niter + 1`` for ``niter`` power
    iterations (one less than the number of products with the matrix). TSV-M gives every kept component full weight
    when it orthogonalizes, so a component near the cut-off that the sketch got wrong moves the merge a lot: on
    power-law spectra (``s_i ~ 1/i``) randomized and exact TSV-M differ by 27-59% even with 4 power iterations
    (ratio**5 about 0.5 there), while on low-rank-plus-noise matrices they agree to 1e-4 (ratio**2 below 1e-4). A
    task whose ``s_k`` is at most ``zero_tol * s_1`` has a numerical rank below ``k``: the sketch captured its whole
    range (for example a dense LoRA update of rank 16 with ``k = 256``).
    """
    kth, last = S[..., k - 1], S[..., -1]
    deficient = kth <= zero_tol * S[..., 0]
    ratio = torch.where(deficient, torch.zeros_like(kth), last / kth.clamp_min(torch.finfo(S.dtype).tiny))
    return bool((ratio**exponent <= tol).all())


def truncated_svd(
    matrices: Tensor,
    k: int,
    *,
    solver: Solver = "auto",
    oversample: int = 10,
    niter: int = 2,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` SVD of a matrix or a batch of matrices: ``matrices ~ U diag(S) V^T``.

    Args:
        matrices: ``(..., m, n)`` floating-point tensor; the SVD runs in its dtype and on its device.
        k: number of components to keep, ``1 <= k <= min(m, n)``.
        solver: ``"exact"`` (:func:`exact_top_k`: ``torch.linalg.svd``, or the float64 Gram route for tall and wide
            matrices where it is as accurate), ``"randomized"`` (Halko, Martinsson, Tropp 2011, Alg. 4.4:
            a Gaussian sketch with ``oversample`` extra columns and ``niter`` power iterations, ``2 niter + 2``
            products with the matrix), or ``"auto"``: the randomized solver where it is faster
            (:func:`use_randomized`) and its result provably close (:func:`converged`), else the exact one.
            ``"auto"`` tests the sketch after 3 products (spectral filter ``s**2``) and takes one more product at
            a time, up to those of ``niter`` power iterations, only while the test fails but could still pass: it
            accepts exactly the sketches that ``niter`` power iterations would, and stops early on the clearly
            separated spectra of real task matrices (3 products instead of 6, half the sketch's time). On a batch,
            the first matrix's sketch decides whether the others are sketched (:func:`_probed`).
        seed: seed of the randomized sketch; a private generator is used, so the result is deterministic and the
            global RNG is left alone.

    Returns:
        ``U`` ``(..., m, k)``, ``S`` ``(..., k)`` in descending order, ``V`` ``(..., n, k)``.

    Example:
        >>> x = torch.randn(5, 4, dtype=torch.float64)
        >>> U, S, V = truncated_svd(x, 4, solver="exact")
        >>> torch.allclose(U @ torch.diag(S) @ V.T, x)
        True
    """
    check_choice("solver", solver, SOLVERS)
    r = min(matrices.shape[-2:])
    if not 1 <= k <= r:
        raise ValueError(
            f"Expected argument `k` to be in [1, {r}] for matrices of shape {tuple(matrices.shape)}, but got {k}."
        )
    check_non_negative_int("niter", niter)
    if solver == "exact" or (solver == "auto" and not use_randomized(k, r, oversample)):
        return exact_top_k(matrices, k)
    zero_tol = rank_tolerance(matrices.shape, matrices.dtype)  # the numerical rank of task_features
    most = 2 * niter + 2

    def verdict(S: Tensor, passes: int) -> bool | None:  # accept, take another product, or give up
        if solver == "randomized" or converged(S, k, passes - 1, zero_tol=zero_tol):
            return True
        return False if passes < most and converged(S, k, most - 1, zero_tol=zero_tol) else None

    checks = [most] if solver == "randomized" else list(range(min(3, most), most + 1))
    q = min(k + oversample, r)
    if solver == "auto" and math.prod(matrices.shape[:-2]) > 1:
        return _probed(matrices, k, q, checks, verdict, seed)
    found = _randomized_svd(matrices, k, q, checks, verdict, seed)
    if found is None:
        log.debug("truncated_svd(k=%d) of %s: the sketch did not converge, exact SVD", k, tuple(matrices.shape))
        return exact_top_k(matrices, k)
    return found


#: The exact path takes the Gram route (:func:`gram_top_k`) for matrices whose long side is at least this many times
#: their short side (measured, benchmarks/README.md "bench_real.py"); squarer ones go to ``torch.linalg.svd``.
GRAM_ASPECT = 2.0
#: How much faster the Gram route is than ``torch.linalg.svd`` at aspect 2-8, for :func:`svd_merge_cost`: 1.4-2.7x
#: measured on 1536x384 to 3072x768 (benchmarks/README.md, "bench_real.py"); about the median.
GRAM_SPEEDUP = 1.8


def exact_top_k(x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The exact top-``k`` SVD of ``x`` (``(..., m, n)``), as :func:`truncated_svd` returns it.

    **(choice)** Tall or wide matrices (aspect at least :data:`GRAM_ASPECT`) go through :func:`gram_top_k` (the
    float64 Gram of the short side and a symmetric eigensolver, no SVD of the long side) when it is accurate;
    otherwise, and for squarer matrices, ``torch.linalg.svd``.
    """
    m, n = x.shape[-2:]
    if max(m, n) >= GRAM_ASPECT * min(m, n):
        found = gram_top_k(x, k)
        if found is not None:
            return found
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    return U[..., :k], S[..., :k], Vh[..., :k, :].mT


def gram_floor(shape: Sequence[int], dtype: torch.dtype) -> float:
    """The smallest ``(s_k / s_1)**2`` at which :func:`gram_top_k` keeps an ``m x n`` matrix of ``dtype`` (the last
    two entries of ``shape``): ``max(m, n) * eps64 / eps(dtype)``. At least 1 for float64 input (never kept).

    Example:
        >>> round(gram_floor((1536, 384), torch.float32) ** 0.5, 4)  # s_k above 0.17% of s_1
        0.0017
    """
    return max(shape[-2:]) * torch.finfo(torch.float64).eps / torch.finfo(dtype).eps


def gram_top_k(x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """Top-``k`` SVD of ``x`` (``(..., m, n)``) from the float64 Gram of its short side, or ``None`` where that is
    not accurate enough (the caller then takes the SVD).

    For ``m >= n`` (wide inputs are transposed): ``G = x^T x`` in float64 (products of float32 entries are exact
    there), ``G = V diag(s**2) V^T`` by ``torch.linalg.eigh`` (batched over the leading dimensions, one Gram at a
    time to bound memory), and ``U = x V diag(1/s)`` in float64; results in ``x``'s dtype.

    **Error bound.** The computed Gram and its eigendecomposition are backward stable in float64: each computed
    eigenvalue is within about ``c max(m, n) eps64 s_1**2`` of ``s_i**2``, so
    ``|s_i' - s_i| / s_i <~ c max(m, n) eps64 (s_1 / s_i)**2``: eigenvalues of the Gram lose relative accuracy below
    about ``sqrt(eps64) s_1``, and the singular vectors' angles grow by the same ``(s_1 / s_i)`` factor over the SVD's
    ``eps s_1 / gap``. Hence **(choice)** the result is kept only when every ``(s_k / s_1)**2`` is at least
    :func:`gram_floor` ``= max(m, n) eps64 / eps(dtype)``: then the relative error of every kept singular value is at
    most about ``eps(dtype)`` (the rounding of the input itself), ``U`` is orthonormal to about ``eps(dtype)``, and the
    vectors' angles are within the dtype's own SVD bound. For float32 that keeps ``s_k >= 0.17% s_1`` at 1536 x 384
    (the real fine-tunes of benchmarks/bench_real.py: 1-32% at k = 48 and 96); a zero, rank-deficient or
    ill-conditioned matrix, and any float64 input, returns ``None``.

    Example:
        >>> x = torch.randn(40, 8)
        >>> U, S, V = gram_top_k(x, 3)
        >>> torch.allclose(S, torch.linalg.svdvals(x)[:3], rtol=1e-5)
        True
    """
    if x.shape[-2] < x.shape[-1]:
        found = gram_top_k(x.mT, k)
        return None if found is None else (found[2], found[1], found[0])
    flat = x.reshape(-1, *x.shape[-2:])
    grams = torch.stack([gram(one) for one in flat])
    lam, Q = torch.linalg.eigh(grams)
    lam, Q = lam.flip(-1)[:, :k], Q.flip(-1)[:, :, :k]
    if not bool((lam[:, -1] >= gram_floor(x.shape, x.dtype) * lam[:, 0]).all()) or not bool((lam[:, -1] > 0).all()):
        return None
    s = lam.sqrt()
    U = torch.stack([one.to(torch.float64) @ q for one, q in zip(flat, Q, strict=True)]) / s.unsqueeze(-2)
    batch = x.shape[:-2]
    return (U.to(x.dtype).reshape(*batch, -1, k), s.to(x.dtype).reshape(*batch, k),
            Q.to(x.dtype).reshape(*batch, -1, k))


def _probed(
    x: Tensor, k: int, q: int, checks: list[int], verdict: Callable[[Tensor, int], bool | None], seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``"auto"`` on a batch of matrices (the ``T`` task matrices of one key): the sketch of the first one alone
    decides. **(choice)** If it does not converge, the exact path takes the whole batch, so a failed attempt costs
    ``1/T`` of a batched sketch (on real fine-tunes, whose spectra have no gap at ``k``, the sketch never converges:
    trying it on every task made ``"auto"`` slower than ``"exact"``); if it does, the others are sketched together
    and the key takes the exact path, the first task included, if they do not converge. **(choice)** Mixing one
    sketched task with exact ones saves ``1/T`` of the key's SVDs but leaves the sketch's error in the merge, and the
    merges that orthogonalize the concatenated features amplify it: on the real MiniLM fine-tunes the one kept
    sketch (the first task of the position embedding) moved TSV-M by 1.6e-4 and SFTM on the orthogonal basis by
    1.0e-3 against the exact merge. Deterministic: the decision reads only this key's data."""
    flat = x.reshape(-1, *x.shape[-2:])
    first = _randomized_svd(flat[:1], k, q, checks, verdict, seed)
    if first is None:
        log.debug("truncated_svd(k=%d) of %s: the first sketch did not converge, exact SVD", k, tuple(x.shape))
        return exact_top_k(x, k)
    rest = _randomized_svd(flat[1:], k, q, checks, verdict, seed)
    if rest is None:
        log.debug("truncated_svd(k=%d) of %s: the other sketches did not converge, exact SVD", k, tuple(x.shape))
        return exact_top_k(x, k)
    U, S, V = (torch.cat(pair).reshape(*x.shape[:-2], *pair[0].shape[1:]) for pair in zip(first, rest, strict=True))
    return U, S, V


def _randomized_svd(
    x: Tensor, k: int, q: int, checks: list[int], verdict: Callable[[Tensor, int], bool | None], seed: int
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Randomized SVD counted in products with ``x`` (Halko et al. 2011, Alg. 4.4 and 5.1, alternating sides).

    For tall ``x`` (``m >= n``; wide inputs are transposed): product 1 is ``x^T Omega`` with a Gaussian ``m x q``
    ``Omega``, then ``x P``, ``x^T Q``, ... each on an orthonormal basis of the previous product; the spectral filter
    after ``p`` products is ``s**(p - 1)``. After an odd number of products the approximation is ``Q Q^T x = Q Z^T``
    (``Z = x^T Q`` just computed), after an even number ``x P P^T = Y P^T`` (``Y = x P``); either way the SVD is
    that of a ``q x q`` triangular factor, with no extra product ``Q^T x`` (Halko's Alg. 5.1 needs one more). The
    first test comes after 3 products (``Q Q^T x``, filter ``s**2``), where the QR that feeds the SVD is of the
    short ``n x q`` side. Bases between the tests are Cholesky QRs (float64 Gram; a Householder QR where that Gram
    is numerically singular); bases that enter the result are Householder QRs. ``verdict(S, products)`` accepts
    (``True``), asks for another product (``False``) or gives up (``None``, the caller then takes the exact SVD).
    Written out rather than ``torch.svd_lowrank`` because that one draws from the global RNG: merges must be
    reproducible across ranks and resumed runs without touching the user's random state.
    """
    if x.shape[-2] < x.shape[-1]:
        found = _randomized_svd(x.mT, k, q, checks, verdict, seed)
        return None if found is None else (found[2], found[1], found[0])
    gen = torch.Generator(device=x.device).manual_seed(seed)
    omega = torch.randn(*x.shape[:-2], x.shape[-2], q, generator=gen, dtype=x.dtype, device=x.device)
    product, basis = x.mT @ omega, None  # after an odd number of products: x^T (basis of the long side)
    for passes in range(1, checks[-1] + 1):
        odd = passes % 2 == 1
        if passes in checks:
            Qp, Rp = torch.linalg.qr(product)
            W, S, Hh = torch.linalg.svd(Rp.mT if odd else Rp)
            accept = verdict(S, passes)
            log.debug("randomized SVD of %s: %d products, accepted: %s", tuple(x.shape), passes, accept)
            if accept is None:
                return None
            if accept:
                W, Hh, S = W[..., :k], Hh.mT[..., :k], S[..., :k]
                if odd:  # basis Z^T = basis Rp^T Qp^T = (basis W) S (Qp Hh^T)^T
                    return basis @ W, S, Qp @ Hh
                return Qp @ W, S, basis @ Hh  # Y P^T = Qp Rp P^T = (Qp W) S (P Hh^T)^T
        if passes == checks[-1]:
            break
        basis = Qp if passes in checks else _basis(product, householder=passes + 1 in checks)
        product = x @ basis if odd else x.mT @ basis
    return None


def _basis(y: Tensor, householder: bool) -> Tensor:
    # An orthonormal basis of range(y): Householder QR, or a Cholesky QR (float64 Gram, about a third of the time on
    # these tall-skinny blocks, orthonormal to about eps * cond(y)), with Householder where the Gram is singular.
    if not householder:
        R, info = torch.linalg.cholesky_ex(gram(y), upper=True)
        if not bool(info.any()):
            return torch.linalg.solve_triangular(R.to(y.dtype), y, upper=True, left=False)
    return torch.linalg.qr(y).Q


def task_features(
    deltas: Tensor, k: int, *, solver: Solver = "auto", oversample: int = 10, niter: int = 2
) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenated top-``k`` singular features of ``T`` task matrices (METHODS.md, TSV-M steps 1-2).

    Args:
        deltas: ``(T, m, n)`` task matrices.

    Returns:
        ``U`` ``(m, F)``, ``s`` ``(F,)``, ``V`` ``(n, F)`` with ``F <= T * k``, task by task. Components that are
        numerically zero (``s <= s_max * sqrt(max(m, n)) * eps``, :func:`rank_tolerance`, the rule of the factored
        LoRA path too; the round-off tail of an exactly rank-deficient matrix measures about ``5 * eps * s_max``
        with either solver) are dropped **(choice)**: their singular vectors are arbitrary and would otherwise
        steer the orthogonalization of the other tasks' features; for a zero task matrix nothing is kept. Genuine
        small components, noise included, are kept as METHODS.md says.
    """
    U, S, V = truncated_svd(deltas, k, solver=solver, oversample=oversample, niter=niter)
    keep = numerically_nonzero(S, deltas.shape).flatten()
    T, m, n = deltas.shape
    U = U.transpose(0, 1).reshape(m, T * k)[:, keep]
    V = V.transpose(0, 1).reshape(n, T * k)[:, keep]
    return U, S.flatten()[keep], V


def gram(x: Tensor) -> Tensor:
    """``x^T x`` in float64 (the Gram matrices are small; float64 keeps their small eigenvalues meaningful)."""
    x = x.to(torch.float64)
    return x.mT @ x


def _psd_tolerance(g: Tensor, source_dtype: torch.dtype, rows: int) -> float:
    # Eigenvalues of the float64 Gram of a `source_dtype` matrix below this fraction of the largest are noise:
    # round-off of the source entries squared, or of the float64 eigensolver, whichever is larger.
    eps = torch.finfo(source_dtype).eps
    return max(10 * max(rows, g.shape[-1]) * eps**2, g.shape[-1] * torch.finfo(torch.float64).eps)


def _gram_eigh(x: Tensor) -> tuple[Tensor, Tensor]:
    # Eigenpairs of the float64 Gram of x, with eigenvalues at round-off level set to exactly zero.
    g = gram(x)
    lam, Q = torch.linalg.eigh(g)
    keep = lam > _psd_tolerance(g, x.dtype, x.shape[0]) * lam[-1:].clamp_min(torch.finfo(lam.dtype).tiny)
    return torch.where(keep, lam, 0.0), Q


def _psd_power(lam: Tensor, Q: Tensor, power: float) -> Tensor:
    # Q diag(lam^power) Q^T on the kept eigenvalues (pseudo-inverse for negative powers).
    scaled = torch.where(lam > 0, lam.clamp_min(torch.finfo(lam.dtype).tiny) ** power, 0.0)
    return (Q * scaled) @ Q.mT


def gram_roots(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(G^{1/2}, G^{+1/2})`` of the float64 Gram ``G = x^T x``; eigenvalues at round-off level count as zero."""
    lam, Q = _gram_eigh(x)
    return _psd_power(lam, Q, 0.5), _psd_power(lam, Q, -0.5)


def orthogonalize(x: Tensor) -> Tensor:
    """Polar factor of ``x``: the matrix with orthonormal columns closest to it (Procrustes), ``x (x^T x)^{+1/2}``.

    Computed from the Gram matrix (an ``F x F`` eigendecomposition, cheaper than the SVD of ``x``), in float64 by
    default. **(choice)** A tall float32 ``x`` (at least twice as many rows as columns, like the concatenated
    ``U`` of a 3072 x 768 layer) whose Gram is well-conditioned (``lambda_min >= 1e-2 lambda_max``) is done in
    float32: the relative error of ``G^{-1/2}`` is then about ``eps32 * cond(G)`` (below 1e-5), and the float32
    eigendecomposition takes half the time. A Cholesky of ``G - 1e-2 lambda_max I`` screens the Gram first, so an
    ill-conditioned one costs a float32 Gram and a Cholesky (a tenth of the eigendecomposition) before the float64
    path. On rank-deficient ``x`` (for example identical tasks) the pseudo-inverse root gives the minimum-norm
    polar factor, zero on the null space, instead of an arbitrary completion.

    Example:
        >>> x = torch.randn(6, 3, dtype=torch.float64)
        >>> q = orthogonalize(x)
        >>> torch.allclose(q.T @ q, torch.eye(3, dtype=torch.float64))
        True
    """
    if x.dtype == torch.float32 and x.shape[-2] >= 2 * x.shape[-1]:
        fast = _well_conditioned_polar(x, WELL_CONDITIONED)
        if fast is not None:
            return fast
    # the product in float64 too: in float32, x @ G^{-1/2} would lose about eps32 * cond(x) to cancellation
    return (x.to(torch.float64) @ _psd_power(*_gram_eigh(x), -0.5)).to(x.dtype)


WELL_CONDITIONED = 1e-2


def _well_conditioned_polar(x: Tensor, floor: float) -> Tensor | None:
    # x (x^T x)^{-1/2} in x's dtype when every Gram eigenvalue is at least floor * the largest, else None.
    g = x.mT @ x
    v = torch.ones(*g.shape[:-1], 1, dtype=g.dtype, device=g.device)
    for _ in range(8):  # power iteration: a lower estimate of lambda_max, enough to screen
        v = g @ v
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
    top = (v.mT @ g @ v)[..., 0, 0]
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    if bool(torch.linalg.cholesky_ex(g - (floor * top)[..., None, None] * eye).info.any()):
        return None
    lam, Q = torch.linalg.eigh(g)
    if not bool((lam[..., :1] >= floor * lam[..., -1:]).all()):
        return None
    return x @ ((Q * lam.rsqrt().unsqueeze(-2)) @ Q.mT)


def psd_solve(a: Tensor, b: Tensor, rcond: float | None, source_dtype: torch.dtype, rows: int) -> Tensor:
    """Minimum-norm least-squares solution of ``a x = b`` for symmetric PSD ``a`` (float64).

    ``rcond``: eigenvalues of ``a`` at most ``rcond * max`` are treated as zero; ``None`` picks the round-off
    level of the inputs (see :func:`orthogonalize`).
    """
    rtol = _psd_tolerance(a, source_dtype, rows) if rcond is None else rcond
    return torch.linalg.pinv(a, rtol=rtol, hermitian=True) @ b.to(a.dtype)


def sti(U: Tensor, s: Tensor, V: Tensor) -> Tensor:
    """Singular Task Interference (Gargiulo et al., CVPR 2025, eq. 5) of concatenated features of one layer:

    ``STI = sum_ij |(U^T U - I) diag(s) (V^T V - I)|_ij``. Zero when the tasks' features are mutually orthogonal.

    Example:
        >>> e = torch.eye(4, dtype=torch.float64)
        >>> float(sti(e[:, :2], torch.ones(2, dtype=torch.float64), e[:, :2]))
        0.0
    """
    eye = torch.eye(U.shape[-1], dtype=torch.float64, device=U.device)
    return (((gram(U) - eye) * s.to(torch.float64)) @ (gram(V) - eye)).abs().sum()
