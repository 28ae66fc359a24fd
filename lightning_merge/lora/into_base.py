"""Adapters merged into a base model on disk (``merge_adapters_into_base``): the base streamed key by key with the
merged update added, published atomically with one merge record (every input hashed).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_merge.functional._checks import check_choice
from lightning_merge.io.hashing import HASHES, hash_file
from lightning_merge.io.hf import copy_model_files, model_folder
from lightning_merge.io.output import check_output, publish_folder
from lightning_merge.io.record import RECORD_FILE, MergeRecord, describe_input
from lightning_merge.io.sources import CheckpointSource, open_source
from lightning_merge.io.writer import DEFAULT_MAX_SHARD_SIZE, TensorSpec, write_stream
from lightning_merge.lora.adapter import LoraAdapter, PathLike
from lightning_merge.lora.merge import adapter_folders, describe_adapters, merge_adapters, merge_into_base
from lightning_merge.methods import MergeMethod, get_method


# ---------------------------------------------------------------------------------- adapters into base weights
def _describe_into_base_inputs(base: CheckpointSource, folders: Sequence[Path], adapter: LoraAdapter,
                               input_hash: str | None) -> list[dict[str, Any]]:
    """The record's inputs: the base and every adapter folder, with file sizes and hashes."""
    files = list(base.files())
    hashes = {path: hash_file(path, input_hash) for path in files} if input_hash is not None else {}
    return [describe_input("base", base.name, len(base.keys()), files, hashes),
            *describe_adapters(folders, len(adapter.modules), input_hash)]


def _write_base_plus_update(folder: Path, base: CheckpointSource, updated: Mapping[str, Tensor],
                            dtype: torch.dtype | None, max_shard_size: int, progress: bool) -> list[str]:
    """Stream the base key by key into ``folder``, the adapted weights replaced by ``updated``; returns the files."""

    def out_dtype(key: str) -> torch.dtype:
        return dtype if dtype is not None and base.dtype(key).is_floating_point else base.dtype(key)

    keys = base.keys()
    specs = [TensorSpec(k, base.shape(k), out_dtype(k)) for k in keys]
    bar = tqdm(keys, desc="lightning-merge: writing", unit="key", disable=not progress)
    stream = ((k, (updated[k] if k in updated else base.get_tensor(k)).to(out_dtype(k))) for k in bar)
    return write_stream(folder, specs, stream, max_shard_size=max_shard_size)


def _copy_model_config(base: CheckpointSource, folder: Path) -> list[str]:
    """Copy a Hugging Face base folder's configuration and tokenizer files (:func:`copy_model_files`), so that
    ``from_pretrained`` loads the output; returns their names."""
    root = model_folder(base)
    return copy_model_files(root, folder) if root is not None else []


def merge_adapters_into_base(
    method: str | MergeMethod,
    adapters: Sequence[PathLike | LoraAdapter],
    base: PathLike | Mapping[str, Tensor],
    output: PathLike,
    *,
    prefix: str | None = None,
    dtype: torch.dtype | str | None = None,
    compact: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    input_hash: str | None = "xxh3_128",
    progress: bool = False,
) -> MergeRecord:
    """Merge peft LoRA adapters (:func:`merge_adapters`) and write the base weights plus the merged update.

    The base is streamed key by key into ``output`` (safetensors, sharded above ``max_shard_size``): every adapted
    weight is ``W0 + scaling * M`` (:func:`merge_into_base`), every other key is copied. A Hugging Face base
    folder's configuration and tokenizer files are copied too (:func:`~lightning_merge.io.hf.copy_model_files`), so
    ``from_pretrained`` loads the output.
    The folder is published atomically (:func:`~lightning_merge.io.output.publish_folder`) with a
    ``merge_record.json`` (:class:`~lightning_merge.io.record.MergeRecord`) whose inputs are the base and every
    adapter folder, with the sizes and hashes of their files.

    Args:
        method: a registry name or a method object with a low-rank form (see :func:`merge_adapters`).
        adapters: adapter folders, or adapters from :func:`load_adapter`.
        base: the base weights: a file, a Hugging Face folder, or a state dict.
        output: the output folder; new unless ``overwrite``, outside every input.
        prefix: key prefix stripped from the base (e.g. ``"model."``).
        dtype: of the output's floating-point weights (a torch dtype or its name); default the base's.
        compact: see :func:`merge_adapters`.
        max_shard_size: shard size limit in bytes (5 GiB by default).
        overwrite: replace an existing ``output`` that is a previous output of this library (once the new one is
            complete; see :func:`~lightning_merge.io.output.check_output`); any other existing path is refused.
        input_hash: ``"xxh3_128"``, ``"sha256"`` or ``None`` (no hashes), as in ``merge_checkpoints``.
        progress: show a progress bar while writing.

    Returns:
        The :class:`~lightning_merge.io.record.MergeRecord`, also saved as ``output/merge_record.json``.

    Raises:
        FileExistsError: ``output`` exists and ``overwrite`` is False. BlockingIOError: another process is writing
            ``output``.
        ValueError, TypeError: refused adapters or method, a base that lacks an adapted weight or has another
            shape, an output inside or holding an input or one that may not be replaced, an unknown ``dtype`` or
            ``input_hash``.
    """
    start = time.perf_counter()
    method, out_dtype = get_method(method), _into_base_dtype(dtype)
    check_choice("input_hash", input_hash, (*HASHES, None))
    source = open_source(base, prefix=prefix, label="base")
    folders = adapter_folders(adapters)
    root = source.root()
    inputs = [*([root] if root is not None else []), *source.files(), *folders]
    output = check_output(output, overwrite=overwrite, inputs=inputs)
    with publish_folder(output, overwrite=overwrite) as tmp:  # the lock, before any work
        adapter = merge_adapters(method, adapters, compact=compact)
        keys = set(source.keys())
        names = [f"{name}.weight" for name in adapter.modules]
        updated = merge_into_base(adapter, {k: source.get_tensor(k) for k in names if k in keys})
        described = _describe_into_base_inputs(source, folders, adapter, input_hash)
        copied = _copy_model_config(source, tmp)  # first: a refused file fails before the weights are written
        files = _write_base_plus_update(tmp, source, updated, out_dtype, max_shard_size, progress)
        record = MergeRecord(
            method=method.name, options=method.options(), scaling=float(method.scaling), inputs=described,
            outputs=[*files, *copied, RECORD_FILE], merged_keys=sorted(updated),
            dtype=None if out_dtype is None else str(out_dtype).removeprefix("torch."),
            seconds=round(time.perf_counter() - start, 3),
        )
        record.save(tmp)
    return record


def _into_base_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    from lightning_merge.engine import DTYPES

    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"Expected argument `dtype` to be a floating-point torch dtype or one of {sorted(DTYPES)},"
                         f" but got {dtype!r}.")
    return DTYPES[dtype]

