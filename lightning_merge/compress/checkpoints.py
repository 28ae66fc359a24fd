"""TSV-C on disk: full fine-tunes in, one folder per task (a peft LoRA adapter and/or the compact form) out.

:func:`compress_checkpoints` opens the inputs (any format :func:`~lightning_merge.io.open_source` reads), checks the
task names and the output before any work, plans the keys like the merge (:func:`~lightning_merge.engine.plan_merge`),
then streams key by key: the base tensor and the ``T`` fine-tuned tensors of one key are read, each task's delta
compressed, and the inputs dropped, while a worker thread hashes the inputs. The compressed updates (the output's
size) are held until the end and written into the temporary folder of
:func:`~lightning_merge.io.output.publish_folder`: an error or an interruption leaves no partial output.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lightning_merge.compress.layout import (
    FACTOR_SUFFIXES,
    FORMATS,
    CompressedTask,
    Format,
    Kind,
    module_kind,
    write_task,
)
from lightning_merge.compress.method import TSVC, check_task_names, default_task_names
from lightning_merge.engine.checkpoints import input_paths
from lightning_merge.engine.plan import MergePlan, plan_merge
from lightning_merge.engine.stream import resolve_device
from lightning_merge.functional._checks import Rank, check_choice, numel
from lightning_merge.functional.compress import compressed_numel
from lightning_merge.functional.svd import Solver
from lightning_merge.io.hashing import HASHES, ReadMarks, start_hashing
from lightning_merge.io.output import check_output, publish_folder
from lightning_merge.io.record import RECORD_FILE, MergeRecord, describe_input
from lightning_merge.io.sources import CheckpointSource, open_source

__all__ = ["CompressRecord", "compress_checkpoints"]

log = logging.getLogger(__name__)

SourceLike = str | os.PathLike | Mapping[str, torch.Tensor] | CheckpointSource


@dataclasses.dataclass(frozen=True)
class CompressRecord(MergeRecord):
    """A :class:`~lightning_merge.io.record.MergeRecord` (``method="tsv_c"``, ``tasks``: the folder names) with
    ``compression``: per task and overall, ``bytes`` (the compact form: ``k (m + n + 1)`` numbers per compressed
    matrix plus the whole other deltas), ``full_bytes`` (the full task vector of the same keys, same dtype),
    ``ratio`` (their quotient), and per task the ``ranks`` kept per matrix key. ``MergeRecord.load`` reads it too."""

    compression: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Job:
    method: TSVC
    names: list[str]
    base: CheckpointSource
    finetuned: list[CheckpointSource]
    plan: MergePlan
    kinds: dict[str, Kind]
    adapter_prefix: str
    device: torch.device
    exclude: list[str]
    strict: bool

    @property
    def sources(self) -> list[CheckpointSource]:
        return [self.base, *self.finetuned]


def compress_checkpoints(
    base: SourceLike,
    finetuned: Sequence[SourceLike] | Mapping[str, SourceLike],
    output: str | os.PathLike,
    *,
    rank: Rank = None,
    energy: float | None = None,
    solver: Solver = "auto",
    exclude: Sequence[str] = (),
    strict: bool = True,
    prefix: str | None = None,
    base_prefix: str | None = None,
    format: Format = "peft",
    overwrite: bool = False,
    input_hash: str | None = "xxh3_128",
    progress: bool = True,
    device: torch.device | str | None = None,
    model: torch.nn.Module | None = None,
    adapter_prefix: str | None = None,
) -> CompressRecord:
    """Compress each fine-tuned checkpoint's task vector with TSV-C (Gargiulo et al., CVPR 2025) into
    ``output/<task>/``, plus ``output/merge_record.json``.

    Per matrix parameter ``D_t ~ U_k diag(s_k) V_k^T`` (:func:`lightning_merge.functional.tsv_c`); the other
    parameters' deltas are kept whole. Each task folder is a peft LoRA adapter of the base model and/or the compact
    safetensors form (:mod:`lightning_merge.compress.layout`); :func:`~lightning_merge.compress.load_compressed`
    reads it back.

    Args:
        base, finetuned: paths (files or Hugging Face folders), state dicts or sources; ``finetuned`` as a mapping
            ``{task name: checkpoint}`` names the task folders, else they are named after the files
            (:func:`~lightning_merge.compress.method.default_task_names`).
        output: the output folder (new unless ``overwrite``, outside every input).
        rank, energy, solver: see :class:`~lightning_merge.compress.TSVC` (the default rank is
            ``max(1, floor(r / T))`` with ``T = len(finetuned)``).
        exclude, strict: see :func:`~lightning_merge.engine.plan_merge`; excluded and skipped keys are not stored.
        prefix, base_prefix: key prefixes stripped, as in :func:`~lightning_merge.engine.merge_checkpoints`; the
            adapter's module names are the keys after them.
        format: ``"peft"`` (an adapter, with the rest in ``tsv_c.safetensors``), ``"safetensors"`` (the compact
            form only) or ``"both"``.
        input_hash: ``"xxh3_128"``, ``"sha256"`` or ``None``, as in the merge. progress: a progress bar.
        device: where the SVDs run (default CPU). model: the base model (it may be on the meta device) to tell
            linear, embedding and ``Conv1D`` modules apart (:func:`~lightning_merge.compress.layout.module_kind`).
        adapter_prefix: the key prefix of the adapted model (e.g. ``"encoder."`` for a Hugging Face model held as
            ``self.encoder`` in a LightningModule): only keys under it go into the adapter, named without it, so
            ``PeftModel.from_pretrained(module.encoder, folder)`` loads it; ``model`` is then that model. The compact
            form and :func:`~lightning_merge.compress.load_compressed` keep the full keys.

    Returns:
        The :class:`CompressRecord`, also saved as ``output/merge_record.json``.

    Raises:
        ValueError, TypeError: bad options or task names, an output inside an input, key problems (``strict``).
        FileExistsError: ``output`` exists and ``overwrite`` is False. FileNotFoundError: a missing input.
    """
    start = time.perf_counter()
    method = TSVC(rank=rank, energy=energy, solver=solver)
    check_choice("format", format, FORMATS)
    check_choice("input_hash", input_hash, (*HASHES, None))
    names = default_task_names(_checked(finetuned))
    items = list(finetuned.values()) if isinstance(finetuned, Mapping) else list(finetuned)
    base_src = open_source(base, prefix=base_prefix if base_prefix is not None else prefix, label="base")
    ft_srcs = [open_source(f, prefix=prefix, label=f"finetuned[{name!r}]")
               for name, f in zip(names, items, strict=True)]
    output = check_output(output, overwrite=overwrite, inputs=input_paths([base_src, *ft_srcs]))
    plan = plan_merge(base_src, ft_srcs, exclude=exclude, strict=strict)
    inside = _check_adapter_prefix(adapter_prefix, plan)
    kinds = {k: kind for k in plan.matrix_keys
             if k.startswith(inside) and (kind := module_kind(k[len(inside):], model)) is not None}
    _check_key_names(plan)
    job = _Job(method, names, base_src, ft_srcs, plan, kinds, inside, resolve_device(device), list(exclude),
               bool(strict))
    log.info("Compressing %d keys of %d checkpoints with TSV-C into %s", len(plan.merge_keys), len(names), output)
    with publish_folder(output, overwrite=overwrite) as tmp:  # the lock, taken before any work
        record = _compress_into(tmp, job, input_hash, progress, format, start)
    log.info("Compressed into %s in %.1f s (ratio %.3f)", output, record.seconds, record.compression["ratio"])
    return record


def _checked(finetuned: object) -> Sequence[object] | Mapping[str, object]:
    if isinstance(finetuned, Mapping):
        check_task_names(list(finetuned))
        return finetuned
    if isinstance(finetuned, str | os.PathLike) or not isinstance(finetuned, Sequence) or not finetuned:
        raise TypeError(
            "Expected argument `finetuned` to be a non-empty sequence of checkpoints or a mapping of task names to"
            f" checkpoints, but got {finetuned!r}. HINT: wrap a single checkpoint in a list."
        )
    return finetuned


def _check_adapter_prefix(adapter_prefix: object, plan: MergePlan) -> str:
    if adapter_prefix is None or adapter_prefix == "":
        return ""
    if not isinstance(adapter_prefix, str) or not any(k.startswith(adapter_prefix) for k in plan.merge_keys):
        raise ValueError(
            "Expected argument `adapter_prefix` to be None or a prefix of compressed keys, but got"
            f" {adapter_prefix!r}. HINT: the keys begin like {list(plan.merge_keys[:2])}."
        )
    return adapter_prefix


def _check_key_names(plan: MergePlan) -> None:
    # the compact form stores matrix `key` as key.U, key.s, key.V: no other key may have one of those names
    factor_names = {key + suffix for key in plan.matrix_keys for suffix in FACTOR_SUFFIXES}
    clash = sorted(factor_names & set(plan.shapes))
    if clash:
        raise ValueError(
            f"Expected no key named like a factor of another key in the compact form, but {clash[0]!r} is one."
            " HINT: exclude it, or rename the keys."
        )


def _compress_into(tmp: Path, job: _Job, input_hash: str | None, progress: bool, format: Format,
                   start: float) -> CompressRecord:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning-merge-hash")
    marks = ReadMarks()
    try:
        hashing = start_hashing(job.sources, input_hash, pool, marks)
        tasks = _compress_keys(job, progress, marks)
        marks.close()
        dtypes = {k: job.base.dtype(k) for k in job.plan.merge_keys}
        outputs = []
        for name, task in zip(job.names, tasks, strict=True):
            (tmp / name).mkdir()
            files = write_task(tmp / name, task, job.kinds, dtypes, format, job.base.name, job.adapter_prefix)
            outputs += [f"{name}/{file}" for file in files]
        hashes = hashing.result() if hashing is not None else {}
        record = _record(job, tasks, hashes, [*outputs, RECORD_FILE], start)
        record.save(tmp)
        return record
    except BaseException:
        marks.close(abort=True)
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _compress_keys(job: _Job, progress: bool, marks: ReadMarks) -> list[CompressedTask]:
    """Per key, read the base and the ``T`` fine-tuned tensors, compress every task's delta, drop the inputs."""
    tasks = [CompressedTask() for _ in job.names]
    matrices = set(job.plan.matrix_keys)
    keys = list(job.plan.merge_keys)
    with tqdm(keys, desc="compressing (tsv_c)", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for key in bar:
            bar.set_postfix_str(key)
            w0 = job.base.get_tensor(key, job.device)
            if key in matrices:  # the T task matrices as one batch: "auto" decides from the first one
                for task, truncation in zip(tasks, _compress_tasks(job, key, w0), strict=True):
                    task.factors[key] = _on_cpu(truncation)
            else:
                for task, source in zip(tasks, job.finetuned, strict=True):
                    task.dense[key] = job.method.delta(w0, source.get_tensor(key, job.device)).cpu()
            del w0
            for source in job.sources:
                if (where := source.location(key)) is not None:
                    marks.advance(where[0], where[2])
    return tasks


def _compress_tasks(job: _Job, key: str, w0: torch.Tensor) -> list[Any]:
    first = job.method.delta(w0, job.finetuned[0].get_tensor(key, job.device))
    deltas = torch.empty((len(job.finetuned), *first.shape), dtype=first.dtype, device=first.device)
    deltas[0] = first
    del first
    for t, source in enumerate(job.finetuned[1:], 1):
        deltas[t] = job.method.delta(w0, source.get_tensor(key, job.device))
    try:
        return job.method.compress_tasks(deltas)
    except ValueError:  # name the task: the first one whose matrix fails alone
        for delta, source in zip(deltas, job.finetuned, strict=True):
            _compress(job, key, delta, source)
        raise


def _compress(job: _Job, key: str, delta: torch.Tensor, source: CheckpointSource) -> Any:
    try:
        return job.method.compress(delta, len(job.names))
    except ValueError as err:
        raise ValueError(f"Could not compress key {key!r} of {source.name!r}: {err}") from None


def _on_cpu(t: Any) -> Any:
    return type(t)(*(part.cpu() for part in t))


def _sizes(job: _Job, task: CompressedTask) -> dict[str, Any]:
    item = {k: job.base.dtype(k).itemsize for k in job.plan.merge_keys}
    shapes = job.plan.shapes
    full = sum(numel(shapes[k]) * item[k] for k in job.plan.merge_keys)
    small = sum(compressed_numel((shapes[k][0], shapes[k][1]), t.rank) * item[k]
                for k, t in task.factors.items())
    small += sum(numel(shapes[k]) * item[k] for k in task.dense)
    return {"bytes": small, "full_bytes": full, "ratio": small / full if full else 0.0, "ranks": task.ranks()}


def _record(job: _Job, tasks: list[CompressedTask], hashes: Mapping[Path, str], outputs: list[str],
            start: float) -> CompressRecord:
    roles = ["base"] + ["finetuned"] * len(job.finetuned)
    inputs = [describe_input(role, s.name, len(s.keys()), s.files(), hashes)
              for role, s in zip(roles, job.sources, strict=True)]
    per_task = {name: _sizes(job, task) for name, task in zip(job.names, tasks, strict=True)}
    small, full = sum(t["bytes"] for t in per_task.values()), sum(t["full_bytes"] for t in per_task.values())
    compression = {"bytes": small, "full_bytes": full, "ratio": small / full if full else 0.0, "tasks": per_task}
    return CompressRecord(
        method=TSVC.name, options=job.method.options(), scaling=1.0, inputs=inputs, outputs=outputs,
        merged_keys=list(job.plan.merge_keys), excluded_keys=list(job.plan.excluded_keys),
        skipped=dict(job.plan.skipped), exclude=job.exclude, strict=job.strict, device=str(job.device),
        tasks=list(job.names),
        seconds=round(time.perf_counter() - start, 3), compression=compression,
    )
