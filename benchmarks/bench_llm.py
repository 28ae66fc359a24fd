"""LLM-shaped merges (issue 19): time per decoder layer and peak memory of ``lightning-merge merge`` on Llama-shaped
Hugging Face folders, extrapolated to 32 layers, against mergekit's ``mergekit-yaml`` on the same folders.

The folders are synthetic but real-shaped (``LlamaConfig``: hidden 4096, MLP 11008, vocabulary 32000, 32 query heads
and 8 key-value heads, untied embeddings, bf16, sharded safetensors with ``model.safetensors.index.json``): the base
is random, each fine-tune adds a rank-16 update plus noise to every matrix. Each merge runs in a fresh subprocess
whose wall time and peak resident memory (``ru_maxrss`` of the child, from ``os.wait4``) are recorded. Time per
layer is the difference between folders of ``--layers`` and 0 decoder layers (the embeddings, the head and the final
norm alone), divided by ``--layers``; 32 layers are ``t(0) + 32 * t(layer)``. Peak memory does not grow with the
layers (one key at a time), so it is reported as measured.

Usage::

    python benchmarks/bench_llm.py --layers 1 --tasks 2 [--mergekit /path/to/mergekit-yaml] [--ranks 1 2]

``--ranks 2`` runs the command under ``python -m torch.distributed.run --nproc-per-node 2``; mergekit rows run
``mergekit-yaml`` with a config of the same merge (``dtype: float32`` for the arithmetic, ``out_dtype: bfloat16``),
and the table also gives the largest absolute difference between the two outputs and the fraction of differing
entries (bf16 magnitudes tie often, and TIES breaks ties at its cut-off differently in the two tools).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

METHODS = ("task_arithmetic", "ties", "tsv_m", "sftm")
OPTIONS = {"task_arithmetic": ["--scaling", "1.0"], "ties": ["--density", "0.5", "--scaling", "1.0"],
           "tsv_m": [], "sftm": []}
MERGEKIT = {"task_arithmetic": {"weight": 1.0}, "ties": {"weight": 1.0, "density": 0.5}}


def llama_config(layers: int, args: argparse.Namespace) -> dict:
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                         num_hidden_layers=layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         tie_word_embeddings=False, torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])
    return config.to_dict()


def layer_shapes(i: int, args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    h, kv = args.hidden, args.hidden // args.heads * args.kv_heads
    p = f"model.layers.{i}."
    return {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (args.mlp, h), p + "mlp.up_proj.weight": (args.mlp, h),
            p + "mlp.down_proj.weight": (h, args.mlp), p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,)}


def shards(layers: int, args: argparse.Namespace) -> list[dict[str, tuple[int, ...]]]:
    """The keys of each shard: the embeddings, one shard per layer, then the final norm and the head."""
    outer = {"model.embed_tokens.weight": (args.vocab, args.hidden)}
    last = {"model.norm.weight": (args.hidden,), "lm_head.weight": (args.vocab, args.hidden)}
    return [outer, *(layer_shapes(i, args) for i in range(layers)), last]


def tensor(key: str, shape: tuple[int, ...], task: int) -> torch.Tensor:
    """The base's value (``task`` 0) or fine-tune ``task``'s, deterministic per key."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    value = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
    if task:
        g.manual_seed(zlib.crc32(f"{key}/{task}".encode()))
        value += 1e-4 * torch.randn(shape, generator=g)
        if len(shape) == 2:
            value += 2e-3 * torch.randn(shape[0], 16, generator=g) @ torch.randn(16, shape[1], generator=g) / 4
    return value.to(torch.bfloat16)


