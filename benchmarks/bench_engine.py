"""Benchmark of the streaming merge engine against loading every task vector at once, and the I/O floor.

Synthetic fine-tunes with ViT-B/32 image-encoder shapes (12 blocks, width 768, MLP 3072, attention in-proj
2304x768, biases and norms, patch embedding, projection) are written as safetensors (matrix task deltas of low
effective rank plus noise, as in bench_core.py; the others small noise); then each variant runs
in a fresh subprocess that reports its wall time and peak resident memory (``VmHWM``):

- ``engine_tsv_m`` / ``engine_task_arithmetic``: :func:`lightning_merge.engine.merge_checkpoints` to a folder
  (including the default xxh3_128 hash of every input, the record and the streamed safetensors output);
- ``naive_tsv_m`` / ``naive_task_arithmetic``: the straightforward approach: ``safetensors.torch.load_file``
  every checkpoint, build all ``T`` task-vector dicts, merge in memory with the same method object,
  ``save_file``. Its ``core`` column is the merge time alone, on tensors already in memory;
- ``engine_task_arithmetic_sha256`` / ``engine_task_arithmetic_nohash``: the same with the inputs' sha256
  (``input_hash="sha256"``) and with no hashes (``input_hash=None``);
- ``io_floor``: every byte of every input file read once, front to back, into a reused 128 KiB buffer, all files
  at once (one thread per file); nothing else. The fastest plain read measured here: reading the files one after
  the other took 2.5-4x as long (warm and cold), and buffers of 256 KiB or more up to 7x from the page cache;
- ``core_task_arithmetic``: the merge arithmetic alone, as the engine does it (``method(base, finetuned)`` per
  key), on every input already loaded in memory: no I/O at all;
- ``write_floor``: writing as many bytes as one checkpoint (the merged output) to a new file, from a reused
  16 MiB buffer: what the output costs the engine before any arithmetic (the page cache of a new file);
- ``hash_xxh3_128`` / ``hash_sha256``: that hash of every input file alone (what the record's hashes cost);
- ``import``: the interpreter with torch and lightning_merge imported (the memory floor).

Every variant runs in two cache states (``--cache``): ``warm``, the inputs in the page cache (as just after
writing them), where reading is a memory copy; and ``cold``, every input evicted from the page cache before the
variant starts (``posix_fadvise(POSIX_FADV_DONTNEED)`` on the synced files; needs no privileges), where reading
is disk I/O, as for checkpoints larger than memory or not recently used. The inputs are synced to disk once
after they are written, so no variant runs while the kernel is still writing them back (that throttled the
first variants' writes in earlier versions of this script).

Run:
    python benchmarks/bench_engine.py                     # 8 tasks, 12 blocks, 3 repeats
    python benchmarks/bench_engine.py --blocks 4 --repeats 1 --cache warm
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

WIDTH, MLP, OUT_DIM, PATCH, TOKENS = 768, 3072, 512, 32, 50
CACHE_STATES = {"warm": "inputs in the page cache", "cold": "inputs evicted from the page cache before each variant"}
HASH_VARIANTS = {"": "xxh3_128", "_sha256": "sha256", "_nohash": None}
VARIANTS = ("import", "io_floor", "write_floor", "hash_xxh3_128", "hash_sha256", "engine_task_arithmetic",
            "engine_task_arithmetic_sha256", "engine_task_arithmetic_nohash", "naive_task_arithmetic",
            "core_task_arithmetic", "engine_tsv_m", "naive_tsv_m")


def vit_b32_state(blocks: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random state dict with the shapes of the CLIP ViT-B/32 image encoder."""
    shapes: dict[str, tuple[int, ...]] = {
        "conv1.weight": (WIDTH, 3, PATCH, PATCH),
        "class_embedding": (WIDTH,),
        "positional_embedding": (TOKENS, WIDTH),
        "ln_pre.weight": (WIDTH,),
        "ln_pre.bias": (WIDTH,),
    }
    for i in range(blocks):
        p = f"transformer.resblocks.{i}."
        shapes |= {
            p + "ln_1.weight": (WIDTH,), p + "ln_1.bias": (WIDTH,),
            p + "attn.in_proj_weight": (3 * WIDTH, WIDTH), p + "attn.in_proj_bias": (3 * WIDTH,),
            p + "attn.out_proj.weight": (WIDTH, WIDTH), p + "attn.out_proj.bias": (WIDTH,),
            p + "ln_2.weight": (WIDTH,), p + "ln_2.bias": (WIDTH,),
            p + "mlp.c_fc.weight": (MLP, WIDTH), p + "mlp.c_fc.bias": (MLP,),
            p + "mlp.c_proj.weight": (WIDTH, MLP), p + "mlp.c_proj.bias": (WIDTH,),
        }
    shapes |= {"ln_post.weight": (WIDTH,), "ln_post.bias": (WIDTH,), "proj": (WIDTH, OUT_DIM)}
    return {k: torch.randn(s, generator=generator) * 0.02 for k, s in shapes.items()}


