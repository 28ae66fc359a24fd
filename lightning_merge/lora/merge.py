"""Merging adapters in low-rank form: one module's factors (``merge_modules``), whole adapters (``merge_adapters``),
and an adapter's updates added to base weights (``merge_into_base``). Each method declares whether it merges factors
(:meth:`~lightning_merge.methods.MergeMethod.merge_low_rank`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_merge.functional._checks import check_choice
from lightning_merge.functional.lora import LowRankUpdate
from lightning_merge.io.hashing import HASHES, hash_file
from lightning_merge.io.output import check_output, publish_folder
from lightning_merge.io.record import RECORD_FILE, MergeRecord, describe_input
from lightning_merge.lora.adapter import (
    BIN_NAME,
    CONFIG_NAME,
    SAFETENSORS_NAME,
    LoraAdapter,
    LoraModule,
    PathLike,
    check_compatible,
    load_adapter,
)
from lightning_merge.methods import MergeMethod, get_method


# ------------------------------------------------------------------------------------------------------ merging
def merge_modules(method: MergeMethod, modules: Sequence[LoraModule], *, compact: bool = False) -> LowRankUpdate:
    """One module's merged update ``scaling * M`` as factors (scale 1), from the ``T`` adapters' factors:
    :meth:`~lightning_merge.methods.MergeMethod.merge_low_rank` of their updates ``scale_t * B_t @ A_t`` (the
    method's ``weights`` multiply each task's scale; ``compact``: see
    :func:`~lightning_merge.functional.lora.lora_merge`).
    """
    return method.merge_low_rank([module.update() for module in modules], compact=compact)


def merged_config(config: Mapping[str, Any], ranks: Mapping[str, int]) -> dict[str, Any]:
    """The config of the merged adapter: ``config`` with scale 1 everywhere (``lora_alpha = r``, no rsLoRA) and the
    default initialization (the factors are loaded over it); the most common rank is ``r``, the other modules are
    listed in ``rank_pattern`` and ``alpha_pattern`` by their full names, which peft matches at the end of a module
    name after a dot: only that module matches (module names hold no regular-expression syntax besides dots)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    patterns = {name: rank for name, rank in sorted(ranks.items()) if rank != r}
    out = dict(config)
    out.update(r=r, lora_alpha=r, use_rslora=False, rank_pattern=patterns, alpha_pattern=dict(patterns))
    out["init_lora_weights"] = True
    return out


def _as_adapter(adapter: PathLike | LoraAdapter, t: int) -> LoraAdapter:
    if isinstance(adapter, LoraAdapter):
        return adapter
    if isinstance(adapter, str | os.PathLike):
        return load_adapter(adapter)
    raise TypeError(
        f"Expected argument `adapters[{t}]` to be a folder path or a LoraAdapter, but got {type(adapter).__name__}."
    )


def adapter_folders(adapters: Sequence[PathLike | LoraAdapter]) -> list[Path]:
    """The adapter folders on disk (adapters in memory without a ``path`` have none): what an output must avoid."""
    folders = [a.path if isinstance(a, LoraAdapter) else a for a in adapters]
    return [Path(folder) for folder in folders if isinstance(folder, str | os.PathLike)]


def adapter_files(folder: Path) -> list[Path]:
    """The files of the adapter in ``folder`` that a merge reads (its config and weights)."""
    return [folder / name for name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME) if (folder / name).is_file()]


def describe_adapters(folders: Sequence[Path], num_modules: int, input_hash: str | None) -> list[dict[str, Any]]:
    """The merge record's ``inputs`` for adapter folders: each one's files with their sizes and hashes."""
    files = {folder: adapter_files(folder) for folder in folders}
    hashes = {p: hash_file(p, input_hash) for paths in files.values() for p in paths} if input_hash else {}
    return [describe_input("adapter", str(folder), num_modules, paths, hashes) for folder, paths in files.items()]


