"""The exact path's Gram route, the "auto" solver's probe, and hashing that finishes at the caller's priority
(issue 16). References are float64 numpy SVDs, never the package's own output."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from xxhash import xxh3_128_hexdigest

from lightning_merge import functional as F
from lightning_merge.functional import svd
from lightning_merge.io import hashing


def spectrum_matrix(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A float32 ``m x n`` matrix with singular values ``s`` (length ``min(m, n)``) and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    return ((u * s.to(torch.float64)) @ v.T).to(torch.float32)


def reference(x: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u, s, vh = np.linalg.svd(x.double().numpy(), full_matrices=False)
    return u[:, :k], s[:k], vh[:k].T


def sine(a: np.ndarray, b: np.ndarray) -> float:
    """The largest principal-angle sine between the column spaces of orthonormal ``a`` and ``b``."""
    return float(np.linalg.norm(a - b @ (b.T @ a), 2))


@pytest.mark.parametrize("shape", [(600, 96), (96, 600), (300, 100)])
def test_gram_top_k_meets_its_error_bound_against_a_float64_svd(shape):
    m, n = shape
    r, k = min(m, n), 12
    s = torch.logspace(0, -2, r, dtype=torch.float64)  # s_k / s_1 about 0.6: far above the floor
    x = spectrum_matrix(m, n, s)
    found = svd.gram_top_k(x, k)
    assert found is not None
    U, S, V = (t.double().numpy() for t in found)
    u, sv, v = reference(x, k)
    eps = torch.finfo(torch.float32).eps
    # the bound: |s_i' - s_i| / s_i <~ c max(m, n) eps64 (s_1 / s_i)**2, at most about eps32 once kept
    assert np.max(np.abs(S - sv) / sv) < 10 * eps
    assert np.max(np.abs(U.T @ U - np.eye(k))) < 10 * eps  # U orthonormal to about eps32
    assert np.max(np.abs(V.T @ V - np.eye(k))) < 10 * eps
    # the kept subspaces: within the float32 SVD's own error (a gap of about 4% between neighbours, s_k >> s_{k+1})
    f32 = torch.linalg.svd(x, full_matrices=False)
    own = max(sine(f32.U[:, :k].double().numpy(), u), sine(f32.Vh[:k].T.double().numpy(), v))
    assert max(sine(U, u), sine(V, v)) <= max(4 * own, 100 * eps)
    assert np.max(np.abs((U * S) @ V.T - (u * sv) @ v.T)) < 20 * eps * sv[0]


def test_gram_top_k_falls_back_where_the_gram_loses_the_kept_spectrum():
    m, n, k = 400, 80, 20
    floor = svd.gram_floor((m, n), torch.float32) ** 0.5  # s_k / s_1 below which the Gram is not trusted
    s = torch.cat([torch.ones(10), torch.full((70,), 1e-9)]).double()  # s_k = 1e-9 s_1, below sqrt(eps64) s_1
    assert 1e-9 < floor
    x = spectrum_matrix(m, n, s)
    want = reference(x, k)[1]
    lam = torch.linalg.eigvalsh(svd.gram(x)).flip(0)[:k].clamp_min(0).sqrt().numpy()
    assert np.max(np.abs(lam[10:] - want[10:]) / want[10:]) > 0.1  # the Gram loses the small ones
    assert svd.gram_top_k(x, k) is None
    assert svd.gram_top_k(x, 10) is not None  # the top 10 alone are well above the floor
    # the exact path then takes the SVD: within float32's own error, 10 eps32 s_1
    S = svd.exact_top_k(x, k)[1].double().numpy()
    assert np.max(np.abs(S - want)) < 10 * torch.finfo(torch.float32).eps
    assert svd.gram_top_k(torch.zeros(50, 10), 3) is None  # zero
    assert svd.gram_top_k(x.double(), 5) is None  # float64 input: the Gram would lose half its digits


def test_gram_top_k_is_batched_and_used_by_the_exact_solver(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(3, 200, 50)
    U, S, V = svd.gram_top_k(x, 6)
    assert U.shape == (3, 200, 6) and S.shape == (3, 6) and V.shape == (3, 50, 6)
    for t in range(3):
        assert np.allclose(S[t].double().numpy(), reference(x[t], 6)[1], rtol=1e-5)
    calls = []
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **kw: calls.append(1) or torch.linalg.svd(*a, **kw))
    W = F.truncated_svd(x.mT, 6, solver="exact")  # wide: the Gram of the short side, no SVD
    assert not calls
    assert torch.allclose(W[1], S, rtol=1e-6)


def power_law(m: int, n: int, seed: int) -> torch.Tensor:
    return spectrum_matrix(m, n, 1.0 / torch.arange(1, min(m, n) + 1, dtype=torch.float64), seed)


def low_rank(m: int, n: int, rank: int, seed: int) -> torch.Tensor:
    s = torch.cat([torch.logspace(0, -1, rank, dtype=torch.float64), torch.full((min(m, n) - rank,), 1e-7)])
    return spectrum_matrix(m, n, s, seed)


def test_auto_decides_on_the_first_task_alone(monkeypatch):
    m = n = 256
    k = 24
    assert F.use_randomized(k, 256)
    sketched = []
    where = F.truncated_svd.__globals__  # the module truncated_svd runs in (a doctest run may import svd.py twice)
    real = where["_randomized_svd"]

    def spy(x, *args):
        sketched.append(x.shape[0])
        return real(x, *args)

    monkeypatch.setitem(where, "_randomized_svd", spy)
    slow = torch.stack([power_law(m, n, t) for t in range(4)])  # no gap at k: no sketch converges
    auto = F.truncated_svd(slow, k, solver="auto")
    assert sketched == [1]  # one task's sketch, not the whole batch's (it was [4])
    exact = F.truncated_svd(slow, k, solver="exact")
    assert all(torch.equal(a, b) for a, b in zip(auto, exact, strict=True))
    sketched.clear()
    fast = torch.stack([low_rank(m, n, k, t) for t in range(4)])
    U, S, V = F.truncated_svd(fast, k, solver="auto")
    assert sketched == [1, 3]  # the first converged: the others together
    for t in range(4):
        u, s, v = reference(fast[t], k)
        assert np.allclose(S[t].double().numpy(), s, rtol=1e-4)
        assert sine(U[t].double().numpy(), u) < 1e-3


def test_auto_takes_the_exact_path_for_the_whole_key_when_the_rest_does_not_converge():
    # the first task's sketch converges, a later one's does not: the key is merged from exact SVDs only, the first
    # task included (a sketched task among exact ones left its error in the merge: 1e-3 on real fine-tunes)
    m = n = 256
    k = 24
    mixed = torch.stack([low_rank(m, n, k, 0), power_law(m, n, 1), low_rank(m, n, k, 2)])
    auto, exact = F.truncated_svd(mixed, k, solver="auto"), F.truncated_svd(mixed, k, solver="exact")
    assert not torch.equal(F.truncated_svd(mixed[0], k, solver="auto")[1], exact[1][0])  # alone, it is sketched
    assert all(torch.equal(a, b) for a, b in zip(auto, exact, strict=True))
    for t in range(3):
        assert np.allclose(exact[1][t].double().numpy(), reference(mixed[t], k)[1], rtol=1e-4)
    assert torch.equal(F.tsv_m(mixed, rank=k, solver="auto"), F.tsv_m(mixed, rank=k, solver="exact"))
    assert torch.equal(F.sftm(mixed, rank=k, basis="orthogonal"), F.sftm(mixed, rank=k, basis="orthogonal",
                                                                          solver="exact"))


def test_hashing_left_at_the_close_runs_at_the_callers_priority(tmp_path, monkeypatch):
    low: set[int] = set()
    monkeypatch.setattr(hashing, "_lower_priority", lambda: low.add(threading.get_ident()))
    hashed_in: list[int] = []
    update = hashing._FileHash.update_to

    def spy(self, end, buffer):
        if end > self.done:
            hashed_in.append(threading.get_ident())
        update(self, end, buffer)

    monkeypatch.setattr(hashing._FileHash, "update_to", spy)
    path = tmp_path / "a.safetensors"
    path.write_bytes(os.urandom(5000))
    marks = hashing.ReadMarks()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(hashing._hash_trailing, [path], "xxh3_128", marks, {path}, 7)
        marks.close()  # the merge read nothing and is done: it now waits for the hash
        assert future.result(timeout=30) == {path: "xxh3_128:" + xxh3_128_hexdigest(path.read_bytes())}
    assert low, "the trailing part should run at the lowest priority"
    assert hashed_in and not set(hashed_in) & low  # everything after the close: not at the lowest priority
