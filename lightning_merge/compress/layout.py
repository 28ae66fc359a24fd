"""The files of one compressed task: a peft LoRA adapter of the base model and the compact safetensors form.

A task folder holds, by ``format``:

* ``"peft"``: ``adapter_config.json`` + ``adapter_model.safetensors``, a peft LoRA adapter of the base model
  (``PeftModel.from_pretrained(base_model, folder)``) holding the LoRA-able matrices: ``lora_B = U_k sqrt(S_k)``,
  ``lora_A = sqrt(S_k) V_k^T`` (``lora_embedding_B = V_k sqrt(S_k)``, ``lora_embedding_A = sqrt(S_k) U_k^T`` for
  embeddings, whose weight is the transpose of ``B A``), ``lora_alpha = r`` so the scale is 1, the ranks that differ
  from ``r`` in ``rank_pattern``/``alpha_pattern``; plus ``tsv_c.safetensors`` holding the **rest**: the other
  parameters' deltas (biases, norms: a plain LoRA adapter cannot hold deltas of them) and the matrices that are not
  LoRA-able, in the compact form below.
* ``"safetensors"``: ``tsv_c.safetensors`` holding **every** compressed key.
* ``"both"``: the adapter, and ``tsv_c.safetensors`` holding every key.

The compact form ``tsv_c.safetensors``: a compressed matrix ``key`` is stored as ``key.U`` ``(m, k)``, ``key.s``
``(k,)``, ``key.V`` ``(n, k)`` (``D ~ U diag(s) V^T``; ``k = 0`` for a zero update); another parameter's delta
``D_t = W_t - W0`` as ``key``, whole; in the base's dtype. Its metadata ``tsv_c`` (JSON) says whether it holds every
key (``"contents": "all"``) or the rest (``"rest"``), lists the factored keys, gives the layout of the adapter's
modules (``"linear"``, ``"embedding"``, ``"conv1d"``) and their ``module_prefix``. :func:`load_compressed` reads either.

**Module prefix.** Keys may name the adapted model's weights under a prefix, e.g. ``encoder.`` for a Hugging Face
model held as ``self.encoder`` in a LightningModule: with ``module_prefix="encoder."`` only the keys under it go into
the adapter, its module names without the prefix (the Hugging Face model's own, so ``PeftModel.from_pretrained(
module.encoder, folder)`` loads it), while ``tsv_c.safetensors`` and :func:`load_compressed` keep the full keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from lightning_merge.functional._checks import finite_as
from lightning_merge.functional.compress import Truncation
from lightning_merge.io.sources import CheckpointSource, open_source
from lightning_merge.lora.adapter import CONFIG_NAME, SAFETENSORS_NAME, LoraAdapter, LoraModule, load_adapter
from lightning_merge.lora.merge import merged_config

__all__ = ["COMPACT_FILE", "CompressedTask", "Format", "Kind", "load_compressed", "module_kind", "write_task"]

COMPACT_FILE = "tsv_c.safetensors"
Format = Literal["peft", "safetensors", "both"]
FORMATS = ("peft", "safetensors", "both")
Kind = Literal["linear", "embedding", "conv1d"]
FACTOR_SUFFIXES = (".U", ".s", ".V")
_EMBEDDING_NAMES = ("wte", "wpe")


@dataclasses.dataclass
class CompressedTask:
    """One task compressed in memory: ``factors`` (key -> truncation) and ``dense`` (key -> whole delta)."""

    factors: dict[str, Truncation] = dataclasses.field(default_factory=dict)
    dense: dict[str, Tensor] = dataclasses.field(default_factory=dict)

    def ranks(self) -> dict[str, int]:
        return {key: t.rank for key, t in self.factors.items()}


def module_kind(key: str, model: torch.nn.Module | None = None) -> Kind | None:
    """How peft adapts the module of the 2-D weight ``key``, or ``None`` when a LoRA adapter cannot hold it.

    **(choice)** With the base ``model`` (for example built on the meta device), the module type decides:
    ``nn.Linear`` -> ``"linear"``, ``nn.Embedding`` -> ``"embedding"``, transformers' ``Conv1D`` -> ``"conv1d"``,
    anything else (or a key not of the form ``<module>.weight``) -> ``None``. Without it, the key name decides:
    ``<module>.weight`` whose name holds ``embed`` (or ends in ``wte``/``wpe``, GPT-2) is an embedding, another
    ``<module>.weight`` a linear layer; pass ``model`` for models that break these names (GPT-2's ``Conv1D``).

    Example:
        >>> module_kind("encoder.layer.0.attention.self.query.weight"), module_kind("embeddings.word_embeddings.weight")
        ('linear', 'embedding')
    """
    if not key.endswith(".weight"):
        return None
    name = key.removesuffix(".weight")
    if model is not None:
        module = dict(model.named_modules()).get(name)
        if isinstance(module, torch.nn.Linear):
            return "linear"
        if isinstance(module, torch.nn.Embedding):
            return "embedding"
        return "conv1d" if type(module).__name__ == "Conv1D" else None
    if "embed" in name.lower() or name.rsplit(".", 1)[-1] in _EMBEDDING_NAMES:
        return "embedding"
    return "linear"


def _lora_module(t: Truncation, kind: Kind, dtype: torch.dtype) -> LoraModule:
    update = t.lora() if kind == "linear" else Truncation(t.V, t.s, t.U).lora()  # weight = (B A)^T otherwise
    return LoraModule(lora_A=finite_as(update.A, dtype), lora_B=finite_as(update.B, dtype), scale=1.0,
                      transposed=kind != "linear", embedding=kind == "embedding")


def _adapter(task: CompressedTask, kinds: Mapping[str, Kind], dtypes: Mapping[str, torch.dtype],
             base_name: str | None, module_prefix: str) -> LoraAdapter | None:
    modules = {key.removesuffix(".weight")[len(module_prefix):]: _lora_module(task.factors[key], kind, dtypes[key])
               for key, kind in kinds.items() if key.startswith(module_prefix) and task.factors[key].rank > 0}
    if not modules:
        return None
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_name, "inference_mode": True,
        "target_modules": sorted(modules), "lora_dropout": 0.0, "bias": "none", "modules_to_save": None,
        "fan_in_fan_out": any(kind == "conv1d" for kind in kinds.values()),
    }
    return LoraAdapter(config=merged_config(config, {name: m.rank for name, m in modules.items()}), modules=modules)


def _compact(task: CompressedTask, keys: list[str], dtypes: Mapping[str, torch.dtype]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key in keys:
        if key in task.factors:
            t = task.factors[key]
            for suffix, part in zip(FACTOR_SUFFIXES, t, strict=True):
                out[key + suffix] = finite_as(part, dtypes[key]).contiguous()
        else:
            out[key] = finite_as(task.dense[key], dtypes[key]).contiguous()
    return out


def write_task(folder: Path, task: CompressedTask, kinds: Mapping[str, Kind], dtypes: Mapping[str, torch.dtype],
               format: Format, base_name: str | None = None, module_prefix: str = "") -> list[str]:
    """Write one compressed task into the existing ``folder`` (see the module docstring); returns the file names.

    ``kinds``: the LoRA-able keys of ``task.factors`` and their layouts (:func:`module_kind`); ``dtypes``: the
    stored dtype of every key. A zero update (``k = 0``) is not an adapter module: it stays in the compact form.
    ``module_prefix``: only keys under it go into the adapter, named without it (see the module docstring).
    """
    adapter = _adapter(task, kinds, dtypes, base_name, module_prefix) if format != "safetensors" else None
    in_adapter = {f"{module_prefix}{name}.weight" for name in adapter.modules} if adapter is not None else set()
    everything = adapter is None or format == "both"
    keys = [k for k in [*task.factors, *task.dense] if everything or k not in in_adapter]
    meta = {"contents": "all" if everything else "rest", "factored": [k for k in keys if k in task.factors],
            "modules": {key.removesuffix(".weight")[len(module_prefix):]: kinds[key] for key in sorted(in_adapter)},
            "module_prefix": module_prefix}
    save_file(_compact(task, keys, dtypes), str(folder / COMPACT_FILE), metadata={"format": "pt",
                                                                                  "tsv_c": json.dumps(meta)})
    if adapter is None:
        return [COMPACT_FILE]
    adapter.write(folder)
    return [CONFIG_NAME, SAFETENSORS_NAME, COMPACT_FILE]


# ------------------------------------------------------------------------------------------------------ reading
def _read_compact(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if not path.is_file():
        raise FileNotFoundError(f"Expected a TSV-C task folder holding {COMPACT_FILE}, but {path} does not exist.")
    with safe_open(str(path), framework="pt") as f:
        meta = _metadata(f.metadata() or {}, path)
        factored, deltas = set(meta.get("factored", [])), {}
        for key in f.keys():
            base_key, _, part = key.rpartition(".")
            if not (base_key in factored and "." + part in FACTOR_SUFFIXES):
                deltas[key] = f.get_tensor(key)
        stored = set(f.keys())
        for key in factored:
            deltas[key] = _product(f, key, stored, path)
    return meta, deltas


def _metadata(metadata: Mapping[str, str], path: Path) -> dict[str, Any]:
    """The file's ``tsv_c`` metadata, checked (a folder may come from elsewhere)."""
    try:
        meta = json.loads(metadata.get("tsv_c", "null") or "null")
    except json.JSONDecodeError:
        meta = None
    names = meta.get("factored", []) if isinstance(meta, dict) else None
    modules = meta.get("modules", {}) if isinstance(meta, dict) else None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names) and isinstance(modules, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in modules.items())):
        raise ValueError(
            f"Expected {str(path)!r} to be written by TSV-C (its metadata 'tsv_c': a JSON object with the list"
            " 'factored' of key names and the mapping 'modules'), but it is not."
        )
    return meta


