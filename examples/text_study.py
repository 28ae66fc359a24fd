"""Studies on the text job's recorded fine-tunes (examples/text_job.py), without fine-tuning again.

    python examples/text_study.py [--from runs/text_job/merge] [--out runs/text_study] [--fast]

A ``MergeCallback`` with the job's ``tasks`` and ``dirpath`` (``--from``) adopts the recorded run there
(``merge_collected``: the pre-trained snapshot, each task's fine-tune and its head); the job's ``job.json`` (next to
the folder) gives the same class-balanced validation and test splits and the ``lam`` grid. One
``MergedEvalLoop.compare_callback`` scores the pre-trained body, each fine-tune, average and the TSV-C rows, and
``MergedEvalLoop.compare`` the methods' timed matrices (``merge.task_matrices``, not computed again): ``lam`` chosen
on validation, scores on test, each task with its own fine-tuned head; every method is also scored at ``lam = 1``.

a. Embeddings (issue 15, item 5): TSV-M and SFTM with ``embeddings="matrix"`` (the 30522 x 384 word embedding merged
   by its singular vectors like every matrix) against ``embeddings="average"`` (vocabulary-sized matrices averaged):
   the time of ``merge.task_matrices`` (median of ``--repeats``, ``time.perf_counter``) and the mean normalized test
   accuracy (merged / own fine-tune) at the chosen ``lam`` and at ``lam = 1``.
b. SFTM fits (issue 20): ``fit`` response / mapping x ``basis`` features / orthogonal beside TSV-M, at ``lam = 1`` and
   at the chosen ``lam``.
c. TSV-C (issue 18, part 4): task-routed compressed models (task ``t`` scored with ``W0 + trunc_k(D_t)`` and its
   head) keeping 1%, 3%, 10% and 30% of each matrix's singular components (``TSVC(rank=f)``): each task's retained
   accuracy (compressed / own fine-tune), the mean, the size ratio (bytes of the compressed update over the full task
   vector's, from ``compress_checkpoints``' record; ``--fast``: at 10% only, the others computed as
   ``sum k (m + n + 1)`` plus the other parameters) and the smallest fraction with a mean retained accuracy >= 0.99.

Tables are printed and written to ``<out>/study.json``; plots to ``<out>/{embeddings,sftm_fits,tsv_c}.png``.
``--fast``: at most 24 validation and 48 test examples per task, a 3-value grid, one timing repeat, TSV-C at 1% and
10% only.
About 5 minutes on 2 CPU cores after the full job, well under one after ``text_job.py --fast``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from text_job import Budget, make_batches, quiet
from text_tasks import Batches, TextClassifier, collate, load_tasks, model_dir
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from lightning_merge import MergeCallback, get_method
from lightning_merge.compress import TSVC, compress_checkpoints
from lightning_merge.evaluation import MergedEvalLoop, MergeReport
from lightning_merge.evaluation.search import apply_scaling
from lightning_merge.functional.compress import compressed_numel

EMBEDDINGS = {  # a: (method, embeddings)
    "tsv_m": get_method("tsv_m", embeddings="matrix"),
    "tsv_m_emb_average": get_method("tsv_m", embeddings="average"),  # the default
    "sftm": get_method("sftm", embeddings="matrix"),
    "sftm_emb_average": get_method("sftm", embeddings="average"),  # the default
}
FITS = {  # b: (fit, basis); tsv_m (above) beside them
    "sftm": ("response", "features"),
    "sftm_orthogonal": ("response", "orthogonal"),
    "sftm_mapping": ("mapping", "features"),
    "sftm_mapping_orthogonal": ("mapping", "orthogonal"),
}
# b's variants merge the word embedding as a matrix too, so that its sftm and tsv_m rows are table a's "matrix" rows
METHODS = {**EMBEDDINGS, **{name: get_method("sftm", fit=fit, basis=basis, embeddings="matrix")
                            for name, (fit, basis) in FITS.items()}}
FRACTIONS = (0.01, 0.03, 0.1, 0.3)  # c: kept fractions of each matrix's singular components
FAST_FRACTIONS = (0.01, 0.1)


def row_name(fraction: float) -> str:
    return f"tsv_c_{fraction:.0%}"


def balanced(batches: Batches, task: str, split: str, limit: int) -> DataLoader:
    """The first ``limit // num_classes`` examples of each class of a (class-balanced) split, sorted by length."""
    classes = batches.tasks[task].num_classes
    examples = batches.data[task][split]
    chosen = [e for c in range(classes) for e in [x for x in examples if x[1] == c][: limit // classes]]
    chosen.sort(key=lambda e: len(e[0]))
    return DataLoader(chosen, batch_size=batches.eval_batch_size, collate_fn=collate)


def adopt(folder: Path, tasks: list[str]) -> MergeCallback:
    """The job's recorded run: a callback with its tasks and dirpath, merged (average, cheap, nothing written)."""
    merge = MergeCallback("average", tasks=tasks, exclude=["head.*"], dirpath=folder, save_merged=False,
                          progress=False)
    merge.merge_collected(TextClassifier(2))
    return merge


def time_matrices(merge: MergeCallback, repeats: int) -> tuple[dict[str, dict], dict[str, list[float]]]:
    matrices, seconds = {}, {}
    for name, method in METHODS.items():
        runs = repeats if name in EMBEDDINGS else 1
        seconds[name] = []
        for _ in range(runs):
            start = time.perf_counter()
            matrices[name] = merge.task_matrices({name: method}, progress=False)[name]
            seconds[name].append(time.perf_counter() - start)
    return matrices, seconds


def score(loop: MergedEvalLoop, model: TextClassifier, merge: MergeCallback, matrices: dict[str, dict],
          val: dict[str, DataLoader], grid: tuple[float, ...], fractions: tuple[float, ...]) -> MergeReport:
    """One report: ``compare_callback`` for the pre-trained and fine-tuned rows, average (cheap) and the TSV-C rows,
    ``compare`` for the timed methods' matrices (not computed again)."""
    compressed = {row_name(f): TSVC(rank=f) for f in fractions}
    first = loop.compare_callback(model, merge, {"average": get_method("average")}, val_dataloaders=val, grid=grid,
                                  progress=False, verbose=False, compressed=compressed)
    base = {k: merge.base_source.get_tensor(k) for k in merge.plan.merge_keys}
    methods = loop.compare(model, base, matrices, None, val_dataloaders=val, grid=grid, verbose=False)
    rows = {**{k: v for k, v in first.rows.items() if k not in first.routed}, **{m: methods.rows[m] for m in
            methods.methods}, **{r: first.rows[r] for r in first.routed}}
    return MergeReport(first.metric, rows, {**first.scaling, **methods.scaling}, {**first.curves, **methods.curves},
                       first.higher_is_better, list(first.routed))


def at_lam_one(loop: MergedEvalLoop, model: TextClassifier, merge: MergeCallback, matrices: dict[str, dict],
               report: MergeReport) -> dict[str, dict[str, float]]:
    """Every method at ``lam = 1`` on test: ``{method: {task: normalized}}`` plus ``"mean"``."""
    base = {k: merge.base_source.get_tensor(k) for k in merge.plan.merge_keys}
    own = report.rows["finetuned"].scores
    out = {}
    for name, matrix in matrices.items():
        apply_scaling(model, base, matrix, 1.0)
        scores = loop.run(model, log=False).scores
        norm = {t: scores[t][loop.metric] / own[t][loop.metric] for t in scores}
        out[name] = {**norm, "mean": sum(norm.values()) / len(norm),
                     "accuracy": sum(s[loop.metric] for s in scores.values()) / len(scores)}
    return out


def size_ratio(merge: MergeCallback, fraction: float) -> float:
    """Numbers a task's TSV-C update stores over its task vector's: ``sum k (m + n + 1)`` over the matrix keys, with
    ``k = max(1, floor(f min(m, n)))``, plus the other merged keys whole."""
    plan = merge.plan
    full = sum(math.prod(plan.shapes[k]) for k in plan.merge_keys)
    small = 0
    for key in plan.merge_keys:
        shape = plan.shapes[key]
        if key in plan.matrix_keys:
            small += compressed_numel((shape[0], shape[1]), max(1, math.floor(fraction * min(shape))))
        else:
            small += math.prod(shape)
    return small / full


def record_ratio(merge: MergeCallback, fraction: float) -> float:
    """The same ratio from ``compress_checkpoints``' record (bytes), for the check."""
    with tempfile.TemporaryDirectory() as tmp:
        record = compress_checkpoints(merge.base_source, merge.task_sources, Path(tmp) / "c", rank=fraction,
                                      exclude=["head.*"], format="safetensors", input_hash=None, progress=False)
    return record.compression["ratio"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", type=Path, default=Path("runs/text_job/merge"),
                        help="the text job's MergeCallback dirpath")
    parser.add_argument("--out", type=Path, default=Path("runs/text_study"))
    parser.add_argument("--fast", action="store_true", help="fewer evaluation examples, 3 lams, one timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings per embeddings variant (median)")
    args = parser.parse_args()
    quiet()
    start = time.perf_counter()
    job_file = args.source.parent / "job.json"
    if not job_file.is_file():
        raise SystemExit(f"Expected {job_file} next to {args.source}: run examples/text_job.py first.")
    job = json.loads(job_file.read_text())
    budget = Budget(**{**job["budget"], "grid": tuple(job["budget"]["grid"])})
    num_val, num_test, grid, repeats = budget.num_val, budget.num_test, budget.grid, args.repeats
    if args.fast:
        num_val, num_test, repeats = min(num_val, 24), min(num_test, 48), 1
        grid = tuple(sorted({grid[0], 1.0, grid[-1]}))
    tasks = [t for t in load_tasks() if t.name in job["tasks"]]
    batches = make_batches(tasks, AutoTokenizer.from_pretrained(model_dir()), budget, job["seed"])
    test = {t.name: balanced(batches, t.name, "test", num_test) for t in tasks}
    val = {t.name: balanced(batches, t.name, "val", num_val) for t in tasks}
    merge = adopt(args.source, [t.name for t in tasks])
    shapes = ", ".join(f"{t} {tuple(h['head.weight'].shape)}" for t, h in merge.heads.items())
    print(f"adopted {len(merge.task_sources)} recorded fine-tunes from {args.source} ({len(merge.plan.merge_keys)}"
          f" merged keys; heads {shapes}); {num_val} val / {num_test} test examples per task, grid {grid}")
    args.out.mkdir(parents=True, exist_ok=True)

    mark = time.perf_counter()
    matrices, seconds = time_matrices(merge, repeats)
    print(f"timed the merged task matrices of {len(METHODS)} methods in {time.perf_counter() - mark:.0f} s", flush=True)
    mark = time.perf_counter()
    loop = MergedEvalLoop.from_callback(merge, test)
    model = TextClassifier(2)
    fractions = FAST_FRACTIONS if args.fast else FRACTIONS
    report = score(loop, model, merge, matrices, val, grid, fractions)
    print(f"scored {len(report.rows)} rows ({len(grid)} lams on validation per method) in"
          f" {time.perf_counter() - mark:.0f} s", flush=True)
    mark = time.perf_counter()
    one = at_lam_one(loop, model, merge, matrices, report)
    print(f"scored {len(matrices)} methods at lam = 1 in {time.perf_counter() - mark:.0f} s", flush=True)
    print(report.to_table())
    report.to_json(args.out / "report.json")

    study = {"source": str(args.source), "fast": args.fast, "grid": list(grid), "num_val": num_val,
             "num_test": num_test, "finetuned": report.rows["finetuned"].mean[report.metric]}
    study["embeddings"] = embeddings_table(report, one, seconds)
    study["sftm_fits"] = fits_table(report, one)
    study["tsv_c"] = tsv_c_table(report, merge, fractions, args.fast)
    (args.out / "study.json").write_text(json.dumps(study, indent=2))
    plots(study, args.out)
    print(f"done in {time.perf_counter() - start:.0f} s; files in {args.out}")


def embeddings_table(report: MergeReport, one: dict, seconds: dict[str, list[float]]) -> dict[str, dict]:
    rows = {}
    print("\na. embeddings: vocabulary-sized matrices (the 30522 x 384 word embedding) merged by their singular"
          " vectors (matrix) or averaged (average)")
    print(f"{'method':<8} {'embeddings':<10} {'seconds (median)':>16} {'norm@lam*':>9} {'lam*':>5} {'norm@1':>7}")
    for name in EMBEDDINGS:
        method, kind = name.split("_emb_")[0] if "_emb_" in name else name, "average" if "_emb_" in name else "matrix"
        rows[name] = {"method": method, "embeddings": kind, "seconds": statistics.median(seconds[name]),
                      "all_seconds": seconds[name], "normalized": report.normalized_mean(name),
                      "lam": report.scaling[name], "normalized_lam1": one[name]["mean"],
                      "per_task": report.normalized(name), "per_task_lam1": {k: v for k, v in one[name].items()
                                                                             if k not in ("mean", "accuracy")}}
        r = rows[name]
        print(f"{method:<8} {kind:<10} {r['seconds']:16.2f} {r['normalized']:9.4f} {r['lam']:5.2f}"
              f" {r['normalized_lam1']:7.4f}")
    return rows


def fits_table(report: MergeReport, one: dict) -> dict[str, dict]:
    rows = {}
    print("\nb. SFTM fits (issue 20) beside TSV-M: mean normalized accuracy")
    print(f"{'method':<24} {'fit':<9} {'basis':<10} {'norm@1':>7} {'norm@lam*':>9} {'lam*':>5}")
    for name, (fit, basis) in {"tsv_m": ("-", "-"), **FITS}.items():
        rows[name] = {"fit": fit, "basis": basis, "normalized_lam1": one[name]["mean"],
                      "normalized": report.normalized_mean(name), "lam": report.scaling[name]}
        r = rows[name]
        print(f"{name:<24} {fit:<9} {basis:<10} {r['normalized_lam1']:7.4f} {r['normalized']:9.4f} {r['lam']:5.2f}")
    return rows


def tsv_c_table(report: MergeReport, merge: MergeCallback, fractions: tuple[float, ...], fast: bool) -> dict:
    """Retained accuracy per task and kept fraction; the size ratio computed (``k = max(1, floor(f r))`` per matrix,
    an upper bound) and from ``compress_checkpoints``' record (the ranks kept: a matrix of lower rank than ``k``, e.g.
    a position embedding of which only the first ``max_length`` rows were trained, keeps fewer)."""
    rows = {}
    tasks = report.tasks
    mark = time.perf_counter()
    recorded = {f: record_ratio(merge, f) for f in ((0.1,) if fast else fractions)}
    print(f"\ncompress_checkpoints at {', '.join(f'{f:.0%}' for f in recorded)} in {time.perf_counter() - mark:.1f} s")
    print("c. TSV-C, task-routed: retained accuracy (compressed / own fine-tune) per task; size ratio (compressed"
          " update / full task vector): from compress_checkpoints' record and computed with k = floor(f r)")
    print(f"{'kept':>5} " + " ".join(f"{t:>9}" for t in tasks) + f" {'mean':>7} {'record':>7} {'k=f*r':>7}")
    for fraction in fractions:
        name = row_name(fraction)
        retained = report.retained(name)
        rows[name] = {"fraction": fraction, "retained": retained, "mean": report.retained_mean(name),
                      "size_ratio": recorded.get(fraction, size_ratio(merge, fraction)),
                      "size_ratio_record": recorded.get(fraction), "size_ratio_computed": size_ratio(merge, fraction)}
        r = rows[name]
        record = "" if r["size_ratio_record"] is None else f"{r['size_ratio_record']:.4f}"
        print(f"{fraction:5.0%} " + " ".join(f"{retained[t]:9.4f}" for t in tasks)
              + f" {r['mean']:7.4f} {record:>7} {r['size_ratio_computed']:7.4f}")
    ok = [r["fraction"] for r in rows.values() if r["mean"] >= 0.99]
    smallest = min(ok) if ok else None
    print("smallest kept fraction with mean retained >= 0.99: "
          + (f"{smallest:.0%}" if smallest is not None else f"none of {[f'{f:.0%}' for f in fractions]}"))
    return {"rows": rows, "record_ratio_10pct": recorded[0.1], "smallest_fraction_retained_0.99": smallest}


def plots(study: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        print(f"no plots: {err}")
        return
    emb = study["embeddings"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(emb)
    left.bar(names, [emb[n]["seconds"] for n in names], color=["C0", "C1", "C0", "C1"])
    left.set_ylabel("seconds (median), merged task matrices")
    xs = range(len(names))
    right.bar([x - 0.2 for x in xs], [emb[n]["normalized"] for n in names], 0.4, label="lam chosen on val")
    right.bar([x + 0.2 for x in xs], [emb[n]["normalized_lam1"] for n in names], 0.4, label="lam = 1")
    right.set_xticks(list(xs), names)
    right.set_ylabel("mean normalized test accuracy")
    right.set_ylim(min(0.8, *(emb[n]["normalized"] for n in names)) - 0.02, None)
    right.legend()
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(out / "embeddings.png", dpi=120)
    plt.close(fig)

    fits = study["sftm_fits"]
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(fits)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [fits[n]["normalized_lam1"] for n in names], 0.4, label="lam = 1")
    ax.bar([x + 0.2 for x in xs], [fits[n]["normalized"] for n in names], 0.4, label="lam chosen on val")
    ax.set_xticks(list(xs), names, rotation=15)
    ax.set_ylabel("mean normalized test accuracy")
    ax.set_ylim(min(0.8, *(fits[n]["normalized_lam1"] for n in names)) - 0.02, None)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sftm_fits.png", dpi=120)
    plt.close(fig)

    rows = study["tsv_c"]["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [r["size_ratio"] for r in rows.values()]
    for task in next(iter(rows.values()))["retained"]:
        ax.plot(sizes, [r["retained"][task] for r in rows.values()], marker=".", alpha=0.4, label=task)
    ax.plot(sizes, [r["mean"] for r in rows.values()], marker="o", color="k", label="mean")
    for r in rows.values():
        ax.annotate(f"{r['fraction']:.0%}", (r["size_ratio"], r["mean"]), textcoords="offset points", xytext=(4, -10))
    ax.axhline(0.99, color="gray", linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("size of the compressed update / full task vector")
    ax.set_ylabel("retained accuracy (compressed / own fine-tune)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "tsv_c.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
