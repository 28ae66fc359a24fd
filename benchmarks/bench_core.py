"""TSV-M and SFTM: the merge core against a straightforward implementation of the published algorithms.

    python benchmarks/bench_core.py [--repeats 3] [--tasks 8] [--noise 1e-3] [--device cuda] [--skip-sensitivity]

Task matrices are low effective rank plus noise: `k = r / T` components (the kept budget) whose singular values
decay log-uniformly from 1 to 0.03, plus i.i.d. Gaussian noise holding `--noise` of the Frobenius norm. A last
section repeats one shape with an effective rank of 32 < k, where two thirds of each task's kept components are
noise: TSV-M's orthogonalization gives those unit vectors full weight, so M depends on which noise directions a
solver happens to pick, and exact and randomized results differ by far more (the figure is printed, not hidden).
A power-law spectrum (no gap at k) shows the other guard: "auto" sees that the sketch has not converged and falls
back to the exact solver (the "solver" column is what "auto" ends up using). Every
distinct parameter shape is timed `--repeats` times (median); a model's total is the sum over its layers of the
median of their shape. The baseline is written here, independently of the package: a full SVD per task, then the
SVD-based polar factor of the concatenated U and V (TSV-M), or the SFTM system solved with `torch.linalg.lstsq`
(gelsd, float64; `pinv` on CUDA, whose lstsq has no minimum-norm driver). "ours" is the package with the exact
solver and with solver="auto" (what users get). A last table sweeps the spectral gap and prints what "auto" keeps
and how far TSV-M then is from TSV-M with exact SVDs.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from lightning_merge import functional as F

VIT_B32 = {(2304, 768): 12, (768, 768): 12, (3072, 768): 12, (768, 3072): 12}  # in_proj, out_proj, fc, proj
DECODER_2L = {(2048, 2048): 8, (5632, 2048): 4, (2048, 5632): 2}  # q k v o; gate up; down


def realistic_tasks(shape, T, noise, seed, rank, gap=None):
    """T tasks: ``rank`` signal components decaying log-uniformly from 1 to 0.03, plus Gaussian noise holding
    ``noise`` of the Frobenius norm, or, with ``gap``, noise whose largest singular value is ``gap * s_rank``."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    out = []
    for _ in range(T):
        u = torch.linalg.qr(torch.randn(m, rank, generator=g)).Q
        v = torch.linalg.qr(torch.randn(n, rank, generator=g)).Q
        s = torch.logspace(0, -1.5, rank)
        signal = (u * s) @ v.T
        eps = torch.randn(m, n, generator=g)
        if gap is None:
            scale = noise * signal.norm() / eps.norm()
        else:
            scale = gap * s[-1] / torch.linalg.matrix_norm(eps, ord=2)
        out.append(signal + eps * scale)
    return torch.stack(out)