def _product(f: Any, key: str, stored: set[str], path: Path) -> Tensor:
    """``U diag(s) V^T`` of a factored key, its three factors checked against one another."""
    missing = [key + suffix for suffix in FACTOR_SUFFIXES if key + suffix not in stored]
    if missing:
        raise ValueError(f"Expected {str(path)!r} to hold the factors of {key!r}, but {missing} are missing.")
    U, s, V = (f.get_tensor(key + suffix).float() for suffix in FACTOR_SUFFIXES)
    if U.ndim != 2 or V.ndim != 2 or s.ndim != 1 or not U.shape[1] == V.shape[1] == s.shape[0]:
        raise ValueError(
            f"Expected the factors of {key!r} in {str(path)!r} to be U (m, k), s (k,) and V (n, k), but got"
            f" {tuple(U.shape)}, {tuple(s.shape)} and {tuple(V.shape)}."
        )
    return (U * s) @ V.T


def _adapter_deltas(folder: Path, modules: Mapping[str, str], module_prefix: str) -> dict[str, Tensor]:
    adapter = load_adapter(folder)
    out = {}
    for name, module in adapter.modules.items():
        transposed = modules.get(name, "linear") != "linear"
        out[f"{module_prefix}{name}.weight"] = dataclasses.replace(module, transposed=transposed).delta()
    return out


