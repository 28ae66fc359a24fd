"""The on-disk merge: checkpoints in, one published folder of safetensors and ``merge_record.json`` out.

This stage owns :func:`merge_checkpoints`: it opens the inputs (:func:`~lightning_merge.io.open_source`), checks the
output before any work (:func:`~lightning_merge.io.output.check_output`: a new folder path outside every input),
plans (:mod:`~lightning_merge.engine.plan`), streams the merge (:mod:`~lightning_merge.engine.stream`) into the
temporary folder of :func:`~lightning_merge.io.output.publish_folder` while a worker thread hashes the inputs
(:mod:`~lightning_merge.io.hashing`), copies a Hugging Face base folder's configuration and tokenizer files
(:mod:`~lightning_merge.io.hf`), and writes the :class:`~lightning_merge.io.record.MergeRecord`. The folder is
published only once complete: an error or an interruption leaves the previous output (or none), never a part.
With ``distributed=True`` on many ranks (``torchrun``), each rank merges its share of the keys into the same files
(:func:`_merge_distributed`, on :mod:`~lightning_merge.engine.distributed`), and the output is the same, byte for byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_merge.engine.distributed import Ranks
from lightning_merge.engine.plan import MergePlan, plan_merge
from lightning_merge.engine.shard import balance, shard_keys
from lightning_merge.engine.stream import resolve_device, resolve_dtype, stream_keys
from lightning_merge.functional._checks import check_choice
from lightning_merge.io.hashing import HASHES, ReadMarks, start_hashing
from lightning_merge.io.hf import copy_model_files, model_folder
from lightning_merge.io.output import check_output, publish_folder
from lightning_merge.io.record import RECORD_FILE, MergeRecord, describe_input
from lightning_merge.io.sources import CheckpointSource, open_source
from lightning_merge.io.writer import DEFAULT_MAX_SHARD_SIZE, ShardLayout, TensorSpec, write_placed, write_stream
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
    distributed: bool = False,
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
        distributed: merge with every rank of the initialised default process group (``torch.distributed``;
            ``torchrun ... lightning-merge`` sets it up: :mod:`~lightning_merge.engine.distributed`), each rank
            merging its cost-balanced share of the keys (:func:`~lightning_merge.engine.shard_keys`) on its own
            ``device``. Every rank calls this with the same arguments and returns the same record; the output is
            bitwise the one-process output (see :func:`_merge_distributed`).

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
    if distributed and Ranks.size() > 1:
        ranks = Ranks()
        try:
            return _merge_distributed(ranks, start, method, base, finetuned, output, exclude=exclude, strict=strict,
                                      device=device, dtype=dtype, overwrite=overwrite, progress=progress,
                                      max_shard_size=max_shard_size, prefix=prefix, base_prefix=base_prefix,
                                      input_hash=input_hash)
        finally:
            ranks.close()
    method = get_method(method)
    check_choice("input_hash", input_hash, (*HASHES, None))
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    base_src, ft_srcs = _open_inputs(base, finetuned, prefix, base_prefix)
    output = check_output(output, overwrite=overwrite, inputs=input_paths([base_src, *ft_srcs]))
    plan = plan_merge(base_src, ft_srcs, exclude=exclude, strict=strict)
    job = _Job(method, plan, base_src, ft_srcs, device, dtype, exclude, strict)
    log.info("Merging %d keys of %d checkpoints with %s into %s", len(plan.merge_keys), len(ft_srcs), method.name,
             output)
    with publish_folder(output, overwrite=overwrite) as tmp:  # the lock, taken before any work
        copied = _copy_model_files(base_src, tmp)  # first: a refused file fails before any merge work
        record = _merge_into(tmp, job, input_hash, max_shard_size, progress, start, copied)
    log.info("Merged %s in %.1f s", output, record.seconds)
    return record


def _prepare(method: str | MergeMethod, base: SourceLike, finetuned: Sequence[SourceLike], exclude: Sequence[str],
             strict: bool, device: torch.device | str | None, dtype: torch.dtype | str | None, prefix: str | None,
             base_prefix: str | None, input_hash: str | None) -> _Job:
    """The arguments checked, the inputs opened and the merge planned (on every rank of a distributed merge, before
    rank 0 checks the output)."""
    method = get_method(method)
    check_choice("input_hash", input_hash, (*HASHES, None))
    base_src, ft_srcs = _open_inputs(base, finetuned, prefix, base_prefix)
    plan = plan_merge(base_src, ft_srcs, exclude=exclude, strict=strict)
    return _Job(method, plan, base_src, ft_srcs, resolve_device(device), resolve_dtype(dtype), exclude, strict)


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


def _record(job: _Job, hashes: Mapping[Path, str], outputs: list[str], start: float,
            world_size: int = 1) -> MergeRecord:
    roles = ["base"] + ["finetuned"] * len(job.finetuned)
    return merge_record(
        job.method, job.plan, list(zip(roles, job.sources, strict=True)), hashes, outputs,
        exclude=list(job.exclude),
        strict=bool(job.strict),
        device=str(job.device),
        dtype=None if job.dtype is None else str(job.dtype).removeprefix("torch."),
        seconds=round(time.perf_counter() - start, 3),
        world_size=world_size,
    )


# ------------------------------------------------------------------------------------------------ many processes


def _merge_distributed(ranks: Ranks, start: float, method: str | MergeMethod, base: SourceLike,
                       finetuned: Sequence[SourceLike], output: str | os.PathLike, *, exclude: Sequence[str],
                       strict: bool, device: torch.device | str | None, dtype: torch.dtype | str | None,
                       overwrite: bool, progress: bool, max_shard_size: int, prefix: str | None,
                       base_prefix: str | None, input_hash: str | None) -> MergeRecord:
    """:func:`merge_checkpoints` on every rank of ``ranks``, in steps that every rank leaves together
    (:meth:`~lightning_merge.engine.distributed.Ranks.agree`: an error on any rank stops all, naming it):

    1. every rank checks the arguments, opens the inputs and plans the same keys; the plans (keys, shapes, dtypes,
       options, input sizes) are compared with rank 0's, so ranks that see different inputs are refused;
    2. rank 0 checks the output and takes its lock (:func:`~lightning_merge.io.output.publish_folder`), copies the
       base's model files and creates the output files in its temporary folder at their full size, headers and index
       written (:class:`~lightning_merge.io.writer.ShardLayout`: the one-process layout);
    3. under the watchdog (:meth:`~lightning_merge.engine.distributed.Ranks.watched`), each rank merges its
       cost-balanced share of the keys (:func:`~lightning_merge.engine.shard_keys`, the callback's split; rank 0 also
       copies the keys that are not merged) and writes each tensor at its place
       (:func:`~lightning_merge.io.writer.write_placed`), while it hashes its share of the input files (balanced by
       size);
    4. the hashes are exchanged; rank 0 writes the record and publishes the folder, and every rank returns it.

    Choice: each rank writes its own bytes into the shared files, rather than gathering the merged tensors to rank 0.
    No tensor crosses ranks (gathering would send the whole output, e.g. 14 GB for a 7B model in bf16, through one
    process, and make rank 0 write it alone, in order), memory stays one key per rank, and the files are those of one
    process byte for byte (same layout, same bytes). The cost: the output's folder must be on a file system every rank
    sees (a rank that does not see rank 0's temporary folder is an error). The record is the one-process record but
    for ``world_size``, ``seconds``, ``created`` and, with ``cuda``, ``device`` (rank 0's, e.g. ``cuda:0``).
    """
    def open_and_plan() -> tuple[_Job, str]:
        job = _prepare(method, base, finetuned, exclude, strict, device, dtype, prefix, base_prefix, input_hash)
        return job, _fingerprint(job, max_shard_size)

    job, prints = ranks.agree(open_and_plan)
    differ = [rank for rank, fingerprint in enumerate(prints) if fingerprint != prints[0]]
    if differ:
        raise ValueError(
            f"Expected every rank to plan the same merge, but rank {differ[0]} planned another one than rank 0 (keys,"
            " shapes, dtypes, options or input sizes differ). HINT: every rank must see the same input files and get"
            " the same arguments."
        )
    layout = ShardLayout(_output_specs(job), max_shard_size=max_shard_size)
    mine = _my_keys(job, ranks.rank, ranks.world_size)
    files = list(dict.fromkeys(p for source in job.sources for p in source.files()))
    to_hash = [files[i] for i in balance([p.stat().st_size for p in files], ranks.world_size)[ranks.rank]]
    with contextlib.ExitStack() as stack:

        def open_output() -> tuple[None, list[Any] | None]:
            if ranks.rank != 0:
                return None, None
            path = check_output(output, overwrite=overwrite, inputs=input_paths(job.sources))
            log.info("Merging %d keys of %d checkpoints with %s into %s on %d ranks", len(job.plan.merge_keys),
                     len(job.finetuned), job.method.name, path, ranks.world_size)
            tmp = stack.enter_context(publish_folder(path, overwrite=overwrite))
            copied = _copy_model_files(job.base, tmp)  # first: a refused file fails before any merge work
            layout.create(tmp)
            return None, [str(tmp), copied]

        _, opened = ranks.agree(open_output)
        tmp, copied = Path(opened[0][0]), list(opened[0][1])
        hashes = ranks.watched(lambda: _merge_share(job, tmp, layout, mine, to_hash, input_hash,
                                                    progress and ranks.rank == 0, ranks.rank))
        _, shared = ranks.agree(lambda: (None, {str(files.index(p)): h for p, h in hashes.items()}))
        all_hashes = {files[int(i)]: h for share in shared for i, h in share.items()}

        def publish() -> tuple[None, dict[str, Any] | None]:
            if ranks.rank != 0:
                return None, None
            record = _record(job, all_hashes, [*layout.files, *copied, RECORD_FILE], start, ranks.world_size)
            record.save(tmp)
            stack.close()  # publishes the folder
            log.info("Merged %s in %.1f s", output, record.seconds)
            return None, record.to_dict()

        _, records = ranks.agree(publish)
    return MergeRecord(**records[0])


def _fingerprint(job: _Job, max_shard_size: int) -> str:
    """What every rank must agree on before merging: the plan, the output's specs and the inputs' sizes."""
    specs = [(s.key, s.shape, str(s.dtype)) for s in _output_specs(job)]
    sizes = [[p.stat().st_size for p in source.files()] for source in job.sources]
    text = json.dumps([job.method.name, job.method.options(), dataclasses.asdict(job.plan), specs, sizes,
                       max_shard_size, list(job.exclude), job.strict, str(job.dtype)], default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _my_keys(job: _Job, rank: int, world_size: int) -> list[str]:
    """This rank's keys, in the output's order: its share of the merge keys, and on rank 0 the keys copied."""
    share = set(shard_keys(job.plan, job.method, len(job.finetuned), world_size)[rank])
    merged = set(job.plan.merge_keys)
    return [k for k in job.plan.shapes if k in share or (rank == 0 and k not in merged)]


def _merge_share(job: _Job, tmp: Path, layout: ShardLayout, keys: list[str], to_hash: list[Path],
                 input_hash: str | None, progress: bool, rank: int) -> dict[Path, str]:
    """Merge (or copy) ``keys`` into their places in ``tmp`` while hashing ``to_hash``; returns those hashes."""
    if not tmp.is_dir():
        raise FileNotFoundError(
            f"Expected the output's temporary folder {str(tmp)!r} (made by rank 0) to be visible on rank {rank}, but"
            " it is not. HINT: with many processes the output must be on a file system that every rank sees."
        )
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning-merge-hash")
    marks = ReadMarks()
    try:
        hashing = start_hashing(job.sources, input_hash, pool, marks, only=set(to_hash))
        merged = stream_keys(job.method, job.base, job.finetuned, keys, job.device, job.dtype, progress,
                             set(job.plan.merge_keys), marks)
        write_placed(tmp, layout, merged)
        marks.close()
        return hashing.result() if hashing is not None else {}
    except BaseException:
        marks.close(abort=True)
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
