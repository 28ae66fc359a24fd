"""The digits job: a quick fine-tune-then-merge on bundled data, offline, with a per-task table.

    python examples/digits_job.py [--fast] [--out runs/digits_job]

1. Pre-train a small MLP once on the digits in four orientations (scikit-learn's bundled digits, see digits.py).
2. Fine-tune it on 8 tasks (the 8 symmetries of the square), one ordinary ``Trainer.fit`` each, with one
   ``MergeCallback`` that records every task and merges them with TSV-M when the last fit ends.
3. Merge the same fine-tunes with average, task arithmetic, TIES, TSV-M, SFTM and SFTM on orthogonalized bases,
   choose each method's scaling coefficient on the validation split, and score everything on the test split with
   ``MergedEvalLoop``: the table (pre-trained, own fine-tuned, each method, normalized means, chosen
   coefficients) is printed and written as CSV, JSON and PNG under ``--out``.

About 3 minutes on 2 CPU cores; ``--fast`` (fewer steps, a coarser grid) takes about one.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from digits import PRETRAIN, TASKS, DigitNet, Digits

from lightning_merge import MergeCallback, get_method
from lightning_merge.engine import task_matrices
from lightning_merge.evaluation import MergedEvalLoop

METHODS = {
    "average": get_method("average"),
    "task_arithmetic": get_method("task_arithmetic"),
    "ties": get_method("ties", density=0.2),
    "tsv_m": get_method("tsv_m"),
    "sftm": get_method("sftm"),
    "sftm_orthogonal": get_method("sftm", basis="orthogonal"),
}


def trainer(out: Path, steps: int) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)


def pretrain(data: Digits, out: Path, steps: int) -> dict[str, torch.Tensor]:
    model = DigitNet(lr=1e-3)
    trainer(out, steps).fit(model, data.pretrain_loader())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fine_tune(data: Digits, pretrained: dict[str, torch.Tensor], out: Path, steps: int) -> MergeCallback:
    # each fit names its task; overwrite=True: a run re-started after an interruption records each task again
    merge = MergeCallback("tsv_m", tasks=list(TASKS), exclude=["head.*"], dirpath=out / "merge", progress=False,
                          overwrite=True)
    for i, task in enumerate(TASKS):
        merge.task = task
        start = time.perf_counter()
        model = DigitNet(lr=5e-4)
        model.load_state_dict(pretrained)  # every task starts from the pre-trained weights
        fit = trainer(out, steps)
        fit.callbacks.append(merge)
        fit.fit(model, data.loader(task, "train", shuffle=True))
        print(f"[{i + 1}/{len(TASKS)}] fine-tuned {task:<15} {time.perf_counter() - start:5.1f} s", flush=True)
    return merge


def compare(data: Digits, merge: MergeCallback, grid: list[float]):
    keys = list(merge.plan.merge_keys)
    base = {k: merge.base_source.get_tensor(k) for k in keys}
    tasks = merge.task_sources
    finetuned = {t: {**{k: s.get_tensor(k) for k in keys}, **merge.heads[t]} for t, s in tasks.items()}
    deltas = {name: dict(task_matrices(method, merge.base_source, list(tasks.values()), keys))
              for name, method in METHODS.items()}
    loop = MergedEvalLoop({t: data.loader(t, "test") for t in TASKS}, heads=merge.heads)
    val = {t: data.loader(t, "val") for t in TASKS}
    return loop.compare(DigitNet(), base, deltas, finetuned, val_dataloaders=val, grid=grid, verbose=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="a one-minute version (fewer steps, coarser grid)")
    parser.add_argument("--out", type=Path, default=Path("runs/digits_job"), help="where files are written")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    pl.seed_everything(args.seed, verbose=False)
    pre_steps, ft_steps = (300, 60) if args.fast else (1500, 300)
    grid = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5] if args.fast else [0.05] + [round(0.1 * i, 1) for i in range(1, 21)]
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = Digits(seed=args.seed)
    pretrained = pretrain(data, args.out, pre_steps)
    print(f"pre-trained on {', '.join(PRETRAIN)} in {time.perf_counter() - start:.1f} s", flush=True)
    merge = fine_tune(data, pretrained, args.out, ft_steps)
    print(f"MergeCallback merged {len(TASKS)} tasks with tsv_m in {merge.merge_seconds:.2f} s", flush=True)
    report = compare(data, merge, grid)
    print(report.to_table())
    report.to_csv(args.out / "report.csv")
    report.to_json(args.out / "report.json")
    _plot(report, args.out / "report.png")
    summary(report)
    print(f"done in {time.perf_counter() - start:.0f} s; files in {args.out}")


def _plot(report, path: Path) -> None:
    try:
        report.plot(path)
    except ImportError as err:  # matplotlib is an optional extra
        print(f"no plot: {err}")


def summary(report) -> None:
    ta = report.normalized_mean("task_arithmetic")
    for name in ("tsv_m", "sftm", "sftm_orthogonal"):
        verdict = ">=" if report.normalized_mean(name) >= ta else "<"
        print(f"{name}: mean normalized accuracy {report.normalized_mean(name):.3f} {verdict} task arithmetic at its"
              f" best scaling {ta:.3f}")


if __name__ == "__main__":
    main()
