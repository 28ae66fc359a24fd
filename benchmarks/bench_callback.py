"""MergeCallback at fit end on 1 and on 2 CPU ranks (one thread each): ViT-B/32 shapes, T = 8, TSV-M (issue #4).

    python benchmarks/bench_callback.py [--blocks 12] [--tasks 8] [--repeats 3] [--target 1.6]

Synthetic checkpoints with the shapes of ViT-B/32's transformer (``--blocks`` residual blocks: attention in_proj
2304x768 + bias, out_proj 768x768 + bias, MLP fc 3072x768 + bias and proj 768x3072 + bias, two layer norms) are saved
as safetensors in a temporary folder: a random base and ``--tasks`` fine-tunes whose 2-D task deltas are low
effective rank plus noise (``realistic_tasks`` of bench_core.py, one task at a time) and whose 1-D deltas are small
noise. Each run is one ``Trainer.fit`` of zero batches with ``MergeCallback("tsv_m", base=..., finetuned={...})``
(workflow 2), so the merge happens at fit end: ``devices=1``, then ``devices=2, strategy="ddp_spawn"``, alternated
``--repeats`` times. Every process runs with one thread (``OMP_NUM_THREADS=1`` for the whole run, and the module's
``setup`` sets it again), so the 1-rank run is a fair baseline. The time is ``MergeCallback.merge_seconds``: plan,
shard, merge and exchange, not the process start-up. Prints each rank's share of the estimated cost
(``shard_keys``), the medians, the speed-up and PASS/FAIL against ``--target``.

About 8 minutes with 12 blocks on 2 free cores (``--blocks 4``: about 3); other jobs on the machine slow the 2-rank
runs first, since they need both cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import zlib
from collections import OrderedDict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, inherited by the ddp_spawn processes

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from bench_core import realistic_tasks  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_merge import MergeCallback, get_method  # noqa: E402
from lightning_merge.engine import plan_merge, shard_keys  # noqa: E402
from lightning_merge.io import open_source  # noqa: E402

METHOD = get_method("tsv_m")
WIDTH, HEADS, MLP = 768, 12, 3072


class Block(nn.Module):
    """A ViT-B/32 residual block's parameters (open_clip names); never run."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS)
        self.ln_2 = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(WIDTH, MLP), gelu=nn.GELU(), c_proj=nn.Linear(MLP, WIDTH)))


class VitShapes(pl.LightningModule):
    """The blocks are built in ``configure_model``, in each process, so ddp_spawn pickles an empty module."""

    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.num_blocks = blocks
        self.blocks: nn.ModuleList | None = None

    def configure_model(self) -> None:
        if self.blocks is None:
            self.blocks = nn.ModuleList(Block() for _ in range(self.num_blocks))

    def setup(self, stage: str) -> None:
        torch.set_num_threads(1)

    def training_step(self, batch: object, batch_idx: int) -> None:
        raise AssertionError("the benchmark fits zero batches")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class MergeReport(Callback):
    """Rank zero writes the MergeCallback's ``merge_seconds`` and its thread count (ddp_spawn keeps them in the
    child processes)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            merge = next(c for c in trainer.callbacks if isinstance(c, MergeCallback))
            self.path.write_text(json.dumps({"seconds": merge.merge_seconds, "threads": torch.get_num_threads()}))


def shapes(blocks: int) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        module = nn.ModuleDict({"blocks": nn.ModuleList(Block() for _ in range(blocks))})
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def task_delta(key: str, shape: tuple[int, ...], tasks: int, seed: int) -> torch.Tensor:
    """A 2-D delta of effective rank ``min(shape) // tasks`` plus 0.1% noise, scaled to 1e-3 per entry; 1-D noise."""
    seed = zlib.crc32(key.encode()) + 1000 * seed
    if len(shape) != 2:
        return 1e-3 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    delta = realistic_tasks(shape, 1, 1e-3, seed, min(shape) // tasks)[0]
    return delta * (1e-3 * delta.numel() ** 0.5 / delta.norm())


def write_checkpoints(folder: Path, blocks: int, tasks: int) -> tuple[Path, dict[str, Path]]:
    """A random base and ``tasks`` fine-tunes as safetensors files, one task in memory at a time."""
    g = torch.Generator().manual_seed(0)
    base = {k: 0.02 * torch.randn(s, generator=g) for k, s in shapes(blocks).items()}
    save_file(base, str(folder / "base.safetensors"))
    paths = {f"task{t}": folder / f"task{t}.safetensors" for t in range(tasks)}
    for t, path in enumerate(paths.values()):
        save_file({k: w + task_delta(k, tuple(w.shape), tasks, t) for k, w in base.items()}, str(path))
    return folder / "base.safetensors", paths


def print_balance(base: Path, tasks: dict[str, Path]) -> None:
    sources = [open_source(p) for p in tasks.values()]
    plan = plan_merge(open_source(base), sources)
    for world in (1, 2):
        shards = shard_keys(plan, METHOD, len(sources), world)
        costs = [sum(METHOD.cost(plan.shapes[k], len(sources)) for k in keys) for keys in shards]
        shares = ", ".join(f"rank {r}: {len(keys)} keys {cost / sum(costs):.1%}"
                           for r, (keys, cost) in enumerate(zip(shards, costs, strict=True)))
        print(f"shard_keys, {world} rank(s): {shares} of {sum(costs) / 1e9:.0f} GFLOP (estimated)")


def time_merge(blocks: int, base: Path, tasks: dict[str, Path], devices: int, folder: Path) -> dict[str, float]:
    """One fit of zero batches whose end runs the merge; returns rank zero's ``merge_seconds`` and thread count."""
    report = folder / f"report-{devices}.json"
    merge = MergeCallback(METHOD, base=base, finetuned=tasks, save_merged=False, progress=False)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                         max_epochs=1, limit_train_batches=0, callbacks=[merge, MergeReport(report)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=folder)
    trainer.fit(VitShapes(blocks), DataLoader(TensorDataset(torch.zeros(1))))
    return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=12, help="residual blocks (ViT-B/32 has 12)")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target", type=float, default=1.6, help="the speed-up to pass")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory(prefix="bench_callback-") as tmp:
        folder = Path(tmp)
        base, tasks = write_checkpoints(folder, args.blocks, args.tasks)
        size = sum(p.stat().st_size for p in [base, *tasks.values()]) / 2**30
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']};"
              f" {args.blocks} ViT-B/32 blocks, T={args.tasks}, {METHOD.name}, {size:.1f} GiB of checkpoints")
        print_balance(base, tasks)
        times: dict[int, list[float]] = {1: [], 2: []}
        for repeat in range(args.repeats):
            for devices in times:
                result = time_merge(args.blocks, base, tasks, devices, folder)
                times[devices].append(result["seconds"])
                print(f"repeat {repeat + 1}: {devices} rank(s), {result['threads']} thread(s) each:"
                      f" {result['seconds']:6.1f} s", flush=True)
    print_table(times, args.target)


def print_table(times: dict[int, list[float]], target: float) -> None:
    medians = {d: statistics.median(t) for d, t in times.items()}
    print(f"{'ranks':>5}{'median s':>10}{'min s':>8}{'max s':>8}")
    for devices, values in times.items():
        print(f"{devices:>5}{medians[devices]:10.1f}{min(values):8.1f}{max(values):8.1f}")
    speedup = medians[1] / medians[2]
    print(f"speed-up 2 ranks vs 1: {speedup:.2f}x -> {'PASS' if speedup >= target else 'FAIL'} (target {target}x)")


if __name__ == "__main__":
    main()
