"""Merging adapters in low-rank form: one module's factors (``merge_modules``), whole adapters (``merge_adapters``),
and an adapter's updates added to base weights (``merge_into_base``). Each method declares whether it merges factors
(:meth:`~lightning_merge.methods.MergeMethod.merge_low_rank`).
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_merge.functional.lora import LowRankUpdate
from lightning_merge.lora.adapter import CONFIG_NAME, LoraAdapter, LoraModule, PathLike, check_compatible, load_adapter
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


def merge_adapters(
    method: str | MergeMethod,
    adapters: Sequence[PathLike | LoraAdapter],
    output_dir: PathLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    compact: bool = False,
) -> LoraAdapter:
    """Merge peft LoRA adapters of one base model into one adapter, in low-rank form (METHODS.md).

    Args:
        method: a registry name (``"tsv_m"``, ``"sftm"``, ``"average"``, ``"task_arithmetic"``) or a method object;
            its ``scaling`` and ``weights`` apply, so the merged adapter's update is ``scaling * M``.
        adapters: adapter folders, or adapters from :func:`load_adapter`; ranks may differ.
        output_dir: if given, the merged adapter is written there (``PeftModel.from_pretrained`` loads it).
        dtype: of the merged factors; default the first adapter's.
        compact: write each module as the SVD of its merged update (``U sqrt(s)``, ``sqrt(s) V^T``), of minimal
            rank, at ``O((m + n) F^2)`` more per module; by default the method's factors are balanced column by
            column (rank ``F = sum_t k_t`` less the negligible terms).

    Returns:
        The merged adapter: per module rank at most ``sum_t k_t`` (less the terms at round-off level),
        scale 1, the first adapter's config otherwise (see :func:`merged_config`).

    Raises:
        ValueError: a method with no low-rank form (TIES), or adapters refused by :func:`load_adapter` or
            :func:`check_compatible`.
    """
    method = get_method(method)
    method.check_low_rank()
    if isinstance(adapters, str | os.PathLike) or not adapters:
        raise ValueError(f"Expected argument `adapters` to be a non-empty sequence of adapters, but got {adapters!r}.")
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
    result = LoraAdapter(config=config, modules=modules, extra=dict(first.extra), path=None)
    if output_dir is None:
        return result
    result.save(output_dir)
    return dataclasses.replace(result, path=str(output_dir))


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


