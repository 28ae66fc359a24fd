"""The on-disk merge: checkpoints in, one published folder of safetensors and ``merge_record.json`` out.

This stage owns :func:`merge_checkpoints`: it opens the inputs (:func:`~lightning_merge.io.open_source`), checks the
output before any work (:func:`~lightning_merge.io.output.check_output`: a new folder path outside every input),
plans (:mod:`~lightning_merge.engine.plan`), streams the merge (:mod:`~lightning_merge.engine.stream`) into the
temporary folder of :func:`~lightning_merge.io.output.publish_folder` while a worker thread hashes the inputs
(:mod:`~lightning_merge.io.hashing`), copies a Hugging Face base folder's configuration and tokenizer files
(:mod:`~lightning_merge.io.hf`), and writes the :class:`~lightning_merge.io.record.MergeRecord`. The folder is
published only once complete: an error or an interruption leaves the previous output (or none), never a part.
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
from torch import Tensor

from lightning_merge.engine.plan import MergePlan, plan_merge
from lightning_merge.engine.stream import resolve_device, resolve_dtype, stream_keys
from lightning_merge.functional._checks import check_choice
from lightning_merge.io.hashing import HASHES, ReadMarks, start_hashing
from lightning_merge.io.hf import copy_model_files, model_folder
from lightning_merge.io.output import check_output, publish_folder
from lightning_merge.io.record import RECORD_FILE, MergeRecord, describe_input
from lightning_merge.io.sources import CheckpointSource, open_source
from lightning_merge.io.writer import DEFAULT_MAX_SHARD_SIZE, TensorSpec, write_stream
from lightning_merge.methods import MergeMethod, get_method

__all__ = ["input_paths", "merge_checkpoints"]

log = logging.getLogger(__name__)

SourceLike = str | os.PathLike | Mapping[str, Tensor] | CheckpointSource


@dataclasses.dataclass(frozen=True)
class _Job:
    """One merge to disk, once its inputs are open and planned."""

    method: MergeMethod
    plan: MergePlan
    base: CheckpointSource
    finetuned: list[CheckpointSource]
    device: torch.device
    dtype: torch.dtype | None
    exclude: Sequence[str]
    strict: bool

    @property
    def sources(self) -> list[CheckpointSource]:
        return [self.base, *self.finetuned]


def merge_checkpoints(
    method: str | MergeMethod,
    base: SourceLike,
    finetuned: Sequence[SourceLike],
    output: str | os.PathLike,
    *,
    exclude: Sequence[str] = (),
    strict: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    prefix: str | None = None,
    base_prefix: str | None = None,
    input_hash: str | None = "xxh3_128",
) -> MergeRecord:
    """Merge checkpoints on disk into ``output``, a folder of safetensors plus ``merge_record.json``.

    The plan is checked before any work (see :func:`~lightning_merge.engine.plan_merge`); tensors are merged one key
    at a time (see :func:`~lightning_merge.engine.merge_keys`) and streamed into a temporary folder beside
    ``output``, published as ``output`` at the end: an interrupted merge leaves nothing behind. Inputs are only
    read. Keys that are excluded, skipped or not floating-point are copied from the base, so the output has exactly
    the base's keys and loads like it. When the base is a Hugging Face model folder (one with a ``config.json``),
    its configuration and tokenizer files are copied too (:func:`~lightning_merge.io.hf.copy_model_files`), so
    ``AutoModel.from_pretrained(output)`` and ``AutoTokenizer.from_pretrained(output)`` load the output.

    Args:
        method: a method object or a registry name (with default options).
        base, finetuned: paths (files or Hugging Face folders), state dicts, or sources.
        output: the output folder; sharded above ``max_shard_size`` bytes, with ``model.safetensors.index.json``.
        exclude, strict: see :func:`~lightning_merge.engine.plan_merge`. device, dtype: see
            :func:`~lightning_merge.engine.merge_keys` (``dtype`` also applies to copied floating-point tensors).
        overwrite: replace an existing ``output`` (after the new one is complete).
        progress: show a progress bar.
        prefix: key prefix stripped from every source (e.g. ``"model."`` for LightningModule checkpoints).
        base_prefix: the prefix of the base if it differs (default: ``prefix``).
        input_hash: record the hash of every input file, as ``"<algorithm>:<hex>"``: ``"xxh3_128"`` (in a
            background thread that trails the merge's reads of safetensors inputs, so it hashes the pages the
            merge has just read; pickled checkpoints are read once more), ``"sha256"`` (matches the Hugging
            Face Hub's LFS ids; about 10x the time of reading the inputs from the page cache) or ``None``.

    Returns:
        The :class:`~lightning_merge.io.record.MergeRecord`, also saved as ``output/merge_record.json``.

    Raises:
        FileExistsError: ``output`` exists and ``overwrite`` is False.
        FileNotFoundError: an input that does not exist.
        ValueError, TypeError: invalid arguments, an output that is or holds or lies in an input, or, with
            ``strict=True``, keys that do not match; a base folder's model file that is refused (a link out of the
            folder, not a regular file, or over 64 MiB: see :func:`~lightning_merge.io.hf.copy_model_files`).
    """
    start = time.perf_counter()
    method = get_method(method)
    check_choice("input_hash", input_hash, (*HASHES, None))
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    base_src, ft_srcs = _open_inputs(base, finetuned, prefix, base_prefix)
    output = check_output(output, overwrite=overwrite, inputs=input_paths([base_src, *ft_srcs]))
    plan = plan_merge(base_src, ft_srcs, exclude=exclude, strict=strict)
    job = _Job(method, plan, base_src, ft_srcs, device, dtype, exclude, strict)
    log.info("Merging %d keys of %d checkpoints with %s into %s", len(plan.merge_keys), len(ft_srcs), method.name,
             output)
    with publish_folder(output) as tmp:
        copied = _copy_model_files(base_src, tmp)  # first: a refused file fails before any merge work
        record = _merge_into(tmp, job, input_hash, max_shard_size, progress, start, copied)
    log.info("Merged %s in %.1f s", output, record.seconds)
    return record


def input_paths(sources: Sequence[CheckpointSource]) -> list[Path]:
    """What an output must stay clear of: every source's file or folder (``root()``) and the files it reads."""
    paths: list[Path] = []
    for source in sources:
        root = source.root()
        paths += ([root] if root is not None else []) + source.files()
    return paths


