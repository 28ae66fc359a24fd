"""TSV-C compress time: the package (solver="auto") against a plain full SVD per matrix, in the same run.

    python benchmarks/bench_compress.py [--models vit_b32 bert_base] [--tasks 8] [--repeats 3] [--noise 1e-3]

Each task matrix is low effective rank plus noise: ``k = r / T`` signal components (the kept budget, METHODS.md's
default for ``T`` tasks) decaying log-uniformly from 1 to 0.03, plus i.i.d. Gaussian noise holding ``--noise`` of
the Frobenius norm. Per distinct shape, ``--repeats`` task matrices are compressed by both: the baseline, written here
independently of the package (``torch.linalg.svd`` of the whole matrix, then its top ``k``), and
``lightning_merge.functional.tsv_c`` (what ``compress_checkpoints`` runs per matrix and task). Times are medians per
matrix; a model's total is the sum over its matrices, times ``T`` tasks. ``err`` is the largest relative Frobenius
distance between the two truncations, ``loss`` the relative error of the truncation to the task matrix itself.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_merge import functional as F

MODELS = {
    "vit_b32": {(2304, 768): 12, (768, 768): 12, (3072, 768): 12, (768, 3072): 12},  # in_proj, out_proj, fc, proj
    "bert_base": {(768, 768): 48, (3072, 768): 12, (768, 3072): 12},  # q k v o; intermediate; output
}


def task_matrix(shape, rank, noise, seed):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    u = torch.linalg.qr(torch.randn(m, rank, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, rank, generator=g)).Q
    signal = (u * torch.logspace(0, -1.5, rank)) @ v.T
    eps = torch.randn(m, n, generator=g)
    return signal + eps * (noise * signal.norm() / eps.norm())


def baseline(d, k):
    """The plain method: a full SVD of the matrix, then its top ``k`` components. Wide matrices are transposed
    first: ``torch.linalg.svd`` of a 768 x 3072 matrix took 15 s here against 0.7 s for its transpose."""
    if d.shape[0] < d.shape[1]:
        return baseline(d.T, k).T
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_shape(shape, T, repeats, noise):
    k = max(1, min(shape) // T)
    base_s, ours_s, errs, losses = [], [], [], []
    for seed in range(repeats):
        d = task_matrix(shape, k, noise, seed)
        tb, expected = timed(lambda d=d: baseline(d, k))
        to, trunc = timed(lambda d=d: F.tsv_c(d, num_tasks=T, solver="auto"))
        base_s.append(tb)
        ours_s.append(to)
        errs.append(float((trunc.dense() - expected).norm() / expected.norm()))
        losses.append(float((trunc.dense() - d).norm() / d.norm()))
    return k, statistics.median(base_s), statistics.median(ours_s), max(errs), max(losses)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--noise", type=float, default=1e-3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, T={args.tasks}, noise={args.noise},"
          f" median of {args.repeats} matrices per shape")
    print(f"{'model':<10} {'shape':>12} {'n':>3} {'k':>4} {'full SVD s':>10} {'tsv_c s':>8} {'x':>6}"
          f" {'err':>8} {'loss':>8} {'size':>6}")
    cache = {}
    for model in args.models:
        total_b = total_o = total_size = total_full = 0.0
        worst = 0.0
        for shape, count in MODELS[model].items():
            if shape not in cache:
                cache[shape] = bench_shape(shape, args.tasks, args.repeats, args.noise)
            k, tb, to, err, loss = cache[shape]
            size = F.compressed_numel(shape, k) / (shape[0] * shape[1])
            print(f"{model:<10} {str(shape):>12} {count:>3} {k:>4} {tb:>10.3f} {to:>8.3f} {tb / to:>6.2f}"
                  f" {err:>8.1e} {loss:>8.1e} {size:>6.3f}")
            total_b += count * args.tasks * tb
            total_o += count * args.tasks * to
            total_size += count * F.compressed_numel(shape, k)
            total_full += count * shape[0] * shape[1]
            worst = max(worst, err)
        print(f"{model:<10} {'TOTAL':>12} {'':>3} {'':>4} {total_b:>10.1f} {total_o:>8.1f} {total_b / total_o:>6.2f}"
              f" {worst:>8.1e} {'':>8} {total_size / total_full:>6.3f}")


if __name__ == "__main__":
    main()
