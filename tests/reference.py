"""Naive float64 re-implementations of METHODS.md, written independently of lightning_merge (numpy, loops)."""

import numpy as np


def truncate(d, k):
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    return u[:, :k], s[:k], vt[:k].T


def concat_features(deltas, k):
    parts = [truncate(d, k) for d in deltas]
    return (np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts], 1))


def polar_svd(x):
    p, _, qt = np.linalg.svd(x, full_matrices=False)
    return p @ qt


def tsv_m(deltas, k):
    u, s, v = concat_features(deltas, k)
    return polar_svd(u) @ np.diag(s) @ polar_svd(v).T


def sftm(deltas, k, basis="features"):
    u, s, v = concat_features(deltas, k)
    n = len(s)
    if basis == "features":
        bu, bv = u, v
    else:
        bu, bv = polar_svd(u), polar_svd(v)
    # one constraint per feature: u_i^T M v_i = s_i with M = sum_j alpha_j bu_j bv_j^T
    a = np.array([[(u[:, i] @ bu[:, j]) * (v[:, i] @ bv[:, j]) for j in range(n)] for i in range(n)])
    alpha = np.linalg.lstsq(a, s, rcond=None)[0]
    return bu @ np.diag(alpha) @ bv.T, u, s, v


def sftm_mapping(deltas, k, basis="features"):
    """SFTM's mapping fit by plain least squares over the stacked outputs: no normal equations.

    The residual of feature i, ``M v_i - s_i u_i`` with ``M = sum_j alpha_j bu_j bv_j^T``, is linear in alpha:
    column j of the design matrix stacks ``bu_j (bv_j . v_i)`` over every feature i.
    """
    u, s, v = concat_features(deltas, k)
    n = len(s)
    bu, bv = (u, v) if basis == "features" else (polar_svd(u), polar_svd(v))
    design = np.stack([np.concatenate([bu[:, j] * (bv[:, j] @ v[:, i]) for i in range(n)]) for j in range(n)], 1)
    target = np.concatenate([s[i] * u[:, i] for i in range(n)])
    alpha = np.linalg.lstsq(design, target, rcond=None)[0]
    return bu @ np.diag(alpha) @ bv.T, u, s, v


def mapping_residual(merged, u, s, v):
    """``sum_i ||M v_i - s_i u_i||^2`` over the kept features."""
    return float(sum(np.sum((merged @ v[:, i] - s[i] * u[:, i]) ** 2) for i in range(len(s))))


def ties(deltas, density):
    deltas = [np.asarray(d, dtype=np.float64).ravel() for d in deltas]
    size = deltas[0].size
    keep = int(np.ceil(density * size))
    trimmed = []
    for d in deltas:
        order = np.argsort(-np.abs(d), kind="stable")
        t = np.zeros(size)
        t[order[:keep]] = d[order[:keep]]
        trimmed.append(t)
    out = np.zeros(size)
    for i in range(size):
        total = sum(t[i] for t in trimmed)
        sign = np.sign(total)
        agreeing = [t[i] for t in trimmed if t[i] != 0 and np.sign(t[i]) == sign]
        out[i] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return out


def sti(u, s, v):
    n = len(s)
    return np.abs((u.T @ u - np.eye(n)) @ np.diag(s) @ (v.T @ v - np.eye(n))).sum()


def tsv_c(d, k=None, energy=None):
    """TSV-C of one matrix (METHODS.md): its rank-k truncation, k given or the smallest keeping ``energy``."""
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    if energy is not None:
        kept, total, k = 0.0, float(np.sum(d**2)), 0
        while kept < energy * total and k < len(s):
            kept += s[k] ** 2
            k += 1
    return (u[:, :k] * s[:k]) @ vt[:k], k
