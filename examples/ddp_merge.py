"""Multi-process: the digits job's merge phase with DDP, 2 CPU processes.

    python examples/ddp_merge.py [--fast] [--out runs/ddp_merge] [--from runs/digits_job]

1. Pre-train the digits MLP and fine-tune it on the 8 tasks exactly as ``digits_job.py`` does (one process, its
   ``MergeCallback`` leaves the snapshots in ``<out>/merge``), or, with ``--from``, take the snapshots a digits job
   run left in ``<from>/merge``.
2. Merge them with TSV-M in a ``MergeCallback`` (workflow 2: ``base=..., finetuned={task: snapshot}``) at the end of
   a ``Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn")`` fit that trains nothing: ``shard_keys`` gives
   each rank parameters of about equal merge cost, each rank merges its share, and the merged tensors are exchanged
   through the strategy, so both ranks end with the whole merged model.
3. Print which keys each rank merged (with its share of the estimated cost), the merge time, a check that both ranks
   hold bitwise the same weights (a sha256 of each rank's weights, all-gathered through ``trainer.strategy``) and the
   largest difference from a single-process merge of the same snapshots.

``ddp_spawn`` rather than ``ddp``: ``ddp`` starts the second process by re-running this script, which would repeat
the fine-tunes; ``ddp_spawn`` pickles the trainer into the child processes instead. About 40 s with ``--fast`` on 2
CPU cores, about 2 minutes without.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from digits import TASKS, DigitNet, Digits
from digits_job import fine_tune, pretrain
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_merge import MergeCallback, get_method
from lightning_merge.engine import merge_keys, plan_merge, shard_keys
from lightning_merge.io import open_source

METHOD = get_method("tsv_m")
EXCLUDE = ["head.*"]
WORLD_SIZE = 2


class RankChecksums(Callback):
    """After the merge, every rank hashes its module's weights; rank zero writes the digests and its thread count."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        digest = state_digest(pl_module.state_dict())
        gathered = trainer.strategy.all_gather(torch.frombuffer(bytearray(digest), dtype=torch.int64))
        if trainer.is_global_zero:
            digests = [row.numpy().tobytes().hex() for row in gathered.reshape(trainer.world_size, -1)]
            self.path.write_text(json.dumps({"digests": digests, "threads": torch.get_num_threads()}))
        trainer.strategy.barrier("RankChecksums")


def state_digest(state: dict[str, torch.Tensor]) -> bytes:
    sha = hashlib.sha256()
    for key in sorted(state):
        sha.update(key.encode())
        sha.update(state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.digest()


def snapshots(folder: Path) -> tuple[Path, dict[str, Path]]:
    """The main job's ``merge/`` layout: ``base`` and one ``task-<i>-<name>`` folder per task, in TASKS order."""
    tasks = {task: folder / f"task-{i:02d}-{task}" for i, task in enumerate(TASKS)}
    missing = [str(p) for p in [folder / "base", *tasks.values()] if not p.is_dir()]
    if missing:
        raise SystemExit(f"missing snapshots {missing}; run examples/digits_job.py first or drop --from")
    return folder / "base", tasks


def ddp_merge(base: Path, tasks: dict[str, Path], out: Path) -> Path:
    """The merge phase: a 2-process fit of zero batches whose end runs the MergeCallback, then the checksums."""
    model = DigitNet()
    model.load_state_dict(read_state(base))
    merge = MergeCallback(METHOD, base=base, finetuned=tasks, exclude=EXCLUDE, dirpath=out / "ddp", progress=False)
    checksums = out / "ddp" / "rank_checksums.json"
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD_SIZE, strategy="ddp_spawn", max_epochs=1,
                         limit_train_batches=0, callbacks=[merge, RankChecksums(checksums)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=out)
    trainer.fit(model, DataLoader(TensorDataset(torch.zeros(1, 64), torch.zeros(1, dtype=torch.long))))
    return out / "ddp"


def read_state(path: Path) -> dict[str, torch.Tensor]:
    source = open_source(path)
    return {key: source.get_tensor(key) for key in source.keys()}


def print_shards(base: Path, tasks: dict[str, Path]) -> None:
    """The assignment the callback computed on every rank: ``shard_keys`` is deterministic, so it is recomputed."""
    sources = [open_source(p) for p in tasks.values()]
    plan = plan_merge(open_source(base), sources, exclude=EXCLUDE)
    shards = shard_keys(plan, METHOD, len(sources), WORLD_SIZE)
    costs = [sum(METHOD.cost(plan.shapes[k], len(sources)) for k in keys) for keys in shards]
    for rank, (keys, cost) in enumerate(zip(shards, costs, strict=True)):
        print(f"rank {rank} merged {len(keys)} keys, {cost / sum(costs):5.1%} of the estimated cost: {', '.join(keys)}")


def print_checks(base: Path, tasks: dict[str, Path], merged: Path) -> None:
    ranks = json.loads((merged / "rank_checksums.json").read_text())
    digests = ranks["digests"]
    same = "identical" if len(set(digests)) == 1 else "DIFFERENT"
    print(f"rank weights sha256: {', '.join(d[:12] for d in digests)} -> {same} on the {len(digests)} ranks")
    sources = [open_source(p) for p in tasks.values()]
    keys = plan_merge(open_source(base), sources, exclude=EXCLUDE).merge_keys
    ddp = open_source(merged / "merged")
    torch.set_num_threads(ranks["threads"])  # the SVDs' float rounding depends on the thread count
    diffs = [(ddp.get_tensor(k) - ref).abs().max().item()
             for k, ref in merge_keys(METHOD, open_source(base), sources, keys)]
    verdict = "bitwise equal" if max(diffs) == 0 else f"max |diff| {max(diffs):.1e}"
    print(f"2-rank merge vs a single-process merge_keys over {len(keys)} keys, {ranks['threads']} thread(s) like"
          f" each rank: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="fewer training steps (about 40 s)")
    parser.add_argument("--out", type=Path, default=Path("runs/ddp_merge"), help="where files are written")
    parser.add_argument("--from", dest="source", type=Path, default=None,
                        help="a main job output folder: merge its merge/ snapshots instead of fine-tuning")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    pl.seed_everything(args.seed, verbose=False)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.source is None:
        pre_steps, ft_steps = (100, 15) if args.fast else (1500, 300)
        data = Digits(seed=args.seed)
        fine_tune(data, pretrain(data, args.out, pre_steps), args.out, ft_steps)
    base, tasks = snapshots((args.source or args.out) / "merge")
    start = time.perf_counter()
    merged = ddp_merge(base, tasks, args.out)
    record = json.loads((merged / "merged" / "merge_record.json").read_text())
    print(f"merged {len(tasks)} tasks with {record['method']} on {record['world_size']} ranks (ddp_spawn) in"
          f" {record['seconds']:.2f} s (fit with process start-up: {time.perf_counter() - start:.1f} s)")
    print_shards(base, tasks)
    print_checks(base, tasks, merged)
    print(f"merged model in {merged / 'merged'}")


if __name__ == "__main__":
    main()