def task_delta(shape: tuple[int, ...], seed: int, generator: torch.Generator) -> torch.Tensor:
    """Matrices: low effective rank plus noise, as in bench_core.py (so "auto" keeps its sketch); others: noise."""
    if len(shape) != 2:
        return 1e-3 * torch.randn(shape, generator=generator)
    from bench_core import realistic_tasks  # noqa: PLC0415 (the benchmarks folder is on sys.path when run)

    delta = realistic_tasks(shape, 1, 1e-3, seed, max(1, min(shape) // 8))[0]
    return delta * (1e-3 * shape[0] ** 0.5 / delta.norm())


def make_inputs(folder: Path, tasks: int, blocks: int) -> tuple[Path, list[Path]]:
    """Write the base and ``tasks`` fine-tunes (base plus a task delta) as safetensors."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = vit_b32_state(blocks, g)
    save_file(base, str(folder / "base.safetensors"))
    paths = []
    for t in range(tasks):
        path = folder / f"task{t}.safetensors"
        deltas = {k: task_delta(tuple(v.shape), 1000 * t + i, g) for i, (k, v) in enumerate(base.items())}
        save_file({k: v + deltas[k] for k, v in base.items()}, str(path))
        paths.append(path)
    for path in [folder / "base.safetensors", *paths]:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    return folder / "base.safetensors", paths


def evict(paths: list[Path]) -> None:
    """Drop the (clean, synced) pages of ``paths`` from the page cache, so that the next read comes from disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------ child side


def _io_floor(base: Path, tasks: list[Path]) -> dict[str, float]:
    def read(path: Path) -> int:
        total, buffer = 0, memoryview(bytearray(2**17))
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
        return total

    with ThreadPoolExecutor(len(tasks) + 1) as pool:  # reads release the GIL: every file at once
        return {"bytes": float(sum(pool.map(read, [base, *tasks])))}


def _core(method_name: str, base: Path, tasks: list[Path]) -> dict[str, float]:
    from safetensors.torch import load_file

    from lightning_merge.methods import get_method

    method = get_method(method_name)
    W0, finetuned = load_file(str(base)), [load_file(str(p)) for p in tasks]
    start = time.perf_counter()
    for k, w0 in W0.items():
        method(w0, [ft[k] for ft in finetuned])
    return {"core_s": time.perf_counter() - start}


def _write_floor(base: Path, out: Path) -> dict[str, float]:
    out.mkdir()
    buffer, left = memoryview(torch.ones(2**24, dtype=torch.uint8).numpy()), base.stat().st_size
    with open(out / "model.safetensors", "wb") as f:
        while left > 0:
            left -= f.write(buffer[: min(left, len(buffer))])
    return {}


def _hash_inputs(algorithm: str, base: Path, tasks: list[Path]) -> dict[str, float]:
    from lightning_merge.io.hashing import hash_file

    for path in [base, *tasks]:
        hash_file(path, algorithm)
    return {}


def _engine(variant: str, base: Path, tasks: list[Path], out: Path) -> dict[str, float]:
    from lightning_merge.engine import merge_checkpoints

    suffix = next((s for s in HASH_VARIANTS if s and variant.endswith(s)), "")
    merge_checkpoints(variant.removesuffix(suffix), base, tasks, out, overwrite=True, progress=False,
                      input_hash=HASH_VARIANTS[suffix])
    return {}


def _naive(method_name: str, base: Path, tasks: list[Path], out: Path) -> dict[str, float]:
    from safetensors.torch import load_file, save_file

    from lightning_merge.methods import get_method

    method = get_method(method_name)
    W0 = load_file(str(base))
    task_vectors = [{k: v - W0[k] for k, v in load_file(str(p)).items()} for p in tasks]
    start = time.perf_counter()
    merged = {k: (W0[k] + method.merge([tv[k] for tv in task_vectors])).contiguous() for k in W0}
    core = time.perf_counter() - start
    out.mkdir(exist_ok=True)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
    return {"core_s": core}


def run_child(variant: str, base: Path, tasks: list[Path], out: Path) -> None:
    import lightning_merge  # noqa: F401 - part of every variant, measured alone by "import"

    start = time.perf_counter()
    extra: dict[str, float] = {}
    if variant == "io_floor":
        extra = _io_floor(base, tasks)
    elif variant == "write_floor":
        extra = _write_floor(base, out)
    elif variant.startswith("hash_"):
        extra = _hash_inputs(variant.removeprefix("hash_"), base, tasks)
    elif variant.startswith("engine_"):
        extra = _engine(variant.removeprefix("engine_"), base, tasks, out)
    elif variant.startswith("naive_"):
        extra = _naive(variant.removeprefix("naive_"), base, tasks, out)
    elif variant.startswith("core_"):
        extra = _core(variant.removeprefix("core_"), base, tasks)
    seconds = time.perf_counter() - start
    print(json.dumps({"variant": variant, "seconds": seconds, "peak_mib": peak_resident_mib(), **extra}))


def peak_resident_mib() -> float:
    """Peak resident memory of this process: ``VmHWM``, which (unlike ``ru_maxrss``) is not inherited across
    exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover - not Linux


# ----------------------------------------------------------------------------------------- parent side


def measure(variant: str, cache: str, folder: Path, base: Path, tasks: list[Path]) -> dict[str, float]:
    out = folder / f"out-{variant}"
    if cache == "cold":
        evict([base, *tasks])
    else:  # warm: every input in the page cache, whatever ran before
        _io_floor(base, tasks)
    argv = [sys.executable, __file__, "--child", variant, "--workdir", str(folder), "--tasks", str(len(tasks))]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    shutil.rmtree(out, ignore_errors=True)
    if result.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _median(runs: list[dict[str, float]], field: str) -> float:
    values = [r[field] for r in runs if field in r]
    return statistics.median(values) if values else float("nan")


def report(results: dict[str, list[dict[str, float]]], input_bytes: int, cache: str) -> None:
    floor = _median(results["io_floor"], "seconds")
    naive_peak = max(_median(runs, "peak_mib") for v, runs in results.items() if v.startswith("naive_"))
    print(
        f"\n{cache} cache ({CACHE_STATES[cache]}): inputs {input_bytes / 2**30:.2f} GiB on disk; medians over"
        f" {len(results['io_floor'])} run(s)\n"
    )
    print(f"{'variant':<31}{'time s':>9}{'core s':>9}{'x I/O floor':>13}{'peak MiB':>10}{'x naive peak':>14}")
    for variant, runs in results.items():
        t, core, peak = (_median(runs, f) for f in ("seconds", "core_s", "peak_mib"))
        core_txt = f"{core:9.2f}" if core == core else f"{'-':>9}"
        print(f"{variant:<31}{t:9.2f}{core_txt}{t / floor:13.2f}{peak:10.0f}{peak / naive_peak:14.2f}")
    print()
    for text, ok in check_targets(results, floor, naive_peak):
        print(f"[{'PASS' if ok else 'FAIL'}] {text}")
    if "write_floor" in results and "engine_task_arithmetic" in results:
        write, ta = _median(results["write_floor"], "seconds"), _median(results["engine_task_arithmetic"], "seconds")
        print(f"(read floor + write floor = {floor:.2f} + {write:.2f} = {floor + write:.2f} s; engine task"
              f" arithmetic {ta:.2f} s = {ta / (floor + write):.2f}x of both)")
    if "core_task_arithmetic" in results:
        core = _median(results["core_task_arithmetic"], "core_s")
        print(f"(task arithmetic's arithmetic alone, inputs in memory, no I/O: {core:.2f} s = {core / floor:.2f}x the"
              f" read floor)")


def check_targets(
    results: dict[str,
    list[dict[str, float]]],
    floor: float,
    naive_peak: float,
) -> list[tuple[str, bool]]:
    def med(variant: str, field: str = "seconds") -> float:
        return _median(results[variant], field) if variant in results else float("nan")

    engine_peak = max(med(v, "peak_mib") for v in results if v.startswith("engine_"))
    checks = [
        (f"engine peak {engine_peak:.0f} MiB <= naive peak / 4 = {naive_peak / 4:.0f} MiB",
         engine_peak <= naive_peak / 4),
        (f"engine peak {engine_peak:.0f} MiB < 1024 MiB", engine_peak < 1024),
    ]
    if "engine_task_arithmetic" in results:
        ta, core = med("engine_task_arithmetic"), med("naive_task_arithmetic", "core_s")
        checks.append((f"engine task arithmetic {ta:.2f} s <= 2 x I/O floor = {2 * floor:.2f} s", ta <= 2 * floor))
        bound = core + 2 * floor
        checks.append((f"engine task arithmetic {ta:.2f} s <= core in memory + 2 x I/O floor = {bound:.2f} s",
                       ta <= bound))
    for suffix, what in (("_sha256", "with the inputs' sha256"), ("_nohash", "without input hashes")):
        if f"engine_task_arithmetic{suffix}" in results:
            ta = med(f"engine_task_arithmetic{suffix}")
            checks.append((f"engine task arithmetic {what} {ta:.2f} s <= 2 x I/O floor = {2 * floor:.2f} s",
                           ta <= 2 * floor))
    if "engine_tsv_m" in results:
        tsv, core = med("engine_tsv_m"), med("naive_tsv_m", "core_s")
        checks.append((f"engine TSV-M {tsv:.2f} s <= core in memory + I/O floor = {core + floor:.2f} s",
                       tsv <= core + floor))
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8, help="number of fine-tuned checkpoints (default 8)")
    parser.add_argument("--blocks", type=int, default=12, help="transformer blocks (default 12, as ViT-B/32)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant; medians are reported (default 3)")
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "tsv_m"],
                        choices=["task_arithmetic", "tsv_m"],
                        help="merge methods to time, through the engine and naively (default: both)")
    parser.add_argument("--cache", choices=["warm", "cold", "both"], default="both",
                        help="inputs in the page cache, evicted before each variant, or both (default)")
    parser.add_argument("--workdir", type=Path, default=None, help="where inputs are written (default: a temp dir)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        tasks = [args.workdir / f"task{t}.safetensors" for t in range(args.tasks)]
        return run_child(args.child, args.workdir / "base.safetensors", tasks, args.workdir / f"out-{args.child}")
    caches = list(CACHE_STATES) if args.cache == "both" else [args.cache]
    if "cold" in caches and not hasattr(os, "posix_fadvise"):
        raise SystemExit("--cache cold needs os.posix_fadvise (Linux) to evict the inputs from the page cache.")
    folder = Path(tempfile.mkdtemp(prefix="bench_engine_", dir=args.workdir))
    try:
        base, tasks = make_inputs(folder, args.tasks, args.blocks)
        input_bytes = sum(p.stat().st_size for p in [base, *tasks])
        wanted = ("import", "io_floor", "write_floor", "hash_xxh3_128", "hash_sha256",
                  *(f"{kind}_{m}" for m in args.methods for kind in ("engine", "naive")),
                  *([f"engine_task_arithmetic{s}" for s in HASH_VARIANTS if s] + ["core_task_arithmetic"]
                    if "task_arithmetic" in args.methods else []))
        results = {cache: {v: [] for v in VARIANTS if v in wanted} for cache in caches}
        for repeat in range(args.repeats):
            for variant in results[caches[0]]:
                for cache in caches:  # alternated, so that both states see the same moments of a noisy machine
                    run = measure(variant, cache, folder, base, tasks)
                    results[cache][variant].append(run)
                    print(f"repeat {repeat + 1}/{args.repeats} {cache} {variant}: {run}", file=sys.stderr, flush=True)
        for cache in caches:
            report(results[cache], input_bytes, cache)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
