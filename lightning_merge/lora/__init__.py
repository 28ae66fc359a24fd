"""peft LoRA adapters: read, validate, merge in low-rank form, write one adapter, or merge into base weights.

Three modules: :mod:`~lightning_merge.lora.adapter` (the folder format: read, validate, write),
:mod:`~lightning_merge.lora.merge` (merging factors) and :mod:`~lightning_merge.lora.into_base` (adapters merged
into a base model on disk).

Each adapter of a base model gives, per adapted module, the task matrix ``D_t = scale_t * B_t @ A_t`` (METHODS.md,
"LoRA task matrices"); :func:`merge_adapters` merges them with TSV-M or SFTM on factors
(:mod:`lightning_merge.functional.lora`, never forming ``m x n`` matrices) and returns, or writes, one peft adapter
whose update is the merged ``scaling * M = L R^T`` as balanced factors (``lora_B = L diag(c)``,
``lora_A = diag(1 / c) R^T``, rank at most ``sum_t k_t``) with ``r = lora_alpha`` per module (scale 1, ranks in
``rank_pattern``/``alpha_pattern``), loadable with ``PeftModel.from_pretrained``.
:func:`merge_into_base` adds an adapter's updates to base weights instead. Each method says whether it merges factors
(:meth:`~lightning_merge.methods.MergeMethod.merge_low_rank`): average and task arithmetic are exact low-rank sums;
TIES works on entries of dense matrices and is refused.

Only updates of the form ``scale * B @ A`` are merged: DoRA, QALoRA, LoRA biases, KaSA, aLoRA, Arrow, BD-LoRA,
MonteCLoRA, LoRA on raw parameters, layer replication, base-modifying initializations (PiSSA, OLoRA, CorDA,
LoRA-GA, LoftQ) and adapters that save other trained tensors (``modules_to_save``, trained biases, trainable
tokens) are refused with a message naming the option. Task-specific modules are never merged (METHODS.md).

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> import torch
    >>> from safetensors.torch import save_file
    >>> def fake_adapter(folder, seed):  # what ``PeftModel.save_pretrained`` writes, for one 16 x 12 layer
    ...     g = torch.Generator().manual_seed(seed)
    ...     Path(folder).mkdir()
    ...     key = "base_model.model.layer"
    ...     save_file({f"{key}.lora_A.weight": torch.randn(2, 12, generator=g),
    ...                f"{key}.lora_B.weight": torch.randn(16, 2, generator=g)}, f"{folder}/adapter_model.safetensors")
    ...     config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["layer"]}
    ...     Path(folder, "adapter_config.json").write_text(json.dumps(config))
    >>> tmp = tempfile.mkdtemp()
    >>> for seed in range(3):
    ...     fake_adapter(f"{tmp}/task{seed}", seed)
    >>> merged = merge_adapters("tsv_m", [f"{tmp}/task{seed}" for seed in range(3)], f"{tmp}/merged")
    >>> merged.modules["layer"].rank, load_adapter(f"{tmp}/merged").modules["layer"].scale
    (6, 1.0)
"""

from lightning_merge.lora.adapter import (
    BIN_NAME,
    CONFIG_NAME,
    PREFIX,
    SAFETENSORS_NAME,
    LoraAdapter,
    LoraModule,
    check_compatible,
    check_lora_config,
    load_adapter,
)
from lightning_merge.lora.into_base import merge_adapters_into_base
from lightning_merge.lora.merge import merge_adapters, merge_into_base, merge_modules, merged_config

__all__ = [
    "BIN_NAME",
    "CONFIG_NAME",
    "PREFIX",
    "SAFETENSORS_NAME",
    "LoraAdapter",
    "LoraModule",
    "check_compatible",
    "check_lora_config",
    "load_adapter",
    "merge_adapters",
    "merge_adapters_into_base",
    "merge_into_base",
    "merge_modules",
    "merged_config",
]
