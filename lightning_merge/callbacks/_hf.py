"""The merged folder as a Hugging Face model folder, when the module being fit holds a ``transformers`` model.

When the LightningModule holds exactly one outermost ``transformers.PreTrainedModel`` (e.g. ``self.encoder =
AutoModel.from_pretrained(...)``; a model nested inside another one does not count), ``dirpath/merged`` is written by
that model's own ``save_pretrained`` after the merged weights are loaded into it: names as transformers names them
(the LightningModule's attribute prefix removed), tied weights once, sharded with an index above ``max_shard_size``,
so ``AutoModel.from_pretrained(dirpath / "merged")`` loads it. When the model's ``name_or_path`` is a local folder its
tokenizer and other non-weight files are copied first (:func:`~lightning_merge.io.hf.copy_model_files`, an
allow-list; the model's own ``config.json`` then replaces the copied one). Keys of the LightningModule outside the
model that are not task-specific go to ``lightning_module.safetensors`` (keyed as in the LightningModule); each task's
task-specific keys to ``heads/<task>.safetensors``. transformers is only consulted when it is already imported.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from lightning_merge.io.hf import copy_model_files

OUTSIDE_FILE = "lightning_module.safetensors"


def find_pretrained_model(module: torch.nn.Module) -> tuple[str, Any] | None:
    """``(attribute path, model)`` of the one outermost ``transformers.PreTrainedModel`` inside ``module``, else
    ``None`` (none, several, or transformers not imported)."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return None
    found = [(n, m) for n, m in module.named_modules() if isinstance(m, transformers.PreTrainedModel)]
    outer = [(n, m) for n, m in found if not any(o != n and (not o or n.startswith(o + ".")) for o, _ in found)]
    return outer[0] if len(outer) == 1 else None


def _local_folder(model: Any) -> Path | None:
    name = getattr(model, "name_or_path", "") or ""
    return Path(name) if name and Path(name).is_dir() else None


def _save_pretrained(model: Any, folder: Path, max_shard_size: int) -> None:
    options: dict[str, Any] = {"max_shard_size": max_shard_size}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:  # transformers 4 (5: always)
        options["safe_serialization"] = True
    model.save_pretrained(folder, **options)


def save_hf_model(folder: Path, found: tuple[str, Any], state: Mapping[str, Tensor], excluded: Sequence[str],
                  max_shard_size: int) -> list[str]:
    """Write the model folder into the existing temporary ``folder``; returns the files written (relative paths).

    ``state`` is the LightningModule's merged state: its keys outside the model that are not ``excluded`` go to
    ``lightning_module.safetensors``; the model's own weights are saved from the model, which holds them.
    """
    prefix, model = found
    source = _local_folder(model)
    if source is not None:
        copy_model_files(source, folder)
    _save_pretrained(model, folder, max_shard_size)
    inside, skip = (f"{prefix}." if prefix else ""), set(excluded)
    outside = {k: v.detach().cpu().contiguous() for k, v in state.items() if not k.startswith(inside) and k not in skip}
    if outside:
        save_file(outside, str(folder / OUTSIDE_FILE), metadata={"format": "pt"})
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