def merge_adapters(
    method: str | MergeMethod,
    adapters: Sequence[PathLike | LoraAdapter],
    output_dir: PathLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    compact: bool = False,
    overwrite: bool = False,
    input_hash: str | None = "xxh3_128",
) -> LoraAdapter:
    """Merge peft LoRA adapters of one base model into one adapter, in low-rank form (METHODS.md).

    Args:
        method: a registry name (``"tsv_m"``, ``"sftm"``, ``"average"``, ``"task_arithmetic"``) or a method object;
            its ``scaling`` and ``weights`` apply, so the merged adapter's update is ``scaling * M``.
        adapters: adapter folders, or adapters from :func:`load_adapter`; ranks may differ.
        output_dir: if given, the merged adapter is published there (``PeftModel.from_pretrained`` loads it) with a
            ``merge_record.json`` (method, options, every input adapter's files with sizes and hashes), checked
            before any work like every output (:func:`~lightning_merge.io.output.check_output`): new unless
            ``overwrite``, outside every input adapter, locked against a second writer.
        dtype: of the merged factors; default the first adapter's.
        compact: write each module as the SVD of its merged update (``U sqrt(s)``, ``sqrt(s) V^T``), of minimal
            rank, at ``O((m + n) F^2)`` more per module; by default the method's factors are balanced column by
            column (rank ``F = sum_t k_t`` less the negligible terms).
        overwrite: replace an existing ``output_dir`` that is a previous output of this library (once the new one
            is complete); any other existing path is refused.
        input_hash: ``"xxh3_128"``, ``"sha256"`` or ``None`` (no hashes) for the record, as in ``merge_checkpoints``.

    Returns:
        The merged adapter: per module rank at most ``sum_t k_t`` (less the terms at round-off level),
        scale 1, the first adapter's config otherwise (see :func:`merged_config`).

    Raises:
        ValueError: a method with no low-rank form (TIES), adapters refused by :func:`load_adapter` or
            :func:`check_compatible`, an ``output_dir`` inside or holding an input, or one that may not be replaced.
        FileExistsError: ``output_dir`` exists and ``overwrite`` is False. BlockingIOError: another process is
            writing ``output_dir``.
    """
    start = time.perf_counter()
    method = get_method(method)
    method.check_low_rank()
    check_choice("input_hash", input_hash, (*HASHES, None))
    if isinstance(adapters, str | os.PathLike) or not adapters:
        raise ValueError(f"Expected argument `adapters` to be a non-empty sequence of adapters, but got {adapters!r}.")
    if output_dir is None:
        return _merged_adapter(method, adapters, dtype, compact)
    folders = adapter_folders(adapters)
    output = check_output(output_dir, overwrite=overwrite, inputs=folders, argument="output_dir")
    with publish_folder(output, overwrite=overwrite, argument="output_dir") as tmp:
        result = _merged_adapter(method, adapters, dtype, compact)
        result.write(tmp)
        MergeRecord(
            method=method.name, options=method.options(), scaling=float(method.scaling),
            inputs=describe_adapters(folders, len(result.modules), input_hash),
            outputs=[SAFETENSORS_NAME, CONFIG_NAME, RECORD_FILE], merged_keys=sorted(result.modules),
            dtype=str(next(iter(result.modules.values())).lora_A.dtype).removeprefix("torch."),
            seconds=round(time.perf_counter() - start, 3),
        ).save(tmp)
    return dataclasses.replace(result, path=str(output_dir))


def _merged_adapter(method: MergeMethod, adapters: Sequence[PathLike | LoraAdapter], dtype: torch.dtype | None,
                    compact: bool) -> LoraAdapter:
    loaded = [_as_adapter(adapter, t) for t, adapter in enumerate(adapters)]
    check_compatible(loaded)
    first = loaded[0]
    out_dtype = dtype or next(iter(first.modules.values())).lora_A.dtype
    modules = {}
    for name, module in first.modules.items():
        merged = merge_modules(method, [adapter.modules[name] for adapter in loaded], compact=compact)
        modules[name] = dataclasses.replace(
            module, lora_A=merged.A.to(out_dtype), lora_B=merged.B.to(out_dtype), scale=1.0
        )
    config = merged_config(first.config, {name: module.rank for name, module in modules.items()})
    return LoraAdapter(config=config, modules=modules, extra=dict(first.extra), path=None)


# ------------------------------------------------------------------------------------------- merging into base
def _transposed_in(base: torch.nn.Module, name: str) -> bool:
    try:
        target = base.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"Expected the base model to have the module {name!r} that the adapter adapts.") from err
    return not isinstance(target, torch.nn.Linear)  # nn.Embedding and transformers' Conv1D hold (in, out)


def merge_into_base(adapter: LoraAdapter, base: Mapping[str, Tensor] | torch.nn.Module) -> dict[str, Tensor]:
    """The base weights with the adapter's updates added: ``{f"{name}.weight": W0 + delta}`` for every module.

    Only the adapted weights are returned (in their own dtype, summed in float32 or float64), so
    ``model.load_state_dict(merge_into_base(adapter, model), strict=False)`` merges in place. With a module as
    ``base``, the layout (``W0 + delta`` or ``W0 + delta^T``) follows the module type, as peft does; with a
    state dict it follows ``fan_in_fan_out``.

    Raises:
        ValueError: a missing weight, or a weight whose shape matches neither layout of the update.
    """
    weights = base.state_dict() if isinstance(base, torch.nn.Module) else base
    out = {}
    for name, module in adapter.modules.items():
        key = f"{name}.weight"
        if key not in weights:
            raise ValueError(f"Expected the base weights to hold {key!r}, which the adapter adapts, but they do not.")
        w0 = weights[key]
        transposed = _transposed_in(base, name) if isinstance(base, torch.nn.Module) else module.transposed
        delta = dataclasses.replace(module, transposed=transposed).delta()
        if tuple(w0.shape) != tuple(delta.shape):
            raise ValueError(
                f"Expected {key!r} to have shape {tuple(delta.shape)} (the adapter's update), but it has"
                f" {tuple(w0.shape)}. HINT: check `fan_in_fan_out` in {CONFIG_NAME}."
            )
        out[key] = (w0.to(delta.dtype) + delta).to(w0.dtype)
    return out