def power_law_tasks(shape, T, seed):
    """A heavy tail: s_i = 1 / i over the full rank, no gap at k."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    r = min(m, n)
    out = []
    for _ in range(T):
        u = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
        v = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
        out.append((u / torch.arange(1, r + 1)) @ v.T)
    return torch.stack(out)


def _features_full_svd(deltas, k):
    U, S, Vh = torch.linalg.svd(deltas, full_matrices=False)  # the full SVD of every task
    T = deltas.shape[0]
    cat = lambda x: torch.cat([x[t] for t in range(T)], dim=-1)  # noqa: E731
    return cat(U[..., :k]), S[:, :k].reshape(-1), cat(Vh[:, :k].mT)


def _polar_svd(x):
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def baseline_tsv_m(deltas, k):
    U, s, V = _features_full_svd(deltas, k)
    return _polar_svd(U) @ torch.diag(s) @ _polar_svd(V).T


def baseline_sftm(deltas, k):
    U, s, V = _features_full_svd(deltas, k)
    a = (U.double().T @ U.double()) * (V.double().T @ V.double())
    if a.is_cuda:  # CUDA's lstsq has no minimum-norm driver: the SVD-based pseudo-inverse instead
        alpha = torch.linalg.pinv(a) @ s.double()
    else:
        alpha = torch.linalg.lstsq(a, s.double().unsqueeze(1), driver="gelsd").solution.squeeze(1)
    return (U * alpha.float()) @ V.T


def guard_sweep(T=8, shape=(768, 768), ratios=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)):
    """What "auto" keeps as the spectral gap closes, and how far TSV-M then is from TSV-M with exact SVDs."""
    print("guard sweep: TSV-M through auto against TSV-M with the exact SVD (768 x 768, T = 8)")
    print(f"{'ratio':>7}{'auto':>9}{'rel. diff.':>12}")
    k = min(shape) // T
    for ratio in ratios:
        deltas = realistic_tasks(shape, T, None, 0, k, gap=ratio)
        error = rel_err(F.tsv_m(deltas), F.tsv_m(deltas, solver='exact'))
        print(f"{ratio:7.3f}{auto_choice(deltas, k):>9}{error:12.1e}",
              flush=True)


def median_time(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def bench_shape(shape, T, noise, repeats, seed, signal_rank=None, power_law=False, device="cpu"):
    k = max(1, min(shape) // T)
    deltas = power_law_tasks(shape, T, seed) if power_law else realistic_tasks(shape, T, noise, seed, signal_rank or k)
    deltas = deltas.to(device)
    if device != "cpu":  # warm-up: CUDA contexts, cuSOLVER handles and kernels load on first use
        for fn in (baseline_tsv_m, baseline_sftm):
            fn(deltas, k)
        F.tsv_m(deltas), F.sftm(deltas), F.tsv_m(deltas, solver="exact")
    row = {}
    for name, base, ours in (("tsv_m", baseline_tsv_m, F.tsv_m), ("sftm", baseline_sftm, F.sftm)):
        t_base, ref = median_time(lambda b=base: b(deltas, k), repeats)
        t_exact, exact = median_time(lambda o=ours: o(deltas, solver="exact"), repeats)
        t_auto, auto = median_time(lambda o=ours: o(deltas, solver="auto"), repeats)
        row[name] = (t_base, t_exact, t_auto, rel_err(exact, ref), rel_err(auto, ref))
    return row, auto_choice(deltas, k)


def auto_choice(deltas, k):
    """What solver="auto" did, from the package's debug log: "rand/p" (a sketch of p products kept) or "exact"."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("lightning_merge.functional.svd")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        F.truncated_svd(deltas, k, solver="auto")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    kept = [r.args[1] for r in records if len(r.args) == 3 and r.args[2] is True]
    return f"rand/{kept[0]}" if kept else "exact"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--noise", type=float, default=1e-3)
    parser.add_argument("--models", nargs="*", default=["vit_b32", "decoder_2l"])
    parser.add_argument("--device", default="cpu", help="where the tensors live and both sides run (e.g. cuda)")
    parser.add_argument("--skip-sensitivity", action="store_true", help="only the model tables")
    args = parser.parse_args()
    models = {"vit_b32": VIT_B32, "decoder_2l": DECODER_2L}
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, T={args.tasks}, noise={args.noise}, median of {args.repeats}")
    header = (f"{'model':<11}{'shape':>12}{'n':>4}{'method':>7}{'solver':>11}{'base s':>9}{'exact s':>9}"
              f"{'auto s':>8}{'x exact':>8}{'x auto':>8}{'err exact':>11}{'err auto':>10}")
    for model in args.models:
        print(header)
        totals = {m: [0.0, 0.0, 0.0, 0.0] for m in ("tsv_m", "sftm")}
        for i, (shape, count) in enumerate(models[model].items()):
            row, solver = bench_shape(shape, args.tasks, args.noise, args.repeats, seed=i, device=args.device)
            for method, (tb, te, ta, ee, ea) in row.items():
                totals[method] = [totals[method][0] + count * tb, totals[method][1] + count * te,
                                  totals[method][2] + count * ta, max(totals[method][3], ea)]
                print(f"{model:<11}{str(shape):>12}{count:>4}{method:>7}{solver:>11}{tb:9.3f}{te:9.3f}{ta:8.3f}"
                      f"{tb / te:8.2f}{tb / ta:8.2f}{ee:11.1e}{ea:10.1e}", flush=True)
        for method, (tb, te, ta, ea) in totals.items():
            print(f"{model:<11}{'TOTAL':>12}{'':>4}{method:>7}{'':>11}{tb:9.1f}{te:9.1f}{ta:8.1f}"
                  f"{tb / te:8.2f}{tb / ta:8.2f}{'':>11}{ea:10.1e}")
        print()
    if args.skip_sensitivity:
        return
    guard_sweep()
    sensitivities = (("effective rank 32 < k (the kept tail is noise)", {"signal_rank": 32}),
                     ("power-law spectrum s_i = 1/i (no gap at k): auto falls back to exact", {"power_law": True}))
    for title, kwargs in sensitivities:
        print(f"sensitivity: {title}")
        print(header)
        row, solver = bench_shape((768, 768), args.tasks, args.noise, 1, seed=99, device=args.device, **kwargs)
        for method, (tb, te, ta, ee, ea) in row.items():
            print(f"{'vit_b32':<11}{str((768, 768)):>12}{1:>4}{method:>7}{solver:>11}{tb:9.3f}{te:9.3f}{ta:8.3f}"
                  f"{tb / te:8.2f}{tb / ta:8.2f}{ee:11.1e}{ea:10.1e}")

if __name__ == "__main__":
    main()
