"""The merge core against naive float64 references (tests/reference.py) and the properties of METHODS.md."""

import math

import numpy as np
import pytest
import torch

from lightning_merge import functional as F
from lightning_merge.functional import _checks, merges, svd
from tests import reference as ref

f64 = torch.float64


def low_rank_tasks(T, m, n, rank=6, noise=1e-3, dtype=f64, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(T):
        a = torch.randn(m, rank, generator=g, dtype=f64)
        b = torch.randn(rank, n, generator=g, dtype=f64)
        out.append((a @ b + noise * torch.randn(m, n, generator=g, dtype=f64)).to(dtype))
    return out


def trunc(d, k):
    u, s, vh = torch.linalg.svd(d.to(f64), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def orthogonal_tasks(T, k, m, n):
    """T task matrices of rank k whose singular vectors are mutually orthogonal across tasks (in U and V)."""
    qu, _ = torch.linalg.qr(torch.randn(m, T * k, dtype=f64))
    qv, _ = torch.linalg.qr(torch.randn(n, T * k, dtype=f64))
    s = torch.rand(T * k, dtype=f64) + 0.5
    return [(qu[:, t * k:(t + 1) * k] * s[t * k:(t + 1) * k]) @ qv[:, t * k:(t + 1) * k].T for t in range(T)]


def rel(a, b):
    a, b = torch.as_tensor(a, dtype=f64), torch.as_tensor(b, dtype=f64)
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------- references
@pytest.mark.parametrize(("T", "m", "n"), [(3, 20, 12), (4, 9, 16), (2, 8, 8)])
def test_tsv_m_matches_naive_reference(T, m, n):
    deltas = [torch.randn(m, n, dtype=f64) for _ in range(T)]
    k = min(m, n) // T
    expected = ref.tsv_m([d.numpy() for d in deltas], k)
    assert rel(F.tsv_m(deltas, solver="exact"), expected) < 1e-10


@pytest.mark.parametrize("basis", ["features", "orthogonal"])
@pytest.mark.parametrize(("T", "m", "n"), [(3, 20, 12), (4, 9, 16)])
def test_sftm_matches_naive_reference(T, m, n, basis):
    deltas = [torch.randn(m, n, dtype=f64) for _ in range(T)]
    k = min(m, n) // T
    expected, *_ = ref.sftm([d.numpy() for d in deltas], k, basis)
    assert rel(F.sftm(deltas, solver="exact", basis=basis), expected) < 1e-9


@pytest.mark.parametrize("basis", ["features", "orthogonal"])
@pytest.mark.parametrize(("T", "m", "n"), [(3, 20, 12), (4, 9, 16), (2, 30, 30)])
def test_sftm_mapping_fit_matches_plain_least_squares(T, m, n, basis):
    deltas = [d.numpy() for d in low_rank_tasks(T, m, n, rank=4, noise=0.05, seed=T + m)]
    k = min(m, n) // T
    expected, *_ = ref.sftm_mapping(deltas, k, basis)
    merged = F.sftm([torch.from_numpy(d) for d in deltas], solver="exact", basis=basis, fit="mapping")
    assert rel(merged, expected) < 1e-8


@pytest.mark.parametrize("basis", ["features", "orthogonal"])
@pytest.mark.parametrize("seed", range(4))
def test_sftm_mapping_residual_is_never_above_the_response_fits(basis, seed):
    deltas = [d.numpy() for d in low_rank_tasks(4, 24, 18, rank=5, noise=0.1, seed=seed)]
    k = 18 // 4
    _, u, s, v = ref.sftm(deltas, k, basis)
    tensors = [torch.from_numpy(d) for d in deltas]
    response = F.sftm(tensors, solver="exact", basis=basis).numpy()
    mapping = F.sftm(tensors, solver="exact", basis=basis, fit="mapping").numpy()
    r_response, r_mapping = ref.mapping_residual(response, u, s, v), ref.mapping_residual(mapping, u, s, v)
    assert r_mapping <= r_response * (1 + 1e-9)
    assert r_mapping < 0.99 * r_response  # overlapping tasks: the two readings differ, the fit is strictly better


@pytest.mark.parametrize("basis", ["features", "orthogonal"])
def test_sftm_mapping_fit_keeps_the_properties_of_methods_md(basis):
    T, k = 3, 2
    orthogonal = orthogonal_tasks(T, k, 20, 15)
    assert rel(F.sftm(orthogonal, rank=k, solver="exact", basis=basis, fit="mapping"), sum(orthogonal)) < 1e-10
    d = low_rank_tasks(1, 16, 12, rank=6, noise=0.1)[0]
    assert rel(F.sftm([d], rank=3, solver="exact", basis=basis, fit="mapping"), trunc(d, 3)) < 1e-10
    identical = F.sftm([d] * 4, rank=3, solver="exact", basis=basis, fit="mapping")
    assert rel(identical, trunc(d, 3)) < 1e-8  # one truncation, not four (the minimum-norm split)


@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
def test_ties_matches_naive_reference(density):
    deltas = [torch.randn(7, 5, dtype=f64) for _ in range(4)]
    expected = ref.ties([d.numpy() for d in deltas], density).reshape(7, 5)
    assert np.allclose(F.ties(deltas, density=density).numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("density", [0.1, 0.37, 0.5, 0.9])
def test_ties_breaks_ties_at_the_cut_off_in_index_order_across_chunks(monkeypatch, dtype, density):
    # integer-valued task vectors tie everywhere (as bf16 ones do); chunks of 7 entries split runs of equal
    # magnitudes, so the count of cut-off entries still to keep must carry from chunk to chunk
    monkeypatch.setattr(merges, "TIES_CHUNK", 7)
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randint(-3, 4, (13, 11), generator=g).to(dtype) for _ in range(3)]
    expected = ref.ties([d.double().numpy() for d in deltas], density).reshape(13, 11)  # stable sort: first kept
    # the float32 mean of small integers is the correctly rounded quotient, then rounded once to the input dtype
    want = torch.from_numpy(expected).to(torch.float32 if dtype != torch.float64 else dtype).to(dtype)
    assert torch.equal(F.ties(deltas, density=density), want)
    trimmed = F.trim_magnitude(torch.stack(deltas).double(), density)
    assert ((trimmed != 0).sum((1, 2)) <= math.ceil(density * 143)).all()
    for t, d in enumerate(deltas):  # exactly the reference's kept entries
        order = np.argsort(-np.abs(d.double().numpy().ravel()), kind="stable")[: math.ceil(density * 143)]
        want = np.zeros(143)
        want[order] = d.double().numpy().ravel()[order]
        np.testing.assert_array_equal(trimmed[t].numpy().ravel(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_cut_off_is_exact_on_spread_magnitudes(monkeypatch, dtype):
    # magnitudes over many binades (the radix select's passes see different high bits), zeros, a 0-d parameter
    monkeypatch.setattr(merges, "TIES_CHUNK", 1000)
    g = torch.Generator().manual_seed(4)
    deltas = [torch.randn(3001, generator=g, dtype=dtype) * torch.logspace(-30, 30, 3001, dtype=dtype)
              for _ in range(4)]
    deltas[1][::3] = 0
    stacked = torch.stack(deltas)
    for density in (1e-3, 0.2, 0.999):
        keep = math.ceil(density * 3001)
        trimmed = F.trim_magnitude(stacked, density)
        for t, d in enumerate(deltas):  # the kept entries, exactly: the cut-off is the keep-th largest magnitude
            order = np.argsort(-np.abs(d.numpy()), kind="stable")[:keep]
            want = np.zeros(3001, dtype=d.numpy().dtype)
            want[order] = d.numpy()[order]
            np.testing.assert_array_equal(trimmed[t].numpy(), want)
        expected = ref.ties([d.numpy() for d in deltas], density)
        np.testing.assert_allclose(F.ties(deltas, density=density).numpy(), expected, rtol=1e-6, atol=0)
    scalar = [torch.tensor(2.0), torch.tensor(-1.0)]
    assert float(F.ties(scalar, density=0.5)) == 2.0


def test_average_and_task_arithmetic():
    deltas = [torch.randn(5, 3, dtype=f64) for _ in range(3)]
    total = deltas[0] + deltas[1] + deltas[2]
    assert torch.allclose(F.average(deltas), total / 3)
    assert torch.allclose(F.task_arithmetic(deltas, scaling=0.3), 0.3 * total)
    assert torch.allclose(F.average(deltas, scaling=2.0, weights=[1, 0, 0]), 2 * deltas[0] / 3)


@pytest.mark.parametrize("block_bytes", [256, 768, 4096, 2**30])
def test_sum_of_differences_blocks_match_float64_and_each_other(monkeypatch, block_bytes):
    from lightning_merge.functional import merges

    g = torch.Generator().manual_seed(0)
    base = torch.randn(96, 40, generator=g)  # 3840 floats: blocks of 64, 192 and 1024 floats, the last one partial
    tuned = [base + 1e-2 * torch.randn(base.shape, generator=g) for _ in range(4)]
    weights, scaling = [0.3, 1.7, -0.2, 2.5], 0.37
    differences = [t.double() - base.double() for t in tuned]
    expected = base.double() + scaling * sum(w * d for w, d in zip(weights, differences, strict=True))
    whole = F.sum_of_differences(base, tuned, weights, scaling=scaling, add_base=True)  # one block
    monkeypatch.setattr(merges, "BLOCK_BYTES", block_bytes)
    blocked = F.sum_of_differences(base, tuned, weights, scaling=scaling, add_base=True)
    assert torch.allclose(blocked.double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(blocked, whole)  # the same operations per element, in the same order
    delta = F.sum_of_differences(base, tuned, weights, scaling=scaling)
    assert torch.allclose(delta.double(), expected - base.double(), rtol=0, atol=1e-7)


def test_sum_of_differences_names_a_non_finite_task_in_a_late_block(monkeypatch):
    from lightning_merge.functional import merges

    monkeypatch.setattr(merges, "BLOCK_BYTES", 64)
    base = torch.zeros(10, 10)
    tuned = [base + 1, base + 2, base.clone()]
    tuned[2][-1, -1] = float("inf")
    with pytest.raises(ValueError, match=r"`task_vectors\[2\]` contain NaN or Inf"):
        F.sum_of_differences(base, tuned)
    assert torch.equal(F.sum_of_differences(base, [], scaling=2.0, add_base=True), base)


def test_sti_matches_naive_reference():
    u, s, v = torch.randn(10, 6, dtype=f64), torch.rand(6, dtype=f64), torch.randn(8, 6, dtype=f64)
    assert abs(float(F.sti(u, s, v)) - ref.sti(u.numpy(), s.numpy(), v.numpy())) < 1e-9


# ---------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("merge", [F.tsv_m, F.sftm])
@pytest.mark.parametrize("rank", [None, 3, 0.5])
def test_one_task_gives_rank_k_truncation(merge, rank):
    d = torch.randn(12, 10, dtype=f64)
    k = {None: 10, 3: 3, 0.5: 5}[rank]
    assert rel(merge([d], rank=rank, solver="exact"), trunc(d, k)) < 1e-10


@pytest.mark.parametrize("basis", ["features", "orthogonal"])
@pytest.mark.parametrize("T", [2, 5])
def test_identical_tasks_give_one_truncation_not_T(T, basis):
    d = torch.randn(16, 12, dtype=f64)
    k = 12 // T
    assert rel(F.sftm([d] * T, solver="exact", basis=basis), trunc(d, k)) < 1e-8
    assert rel(F.tsv_m([d] * T, solver="exact"), trunc(d, k)) < 1e-8  # minimum-norm polar factor (our choice)


@pytest.mark.parametrize("basis", ["features", "orthogonal"])
def test_orthogonal_tasks_give_sum_of_truncations(basis):
    T, k = 3, 2
    deltas = orthogonal_tasks(T, k, 20, 15)
    expected = sum(deltas)
    for merged in (F.tsv_m(deltas, rank=k, solver="exact"), F.sftm(deltas, rank=k, solver="exact", basis=basis)):
        assert rel(merged, expected) < 1e-10
    U, s, V = F.task_features(torch.stack(deltas), k, solver="exact")
    assert float(F.sti(U, s, V)) < 1e-10


def test_orthogonalized_bases_have_orthonormal_columns():
    deltas = torch.stack(low_rank_tasks(4, 30, 24, noise=0.1))
    U, s, V = F.task_features(deltas, 6, solver="exact")
    for x in (U, V):
        q = F.orthogonalize(x)
        assert torch.allclose(q.T @ q, torch.eye(x.shape[1], dtype=f64), atol=1e-10)
        assert float(F.sti(U, s, V)) > 0  # the raw bases do interfere


@pytest.mark.parametrize("conditioning", ["well", "ill"])
def test_float32_polar_factor_of_tall_matrices_matches_float64_reference(conditioning):
    # Tall float32 inputs with a well-conditioned Gram take the float32 eigendecomposition; an ill-conditioned
    # one (two nearly parallel columns) must be screened out and take the float64 path: both match the float64
    # SVD-based polar factor of the same float32 numbers.
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.linalg.qr(torch.randn(600, 25, generator=g)).Q for _ in range(4)], 1)
    if conditioning == "ill":
        x[:, 1] = x[:, 0] + 1e-4 * x[:, 1]
    reference = ref.polar_svd(x.to(f64))
    q = F.orthogonalize(x)
    assert q.dtype == torch.float32
    assert rel(q, reference) < 1e-5
    assert float((q.to(f64).T @ q.to(f64) - torch.eye(100, dtype=f64)).abs().max()) < 1e-5
    from lightning_merge.functional.svd import WELL_CONDITIONED, _well_conditioned_polar

    assert (_well_conditioned_polar(x, WELL_CONDITIONED) is None) == (conditioning == "ill")


@pytest.mark.parametrize("T", [2, 4])
def test_sftm_constraint_residual_is_round_off(T):
    deltas = [torch.randn(24, 20, dtype=f64) for _ in range(T)]
    U, s, V = F.task_features(torch.stack(deltas), 20 // T, solver="exact")
    merged = F.sftm(deltas, solver="exact")
    residual = torch.einsum("mf,mn,nf->f", U, merged, V) - s
    assert float(residual.abs().max()) < 1e-10 * float(s.max())


def test_ties_density_one_single_task_is_task_arithmetic():
    d = torch.randn(6, 4, dtype=f64)
    assert torch.allclose(F.ties([d], density=1.0), F.task_arithmetic([d], scaling=1.0))


@pytest.mark.parametrize("merge", [F.ties, F.task_arithmetic, F.average])
def test_weights_one_minus_one_cancel(merge):
    d = torch.randn(6, 4, dtype=f64)
    assert torch.count_nonzero(merge([d, d], weights=[1.0, -1.0])) == 0


def test_scaling_is_linear():
    deltas = [torch.randn(9, 7, dtype=f64) for _ in range(3)]
    for merge in (F.tsv_m, F.sftm, F.ties):
        assert torch.allclose(merge(deltas, scaling=0.4), 0.4 * merge(deltas, scaling=1.0))


def test_non_matrix_parameters_are_averaged_by_svd_methods():
    biases = [torch.randn(7, dtype=f64) for _ in range(3)]
    conv = [torch.randn(4, 3, 2, 2, dtype=f64) for _ in range(3)]
    for merge in (F.tsv_m, F.sftm):
        assert torch.allclose(merge(biases), sum(biases) / 3)
        assert torch.allclose(merge(conv), sum(conv) / 3)


def test_rank_smaller_than_tasks_keeps_one_component():
    deltas = [torch.randn(3, 5, dtype=f64) for _ in range(5)]  # r = 3 < T = 5
    merged = F.tsv_m(deltas, solver="exact")
    assert torch.isfinite(merged).all() and merged.norm() > 0


def test_zero_task_matrix_contributes_nothing():
    d = torch.randn(10, 8, dtype=f64)
    zero = torch.zeros_like(d)
    assert rel(F.tsv_m([d, zero], solver="exact"), trunc(d, 4)) < 1e-10
    assert rel(F.sftm([d, zero], solver="exact"), trunc(d, 4)) < 1e-10
    assert torch.count_nonzero(F.tsv_m([zero, zero])) == 0


def test_stacked_tensor_input_equals_sequence():
    deltas = [torch.randn(8, 6, dtype=f64) for _ in range(2)]
    assert torch.equal(F.tsv_m(torch.stack(deltas)), F.tsv_m(deltas))


def test_inputs_are_not_modified():
    deltas = [torch.randn(8, 6) for _ in range(3)]
    copies = [d.clone() for d in deltas]
    for merge in (F.tsv_m, F.sftm, F.ties, F.average, F.task_arithmetic):
        merge(deltas)
    assert all(torch.equal(a, b) for a, b in zip(deltas, copies, strict=True))


# ---------------------------------------------------------------------------------------------- solvers, dtypes
def test_randomized_solver_agrees_with_exact_on_low_rank_plus_noise():
    # kept rank = effective rank: the kept components are signal (see benchmarks/bench_core.py for the other case)
    deltas = low_rank_tasks(4, 300, 200, rank=8, noise=1e-3, dtype=torch.float32)
    for merge in (F.tsv_m, F.sftm):
        exact = merge(deltas, rank=8, solver="exact")
        fast = merge(deltas, rank=8, solver="randomized")
        assert rel(fast, exact) < 1e-3


def test_rank_deficient_tasks_drop_round_off_components_only():
    rank_one = torch.outer(torch.randn(40), torch.randn(30))
    U, s, V = F.task_features(torch.stack([rank_one, rank_one.T.contiguous().T * 2]), 10, solver="exact")
    assert s.numel() == 2  # two rank-1 tasks: the other 18 singular values are round-off
    small = torch.diag(torch.tensor([1.0, 1e-4, 0.0]))  # a genuine 1e-4 component is kept
    assert F.task_features(small[None], 3, solver="exact")[1].numel() == 2


def test_one_numerical_rank_tolerance_per_matrix_shape():
    eps = torch.finfo(torch.float32).eps
    assert svd.rank_tolerance((768, 768), torch.float32) == 768**0.5 * eps  # 28x below 768 * eps
    assert svd.rank_tolerance((8, 3072, 768), torch.float64) == 3072**0.5 * torch.finfo(torch.float64).eps
    s = torch.tensor([[2.0, 2.0 * 20 * eps, 2.0 * 30 * eps], [0.0, 0.0, 0.0]])
    mask = svd.numerically_nonzero(s, (768, 768))
    assert mask.tolist() == [[True, False, True], [False, False, False]]  # 20 eps <= 27.7 eps < 30 eps; zero: none
    assert svd.numerically_nonzero(torch.empty(3, 0), (4, 4)).shape == (3, 0)


def test_svd_merge_cost_follows_the_solver_rule():
    # randomized: 6 products of 2 m n (k + 10) flops; exact: 4 m n r + 8 r^3; then 2 (m + n) F^2 + 20 F^3, F = T k
    m = n = 768
    F_ = 8 * 96
    assert svd.svd_merge_cost(m, n, 96, 8) == 8 * 12 * m * n * 106 + 2 * (m + n) * F_**2 + 20 * F_**3
    F_ = 2 * 384
    assert svd.svd_merge_cost(m, n, 384, 2) == 2 * (4 * m * n * 768 + 8 * 768**3) + 2 * (m + n) * F_**2 + 20 * F_**3
    assert isinstance(svd.svd_merge_cost(4, 4, 1, 1), float)
    # tall and wide matrices take the Gram route when exact: the SVD's count over the measured speed-up
    m, n, F_ = 3072, 768, 2 * 384
    exact = (4 * m * n * 768 + 8 * 768**3) / svd.GRAM_SPEEDUP
    assert svd.svd_merge_cost(m, n, 384, 2) == svd.svd_merge_cost(n, m, 384, 2) == pytest.approx(
        2 * exact + 2 * (m + n) * F_**2 + 20 * F_**3, rel=1e-12)
    assert svd.svd_merge_cost(1535, 768, 384, 2) > svd.svd_merge_cost(1536, 768, 384, 2)  # aspect 2: the Gram


def test_truncated_svd_solvers_and_determinism():
    x = torch.stack(low_rank_tasks(3, 80, 60, rank=5, noise=0.0))
    U, S, V = F.truncated_svd(x, 5, solver="exact")
    assert torch.allclose(U @ torch.diag_embed(S) @ V.mT, x, atol=1e-9)
    state = torch.get_rng_state()
    a = F.truncated_svd(x, 5, solver="randomized")
    b = F.truncated_svd(x, 5, solver="randomized")
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert torch.allclose(a[1], S, rtol=1e-8)
    wide = F.truncated_svd(x.mT, 5, solver="randomized")
    assert torch.allclose(wide[1], S, rtol=1e-8) and wide[0].shape == (3, 60, 5)


def power_law_tasks(T, m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    out = []
    for _ in range(T):
        u = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
        v = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
        out.append((u / torch.arange(1, r + 1)) @ v.T)
    return torch.stack(out)


def test_auto_falls_back_to_exact_when_the_sketch_has_not_converged():
    slow = power_law_tasks(3, 256, 256)  # s_i ~ 1/i: no gap at k, the sketch is unreliable there
    k = 20
    assert F.use_randomized(k, 256)
    auto, exact = F.truncated_svd(slow, k, solver="auto"), F.truncated_svd(slow, k, solver="exact")
    assert all(torch.equal(a, b) for a, b in zip(auto, exact, strict=True))
    fast = torch.stack(low_rank_tasks(3, 256, 256, rank=k, noise=1e-4, dtype=torch.float32))  # a wide gap at k
    auto, exact = F.truncated_svd(fast, k, solver="auto"), F.truncated_svd(fast, k, solver="exact")
    assert not torch.equal(auto[1], exact[1])  # the sketch was kept ...
    assert torch.allclose(auto[1], exact[1], rtol=1e-4)  # ... and it is accurate


def test_auto_keeps_the_sketch_of_rank_deficient_tasks():
    g = torch.Generator().manual_seed(3)
    low = torch.stack([torch.randn(300, 8, generator=g) @ torch.randn(8, 200, generator=g) for _ in range(2)])
    auto, exact = F.truncated_svd(low, 40, solver="auto"), F.truncated_svd(low, 40, solver="exact")
    assert not torch.equal(auto[1], exact[1])  # rank 8 < k = 40: the round-off tail does not force the exact SVD
    assert torch.allclose(auto[1][:, :8], exact[1][:, :8], rtol=1e-4)


def gapped_tasks(T, n, k, ratio, seed=0):
    """T square tasks: k signal components (1 down to 0.03), plus noise whose largest singular value is
    ratio * s_k, so the sketch's separation s_q / s_k is about ``ratio``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(T):
        u, v = (torch.linalg.qr(torch.randn(n, k, generator=g, dtype=f64)).Q for _ in range(2))
        s = torch.logspace(0, -1.5, k, dtype=f64)
        noise = torch.randn(n, n, generator=g, dtype=f64)
        out.append((u * s) @ v.T + noise * (ratio * s[-1] / torch.linalg.matrix_norm(noise, ord=2)))
    return torch.stack(out).float()


def products_taken(caplog):
    accepted = [r.args[1] for r in caplog.records if r.msg.startswith("randomized SVD") and r.args[2] is True]
    return accepted[0] if accepted else None


@pytest.mark.parametrize("ratio", [0.005, 0.02, 0.05, 0.1, 0.2, 0.4])
def test_auto_tsv_m_stays_within_1e_3_of_exact_across_spectral_gaps(ratio, caplog):
    # The guard's promise, measured on the method it protects: whatever auto keeps, TSV-M (the most sensitive
    # merge: its polar step weights every kept component fully) moves by less than 1e-3.
    deltas = gapped_tasks(8, 256, 32, ratio)  # k = r / T = 32
    with caplog.at_level("DEBUG", logger="lightning_merge.functional.svd"):
        auto = F.tsv_m(deltas, solver="auto")
    assert rel(auto, F.tsv_m(deltas, solver="exact")) < 1e-3
    if ratio <= 0.005:  # a clear gap: accepted after 3 products, the cheapest test
        assert products_taken(caplog) == 3
    if ratio >= 0.4:  # (0.4 ** 5 = 1e-2 > 1e-4): nothing to keep, exact
        assert products_taken(caplog) is None


def test_randomized_solver_takes_2_niter_plus_2_products(caplog):
    x = gapped_tasks(2, 256, 20, 0.01)
    with caplog.at_level("DEBUG", logger="lightning_merge.functional.svd"):
        for niter in (0, 1, 2):
            caplog.clear()
            U, S, V = F.truncated_svd(x, 20, solver="randomized", niter=niter)
            assert products_taken(caplog) == 2 * niter + 2
            exact = F.truncated_svd(x, 20, solver="exact")[1]
            assert torch.allclose(S, exact, rtol=1e-3)  # even niter=0 is close on a gap this wide
            eye = torch.eye(20).expand(2, 20, 20)
            assert torch.allclose(U.mT @ U, eye, atol=1e-5) and torch.allclose(V.mT @ V, eye, atol=1e-5)


@pytest.mark.parametrize("niter", [-1, 1.5, True])
def test_bad_niter_is_refused(niter):
    with pytest.raises(ValueError, match=f"`niter`.*{niter!r}"):
        F.truncated_svd(torch.randn(80, 80), 4, solver="randomized", niter=niter)


def test_auto_solver_rule():
    assert F.use_randomized(96, 768) and F.use_randomized(256, 2048)
    assert not F.use_randomized(384, 768)  # T = 2: half the rank, exact
    assert not F.use_randomized(4, 32)  # small matrices: exact


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("merge", [F.tsv_m, F.sftm, F.ties, F.average])
def test_half_precision_computed_in_float32_returned_in_input_dtype(dtype, merge):
    deltas = [torch.randn(16, 12).to(dtype) for _ in range(3)]
    out = merge(deltas)
    assert out.dtype == dtype
    expected = merge([d.float() for d in deltas]).to(dtype)
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, "`rank`.*got 0"),
        ({"rank": 1.5}, "`rank`.*got 1.5"),
        ({"rank": -0.1}, "`rank`"),
        ({"rank": True}, "`rank`.*True"),
        ({"solver": "lanczos"}, "`solver`.*lanczos"),
        ({"scaling": float("nan")}, "`scaling`"),
        ({"weights": [1.0]}, "`weights`.*one entry per task"),
    ],
)
@pytest.mark.parametrize("merge", [F.tsv_m, F.sftm])
def test_svd_merges_reject_bad_arguments(merge, kwargs, match):
    with pytest.raises(ValueError, match=match):
        merge([torch.randn(4, 4), torch.randn(4, 4)], **kwargs)


@pytest.mark.parametrize("density", [0, 0.0, 1.5, -1, True])
def test_ties_rejects_bad_density(density):
    with pytest.raises(ValueError, match="`density`"):
        F.ties([torch.randn(3)], density=density)


@pytest.mark.parametrize("merge", [F.tsv_m, F.sftm, F.ties, F.average, F.task_arithmetic])
def test_bad_task_vectors(merge):
    with pytest.raises(ValueError, match="at least one tensor"):
        merge([])
    with pytest.raises(ValueError, match=r"shape \(4, 4\).*task_vectors\[1\]` has shape \(4, 3\)"):
        merge([torch.randn(4, 4), torch.randn(4, 3)])
    with pytest.raises(ValueError, match=r"`task_vectors\[1\]` contain NaN or Inf"):
        merge([torch.randn(4, 4), torch.full((4, 4), float("nan"))])
    with pytest.raises(ValueError, match="NaN or Inf"):
        merge([torch.tensor([[float("inf")]])])
    with pytest.raises(TypeError, match=r"task_vectors\[0\]`.*floating-point.*torch.int64"):
        merge([torch.ones(4, 4, dtype=torch.long)])
    with pytest.raises(TypeError, match="torch.Tensor"):
        merge([[1.0, 2.0]])


def test_shared_checks():
    assert _checks.numel((3072, 768)) == 2359296 and _checks.numel(()) == 1 and _checks.numel(torch.Size([0, 4])) == 0
    _checks.check_positive_int("world_size", 1)
    for bad in (0, -1, 1.0, True, "2", None):
        with pytest.raises(ValueError, match=rf"Expected argument `world_size` to be a positive int, but got {bad!r}"):
            _checks.check_positive_int("world_size", bad)
    with pytest.raises(ValueError, match=r"`chunk_size` to be a positive int \(bytes\), but got 0\."):
        _checks.check_positive_int("chunk_size", 0, unit="bytes")
    _checks.check_non_negative_int("niter", 0)
    with pytest.raises(ValueError, match="`niter` to be a non-negative int, but got -1"):
        _checks.check_non_negative_int("niter", -1)
    assert _checks.check_finite_numbers("grid", (0, 0.5)) == (0.0, 0.5)
    assert _checks.check_finite_numbers("weights", []) == ()
    for bad in ([float("nan")], [True], [1.0, "a"], 3.0, None):
        with pytest.raises(ValueError, match="`grid` to be a sequence of finite numbers"):
            _checks.check_finite_numbers("grid", bad)
    with pytest.raises(ValueError, match=r"`grid` to be a non-empty sequence of finite numbers, but got \[\]"):
        _checks.check_finite_numbers("grid", [], non_empty=True)


def test_sftm_rejects_bad_basis_and_rcond():
    with pytest.raises(ValueError, match="`basis`"):
        F.sftm([torch.randn(3, 3)], basis="polar")
    with pytest.raises(ValueError, match="`rcond`"):
        F.sftm([torch.randn(3, 3)], rcond=2.0)
    with pytest.raises(ValueError, match=r"Expected argument `fit` to be one of \['response', 'mapping'\]"):
        F.sftm([torch.randn(3, 3)], fit="whole")