def _open_inputs(base: SourceLike, finetuned: Sequence[SourceLike], prefix: str | None,
                 base_prefix: str | None) -> tuple[CheckpointSource, list[CheckpointSource]]:
    base_src = open_source(base, prefix=base_prefix if base_prefix is not None else prefix, label="base")
    ft_srcs = [open_source(f, prefix=prefix, label=f"finetuned[{i}]") for i, f in enumerate(_as_list(finetuned))]
    return base_src, ft_srcs


def _as_list(finetuned: Sequence[SourceLike]) -> list[SourceLike]:
    if isinstance(finetuned, str | os.PathLike | Mapping) or not isinstance(finetuned, Sequence):
        raise TypeError(
            f"Expected argument `finetuned` to be a sequence of checkpoints, but got {type(finetuned).__name__}."
            " HINT: wrap a single checkpoint in a list."
        )
    return list(finetuned)


def _copy_model_files(base: CheckpointSource, tmp: Path) -> list[str]:
    """A Hugging Face base folder's configuration and tokenizer files, copied into ``tmp``; their names."""
    folder = model_folder(base)
    return copy_model_files(folder, tmp) if folder is not None else []


def _merge_into(tmp: Path, job: _Job, input_hash: str | None, max_shard_size: int, progress: bool,
                start: float, copied: list[str]) -> MergeRecord:
    """Write the merged weights and the record into ``tmp`` (which holds the ``copied`` model files), hashing the
    inputs in a worker thread meanwhile."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning-merge-hash")
    marks = ReadMarks()
    try:
        hashing = start_hashing(job.sources, input_hash, pool, marks)
        keys, to_merge = list(job.plan.shapes), set(job.plan.merge_keys)
        merged = stream_keys(job.method, job.base, job.finetuned, keys, job.device, job.dtype, progress, to_merge,
                             marks)
        files = write_stream(tmp, _output_specs(job), merged, max_shard_size=max_shard_size)
        marks.close()
        hashes = hashing.result() if hashing is not None else {}
        record = _record(job, hashes, [*files, *copied, RECORD_FILE], start)
        record.save(tmp)
        return record
    except BaseException:
        marks.close(abort=True)
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _output_specs(job: _Job) -> list[TensorSpec]:
    def out_dtype(key: str) -> torch.dtype:
        floating = job.base.dtype(key).is_floating_point
        return job.dtype if job.dtype is not None and floating else job.base.dtype(key)

    return [TensorSpec(k, shape, out_dtype(k)) for k, shape in job.plan.shapes.items()]


def merge_record(method: MergeMethod, plan: MergePlan, sources: Sequence[tuple[str, CheckpointSource]],
                 hashes: Mapping[Path, str], outputs: list[str], **fields: Any) -> MergeRecord:
    """The :class:`~lightning_merge.io.record.MergeRecord` of ``plan`` merged with ``method``: the fields every
    writer shares (method, options, scaling, the ``(role, source)`` inputs with their files' sizes and ``hashes``,
    ``outputs``, the keys merged, excluded and skipped), plus the writer's own ``fields``."""
    return MergeRecord(
        method=method.name,
        options=method.options(),
        scaling=float(method.scaling),
        inputs=[describe_input(role, s.name, len(s.keys()), s.files(), hashes) for role, s in sources],
        outputs=outputs,
        merged_keys=list(plan.merge_keys),
        excluded_keys=list(plan.excluded_keys),
        skipped=dict(plan.skipped),
        **fields,
    )


def _record(job: _Job, hashes: Mapping[Path, str], outputs: list[str], start: float) -> MergeRecord:
    roles = ["base"] + ["finetuned"] * len(job.finetuned)
    return merge_record(
        job.method, job.plan, list(zip(roles, job.sources, strict=True)), hashes, outputs,
        exclude=list(job.exclude),
        strict=bool(job.strict),
        device=str(job.device),
        dtype=None if job.dtype is None else str(job.dtype).removeprefix("torch."),
        seconds=round(time.perf_counter() - start, 3),
    )
