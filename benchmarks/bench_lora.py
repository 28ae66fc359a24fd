"""LoRA merging: the factored path (QR + r x r SVD per task, METHODS.md) against densify-then-SVD.

    python benchmarks/bench_lora.py [--tasks 8] [--rank 16] [--dense-layers 2] [--layers 32] [--threads 1]
                                    [--dense-exact]

Synthetic adapters of rank ``--rank`` on the seven projections of decoder layers with ``--hidden`` 2048 and
``--mlp`` 5632 (q, k, v, o: 2048 x 2048; gate, up: 5632 x 2048; down: 2048 x 5632), lora_alpha = 2 r, Gaussian
factors. Each variant runs in a fresh subprocess, so its peak RSS (``ru_maxrss``) is its own.

- ``densify + SVD``: per projection, the ``T`` dense ``scale * B @ A``, then the pipeline of ``tsv_m``/``sftm``
  (:func:`~lightning_merge.functional.svd.task_features` with ``solver="auto"``, randomized here since
  ``k = 2048 // 8 = 256`` is under a quarter of ``r``; the method's ``factors``; ``L @ R^T``). The features are
  computed once per layer and timed into both methods. ``--dense-exact`` adds the exact full SVDs of the paper on
  one layer (about 6 minutes on one core).
- ``factored``: :func:`lightning_merge.functional.lora.lora_merge` with the same ``k`` (clamped to the rank, so
  all 16 components of every task are kept, as on the dense path): per-layer median of ``--repeats``, and one pass
  over ``--layers`` layers ("whole model").

Memory columns: ``adapters`` is the size of the factors held, ``dense`` that of one layer's seven dense updates
(float32, one task); ``growth`` is the peak RSS minus the RSS after ``import torch``, and ``ratio`` is
``growth / (adapters + dense)`` (target: at most 2). The relative error compares the factored merge with the
dense one on layer 0 (float32).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from lightning_merge.functional._checks import resolve_rank
from lightning_merge.functional.lora import LowRankUpdate, lora_dense, lora_merge, lora_scale
from lightning_merge.functional.svd import task_features
from lightning_merge.methods import SFTM, TSVM

METHODS = {"tsv_m": TSVM(), "sftm": SFTM()}


def projections(hidden, mlp):
    square = (hidden, hidden)
    return {"q": square, "k": square, "v": square, "o": square,
            "gate": (mlp, hidden), "up": (mlp, hidden), "down": (hidden, mlp)}


def synthetic_layer(shapes, tasks, rank, seed):
    """``{projection: [LowRankUpdate per task]}`` with Gaussian factors of a trained-looking size."""
    g = torch.Generator().manual_seed(seed)
    scale = lora_scale(2 * rank, rank)
    return {name: [LowRankUpdate(torch.randn(m, rank, generator=g) * 0.02,
                                 torch.randn(rank, n, generator=g) / n**0.5, scale) for _ in range(tasks)]
            for name, (m, n) in shapes.items()}


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def factored_layer(layer, method):
    return {name: lora_merge(updates, method.factors, rank=method.rank) for name, updates in layer.items()}


def dense_layer(layer, solver):
    """Per method: seconds (densify + features shared, plus its factors) and the merged matrices."""
    seconds, merged = dict.fromkeys(METHODS, 0.0), {name: {} for name in METHODS}
    for proj, updates in layer.items():
        start = time.perf_counter()
        deltas = torch.stack([lora_dense(u) for u in updates])
        T, m, n = deltas.shape
        U, s, V = task_features(deltas, resolve_rank(None, min(m, n), T), solver=solver)
        shared = time.perf_counter() - start
        del deltas
        for name, method in METHODS.items():
            start = time.perf_counter()
            left, right = method.factors(U, s, V)
            merged[name][proj] = left @ right.mT
            seconds[name] += shared + time.perf_counter() - start
    return seconds, merged


def worker(args):
    """One variant in this process; prints one JSON line, saves layer 0's merged matrices to ``args.out``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    rss_import = rss_mib()
    layers = [synthetic_layer(projections(args.hidden, args.mlp), args.tasks, args.rank, seed)
              for seed in range(args.num)]
    if args.worker == "dense":
        seconds, first = {name: [] for name in METHODS}, {}
        for layer in layers:
            times, merged = dense_layer(layer, args.solver)
            first = first or merged
            for name in METHODS:
                seconds[name].append(times[name])
    elif args.num <= args.dense_layers:  # per layer, median of repeats
        seconds, first = {}, {}
        for name, method in METHODS.items():
            seconds[name] = [statistics.median(timed(lambda la=la, me=method: factored_layer(la, me))
                                               for _ in range(args.repeats)) for la in layers]
            first[name] = factored_layer(layers[0], method)
    else:  # the whole model, one pass per method, holding one layer's output at a time
        seconds = {name: [timed(lambda me=method: merge_model(layers, me))] for name, method in METHODS.items()}
        first = {}
    peak = rss_mib()  # before the check below densifies layer 0's merged factors
    dense = {name: {k: v if isinstance(v, torch.Tensor) else v.B @ v.A for k, v in out.items()}
             for name, out in first.items()}
    torch.save(dense, args.out)
    print(json.dumps({"seconds": seconds, "growth": peak - rss_import}))