def write_folder(folder: Path, layers: int, task: int, args: argparse.Namespace) -> Path:
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    plan, weight_map, total = shards(layers, args), {}, 0
    for n, keys in enumerate(plan):
        name = f"model-{n + 1:05d}-of-{len(plan):05d}.safetensors"
        state = {k: tensor(k, s, task) for k, s in keys.items()}
        save_file(state, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in state.values())
        weight_map.update(dict.fromkeys(keys, name))
    (folder / "config.json").write_text(json.dumps(llama_config(layers, args), indent=2))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def measure(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds and peak resident MiB of a child process (the largest of its processes)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status:
        raise RuntimeError(f"{argv[:4]} failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
    return seconds, usage.ru_maxrss / 1024


def warm(folders: list[Path]) -> None:
    """Read every input file once, so that each timed run starts with its inputs in the page cache."""
    for folder in folders:
        for path in folder.glob("*.safetensors"):
            with path.open("rb") as handle:
                while handle.read(1 << 24):
                    pass


def ours(method: str, base: Path, tuned: list[Path], out: Path, ranks: int) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    command = ["-m", "lightning_merge.cli", "merge", "--base", str(base), "--finetuned", *map(str, tuned),
               "--method", method, *OPTIONS[method], "--output", str(out), "--quiet", "--hash", "none"]
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // ranks))}
    return measure([sys.executable, *launcher, *command], env)


def theirs(mergekit: str, method: str, base: Path, tuned: list[Path], out: Path) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    config = {"merge_method": method, "base_model": str(base), "dtype": "float32", "out_dtype": "bfloat16",
              "models": [{"model": str(t), "parameters": MERGEKIT[method]} for t in tuned]}
    path = out.parent / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(config))
    return measure([mergekit, str(path), str(out), "--quiet", "--lazy-unpickle"])


def max_difference(a: Path, b: Path) -> tuple[float, float]:
    def tensors(folder: Path) -> dict[str, tuple[Path, str]]:
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"] if (
            folder / "model.safetensors.index.json").is_file() else None
        files = sorted(folder.glob("*.safetensors"))
        keys = {}
        for f in files:
            with safe_open(str(f), "pt") as handle:
                keys.update({k: (f, k) for k in handle.keys()})
        assert index is None or set(index) == set(keys)
        return keys

    ka, kb = tensors(a), tensors(b)
    assert set(ka) == set(kb), sorted(set(ka) ^ set(kb))[:5]
    worst, differing, total = 0.0, 0, 0
    for key, (fa, _) in ka.items():
        with safe_open(str(fa), "pt") as ha, safe_open(str(kb[key][0]), "pt") as hb:
            x, y = ha.get_tensor(key).float(), hb.get_tensor(key).float()
        worst = max(worst, float((x - y).abs().max()))
        differing, total = differing + int((x != y).sum()), total + x.numel()
    return worst, differing / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--ranks", nargs="+", type=int, default=[1])
    parser.add_argument("--mergekit", default=None, help="path of mergekit-yaml (its own venv), or none")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_llm"))
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool and folder (medians)")
    args = parser.parse_args()
    folders = {}
    for layers in (0, args.layers):
        root = args.workdir / f"L{layers}"
        folders[layers] = [write_folder(root / f"m{t}", layers, t, args) for t in range(args.tasks + 1)]
    size = sum(f.stat().st_size for f in folders[args.layers][0].glob("*.safetensors")) / 2**30
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Llama shapes hidden {args.hidden}, MLP"
          f" {args.mlp}, vocab {args.vocab}, GQA {args.heads}/{args.kv_heads}, untied, bf16; T={args.tasks};"
          f" {args.layers}-layer folder {size:.2f} GiB")
    rows = []
    for method in args.methods:
        runs = [(f"lightning-merge {r} rank{'s' * (r > 1)}", lambda L, r=r, m=method: ours(
            m, folders[L][0], folders[L][1:], args.workdir / f"ours{r}_{L}", r)) for r in args.ranks]
        if args.mergekit and method in MERGEKIT:
            runs.append(("mergekit-yaml", lambda L, m=method: theirs(args.mergekit, m, folders[L][0], folders[L][1:],
                                                                     args.workdir / f"theirs_{L}")))
        for tool, run in runs:
            times: dict[int, list[float]] = {0: [], args.layers: []}
            peak = 0.0
            for _ in range(args.repeats):  # alternated, medians: single runs here vary by seconds
                for layers in times:
                    warm(folders[layers])
                    seconds, rss = run(layers)
                    times[layers].append(seconds)
                    peak = max(peak, rss) if layers == args.layers else peak
            t0, t1 = (statistics.median(times[layers]) for layers in (0, args.layers))
            per_layer = (t1 - t0) / args.layers
            rows.append({"method": method, "tool": tool, "s_layer": per_layer, "s_32": t0 + 32 * per_layer,
                         "peak_mib": peak})
        if args.mergekit and method in MERGEKIT:
            rows[-1]["max_abs_diff"], rows[-1]["differing"] = max_difference(args.workdir / f"ours1_{args.layers}",
                                                      args.workdir / f"theirs_{args.layers}")
    print(f"{'method':16} {'tool':24} {'s/layer':>8} {'s @32 layers':>13} {'peak MiB':>9} {'x mergekit':>10}"
          f" {'max |diff|':>10} {'differing':>9}")
    for row in rows:
        ref = next((r for r in rows if r["method"] == row["method"] and r["tool"] == "mergekit-yaml"), None)
        ratio = f"{ref['s_32'] / row['s_32']:.2f}" if ref else ""
        diff = f"{row['max_abs_diff']:.1e} {row['differing']:9.2e}" if "max_abs_diff" in row else ""
        print(f"{row['method']:16} {row['tool']:24} {row['s_layer']:8.1f} {row['s_32']:13.0f} {row['peak_mib']:9.0f}"
              f" {ratio:>10} {diff:>10}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