def load_compressed(
    folder: str | os.PathLike,
    base: str | os.PathLike | Mapping[str, Tensor] | CheckpointSource | None = None,
    *,
    prefix: str | None = None,
) -> dict[str, Tensor]:
    """One compressed task, reconstructed: ``{key: D_t}`` (float32; matrices ``U_k diag(s_k) V_k^T``), or with
    ``base`` ``{key: W0 + D_t}`` in the base's dtype, for every key that was compressed (excluded and skipped keys
    are not stored). ``model.load_state_dict(load_compressed(folder, base), strict=False)`` switches a model to
    the task; swapping folders switches tasks.

    Args:
        folder: a task folder written by :func:`~lightning_merge.compress.compress_checkpoints`
            (``output/<task>``), in any ``format``.
        base: the base checkpoint (a path, a state dict or a source), with the key ``prefix`` stripped.

    Raises:
        FileNotFoundError: no ``tsv_c.safetensors`` (or its adapter) in ``folder``.
        ValueError: a file not written by TSV-C, or a key missing from ``base`` or of another shape there.
    """
    folder = Path(folder)
    meta, deltas = _read_compact(folder / COMPACT_FILE)
    if meta.get("contents") == "rest":
        deltas.update(_adapter_deltas(folder, meta.get("modules", {}), str(meta.get("module_prefix", ""))))
    if base is None:
        return deltas
    source = open_source(base, prefix=prefix, label="base")
    shapes = {key: tuple(source.shape(key)) for key in source.keys()}
    return {key: _add(source, shapes, key, delta) for key, delta in deltas.items()}


def _add(source: CheckpointSource, shapes: Mapping[str, tuple[int, ...]], key: str, delta: Tensor) -> Tensor:
    if shapes.get(key) != tuple(delta.shape):
        got = shapes.get(key, "missing")
        raise ValueError(f"Expected the base to hold {key!r} of shape {tuple(delta.shape)}, but it is {got}.")
    w0 = source.get_tensor(key)
    return finite_as(w0.to(torch.promote_types(w0.dtype, delta.dtype)) + delta, w0.dtype)