def merge_model(layers, method):
    for layer in layers:
        factored_layer(layer, method)  # a real run writes each layer out


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_variant(args, variant, num, out, solver="auto"):
    cmd = [sys.executable, __file__, "--worker", variant, "--num", str(num), "--out", out, "--solver", solver]
    for option in ("tasks", "rank", "hidden", "mlp", "repeats", "dense_layers", "threads"):
        if getattr(args, option) is not None:
            cmd += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def rel_err(path_a, path_b, method):
    a, b = torch.load(path_a)[method], torch.load(path_b)[method]
    return max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm()) for k in a)


def sizes_mib(args, num_layers):
    shapes = projections(args.hidden, args.mlp).values()
    adapters = 4 * args.tasks * args.rank * sum(m + n for m, n in shapes) * num_layers / 2**20
    return adapters, 4 * sum(m * n for m, n in shapes) / 2**20


def row(label, method, res, args, num, baseline=None):
    times = res["seconds"][method]
    total = sum(times)
    per_layer = total / num
    adapters, dense = sizes_mib(args, num)
    speedup = f"{baseline / per_layer:9.0f}x" if baseline else f"{'':>10}"
    print(f"{label:<24}{method:>7}{num:>7}{per_layer:10.3f}{total:9.2f}{speedup}{adapters:9.0f}{dense:7.0f}"
          f"{res['growth']:8.0f}{res['growth'] / (adapters + dense):7.2f}", flush=True)
    return per_layer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--mlp", type=int, default=5632)
    parser.add_argument("--dense-layers", type=int, default=2)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--dense-exact", action="store_true", help="also time exact full SVDs on one layer")
    parser.add_argument("--worker", choices=["dense", "factored"], help=argparse.SUPPRESS)
    parser.add_argument("--num", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--solver", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print(f"torch {torch.__version__}, threads={args.threads or torch.get_num_threads()}, T={args.tasks}, "
          f"r={args.rank}, hidden={args.hidden}, mlp={args.mlp}, factored per layer: median of {args.repeats}")
    print(f"{'variant':<24}{'method':>7}{'layers':>7}{'s/layer':>10}{'total s':>9}{'speed-up':>10}"
          f"{'adapt.':>9}{'dense':>7}{'growth':>8}{'ratio':>7}   (MiB)")
    with tempfile.TemporaryDirectory() as tmp:
        dense = run_variant(args, "dense", args.dense_layers, f"{tmp}/dense.pt")
        exact = run_variant(args, "dense", 1, f"{tmp}/exact.pt", "exact") if args.dense_exact else None
        fact = run_variant(args, "factored", args.dense_layers, f"{tmp}/fact.pt")
        model = run_variant(args, "factored", args.layers, f"{tmp}/model.pt")
        for method in METHODS:
            base = row("densify + SVD (auto)", method, dense, args, args.dense_layers)
            base_exact = row("densify + SVD (exact)", method, exact, args, 1) if exact else None
            row("factored", method, fact, args, args.dense_layers, base)
            if base_exact:
                row("factored vs exact", method, fact, args, args.dense_layers, base_exact)
            row("factored, whole model", method, model, args, args.layers, base)
            print(f"{'':<24}{method:>7}  max rel. error factored vs dense, layer 0: "
                  f"{rel_err(f'{tmp}/fact.pt', f'{tmp}/dense.pt', method):.1e}")


if __name__ == "__main__":
    main()
