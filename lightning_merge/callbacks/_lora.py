"""LoRA fits in :class:`~lightning_merge.callbacks.MergeCallback` workflow 1: adapters, not parameters, are merged.

When the module being fit holds a ``peft.PeftModel``, the callback records each task's adapter (its LoRA factors
and ``LoraConfig``, as ``PeftModel.save_pretrained`` would write them) instead of the module's state dict, merges the
adapters in low-rank form with :func:`~lightning_merge.lora.merge_adapters` (TSV-M/SFTM on ``D_t = scale_t B_t A_t``,
never on ``lora_A`` and ``lora_B`` separately), and makes the module compute ``W0 + lam * M``: the merged update is
added to the frozen base weights and the LoRA ``B`` factors are zeroed, so the adapter's own term is exactly zero.

Detection: a ``peft.PeftModel`` among the module's submodules. LoRA layers without a ``PeftModel`` (e.g. from
``peft.inject_adapter_in_model``) are refused, since their factors would otherwise be merged as parameters.
peft is only consulted when it is already imported: a module cannot hold a ``PeftModel`` otherwise.

Task-specific parameters (``exclude``, e.g. a classification head per task) are recorded per task as
``task-XX-<task>/heads.safetensors`` (keyed as in the LightningModule) and written at the merge as
``dirpath/merged_heads/<task>.safetensors``, beside ``merged_adapter``, which stays a plain peft adapter folder.

Under DDP every rank merges the adapters itself (seconds on CPU, the same inputs and the same operations, so the same
result, and the same error on every rank if any), and rank zero writes ``merged_adapter`` and ``merged_heads``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from safetensors.torch import load_file, save_file
from torch import Tensor

from lightning_merge.callbacks._files import save_heads
from lightning_merge.callbacks._tasks import excluded
from lightning_merge.io import publish_folder
from lightning_merge.lora import (
    CONFIG_NAME,
    SAFETENSORS_NAME,
    LoraAdapter,
    check_lora_config,
    merge_adapters,
    merge_into_base,
)
from lightning_merge.methods import MergeMethod

MERGED_ADAPTER = "merged_adapter"
MERGED_HEADS = "merged_heads"
HEADS_FILE = "heads.safetensors"


def find_peft_model(pl_module: torch.nn.Module) -> Any | None:
    """The ``peft.PeftModel`` inside ``pl_module``, or ``None`` for a module without LoRA layers.

    Raises:
        ValueError: several ``PeftModel`` submodules, or LoRA layers outside any ``PeftModel``.
    """
    peft = sys.modules.get("peft")
    if peft is None:  # not imported: no module can hold a PeftModel
        return None
    from peft.tuners.lora import LoraLayer

    models = [m for m in pl_module.modules() if isinstance(m, peft.PeftModel)]
    if len(models) > 1:
        raise ValueError(f"Expected at most one peft.PeftModel in the LightningModule, but found {len(models)}.")
    if not models and any(isinstance(m, LoraLayer) for m in pl_module.modules()):
        raise ValueError(
            "Expected the LoRA layers of the LightningModule to belong to a peft.PeftModel, but found none: their"
            " factors would be merged as independent parameters. HINT: wrap the model with `peft.get_peft_model`."
        )
    return models[0] if models else None


def _adapter_name(peft_model: Any) -> str:
    active = list(peft_model.active_adapters)
    if len(active) != 1:
        raise ValueError(f"Expected one active LoRA adapter in the PeftModel, but got {active}.")
    return active[0]


def _adapter_config(peft_model: Any, name: str) -> dict[str, Any]:
    config = peft_model.peft_config[name].to_dict()
    config = {k: sorted(v) if isinstance(v, set | frozenset) else v for k, v in config.items()}
    config["inference_mode"] = True
    return config


def _check_frozen_base(peft_model: Any) -> None:
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad and ".lora_" not in n]
    if trained:
        raise ValueError(
            f"Expected only the LoRA factors of the PeftModel to be trainable, but {trained[0]!r} is too: the merged"
            " update is added to base weights that must stay the pre-trained ones. HINT: freeze it, or fine-tune"
            " the whole model without peft."
        )


def check_lora_fit(pl_module: pl.LightningModule, method: MergeMethod) -> bool:
    """Whether ``pl_module`` is a LoRA fit; for one, refuse (before training) what cannot be merged as adapters.

    Raises:
        ValueError: a method without a low-rank form (TIES), several active adapters, a refused LoRA variant
            (:func:`~lightning_merge.lora.check_lora_config`), or trainable parameters besides the factors.
    """
    peft_model = find_peft_model(pl_module)
    if peft_model is None:
        return False
    method.check_low_rank()
    name = _adapter_name(peft_model)
    check_lora_config(_adapter_config(peft_model, name), f"the LoraConfig of adapter {name!r}")
    _check_frozen_base(peft_model)
    return True


def save_task_adapter(peft_model: Any, folder: Path, heads: Mapping[str, Tensor]) -> None:
    """Write the active adapter as a peft adapter folder (``adapter_config.json``, ``adapter_model.safetensors``)
    with the task's ``heads`` (keys of the LightningModule matched by ``exclude``) as ``heads.safetensors``."""
    from peft import get_peft_model_state_dict

    name = _adapter_name(peft_model)
    # save_embedding_layers=False: the base is never resized here, and "auto" may look the base model up online
    state = get_peft_model_state_dict(peft_model, adapter_name=name, save_embedding_layers=False)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    config = _adapter_config(peft_model, name)
    with publish_folder(folder) as tmp:
        save_file(state, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        if heads:
            save_file(dict(heads), str(tmp / HEADS_FILE), metadata={"format": "pt"})


def load_task_heads(folder: Path) -> dict[str, Tensor]:
    """The task-specific tensors recorded beside a task's adapter (none when the fit had none)."""
    return load_file(str(folder / HEADS_FILE)) if (folder / HEADS_FILE).is_file() else {}


def warn_unrecorded(pl_module: torch.nn.Module, peft_model: Any, exclude: Sequence[str]) -> None:
    """Warn (before training) about trainable parameters outside the PeftModel that ``exclude`` does not match:
    they are neither merged nor recorded per task, so each task's values would be lost."""
    inside = {id(p) for p in peft_model.parameters()}
    names = [n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in inside]
    lost = [n for n in names if n not in set(excluded(names, exclude))]
    if lost:
        rank_zero_warn(
            f"MergeCallback: the trainable parameter {lost[0]!r} ({len(lost)} in all) is outside the PeftModel and not"
            " matched by `exclude`: only the LoRA factors are merged, so each task's value would be lost. HINT: add"
            f" it to `exclude` (e.g. {lost[0].rsplit('.', 1)[0] + '.*'!r}) to record it per task in `heads`."
        )


def fold_into_base(peft_model: Any, adapter: LoraAdapter) -> None:
    """Make ``peft_model`` compute ``W0 + update``: add the adapter's update to each adapted base weight and zero the
    active adapter's ``B`` factors (its term ``scale * B @ A`` is then exactly zero)."""
    name = _adapter_name(peft_model)
    layers = {module: peft_model.get_base_model().get_submodule(module) for module in adapter.modules}
    weights = {f"{module}.weight": layer.get_base_layer().weight.detach().cpu() for module, layer in layers.items()}
    merged = merge_into_base(adapter, weights)
    with torch.no_grad():
        for module, layer in layers.items():
            layer.get_base_layer().weight.copy_(merged[f"{module}.weight"])
            if name in layer.lora_B:
                layer.lora_B[name].weight.zero_()
            if name in layer.lora_embedding_B:
                layer.lora_embedding_B[name].zero_()


def merge_lora_tasks(
    strategy: pl.strategies.Strategy,
    pl_module: torch.nn.Module,
    method: MergeMethod,
    task_dirs: Mapping[str, Path],
    output: Path | None,
) -> tuple[LoraAdapter, dict[str, dict[str, Tensor]]]:
    """Merge the recorded task adapters (on every rank), write ``output`` and ``output/../merged_heads`` on rank
    zero, fold into ``pl_module``; returns the merged adapter and each task's heads."""
    adapter = merge_adapters(method, list(task_dirs.values()))
    heads = {task: head for task, folder in task_dirs.items() if (head := load_task_heads(folder))}
    if output is not None:
        if strategy.is_global_zero:
            with publish_folder(output) as tmp:  # the run's own folder: checked by the callback before training
                adapter.write(tmp)
            if heads:
                with publish_folder(output.parent / MERGED_HEADS) as tmp:
                    save_heads(tmp, heads)
        strategy.barrier("MergeCallback.save_merged_adapter")
    fold_into_base(find_peft_model(pl_module), adapter)
    return adapter, heads
