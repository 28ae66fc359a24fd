"""peft adapter folders: read and validate them (``load_adapter``), hold them (``LoraAdapter``), write them.

Owns everything about the folder format: ``adapter_config.json`` (the options that make an update something other
than ``scale * B @ A`` are refused, naming the option), ``adapter_model.safetensors`` keys, the per-module rank and
scale (``r``/``rank_pattern``, ``lora_alpha``/``alpha_pattern``, rsLoRA), and the checks that several adapters are
of one base model (:func:`check_compatible`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lightning_merge.functional._checks import compute_dtype
from lightning_merge.functional.lora import LowRankUpdate, lora_scale
from lightning_merge.io.output import publish_folder

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")
_PASSTHROUGH_KEY = re.compile(r"^.+\.base_layer\.weight$")  # the embedding copies peft saves beside the factors

PathLike = str | os.PathLike


def _set(value: Any) -> bool:
    return value not in (None, False, [], {}, ())


def _modifies_base(value: Any) -> bool:
    return isinstance(value, str) and (value.startswith("pissa") or value in ("olora", "corda", "lora_ga", "loftq"))


# (option, refused when, why its update is not scale * B @ A of the unmodified base)
REFUSED_OPTIONS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("use_dora", _set, "DoRA rescales the columns of W0 + scale * B @ A by a learned magnitude"),
    ("use_qalora", _set, "QALoRA applies A to group-pooled inputs"),
    ("lora_bias", _set, "the update has a bias term besides scale * B @ A"),
    ("kasa_config", _set, "KaSA inserts a learned diagonal between B and A and truncates the base weight"),
    ("monteclora_config", _set, "MonteCLoRA samples its factors"),
    ("alora_invocation_tokens", _set, "aLoRA applies the update only after its invocation tokens"),
    ("use_bdlora", _set, "BD-LoRA uses block-diagonal factors"),
    ("arrow_config", _set, "Arrow routes tokens between several adapters"),
    ("target_parameters", _set, "LoRA on raw parameters (MoE experts) is not a module's B @ A"),
    ("layer_replication", _set, "the adapted model has layers the base model lacks"),
    ("modules_to_save", _set, "whole modules are trained besides the factors; task-specific modules are never merged"),
    ("trainable_token_indices", _set, "token embeddings are trained besides the factors"),
    ("bias", lambda v: v not in (None, "none"), "base-model biases are trained besides the factors"),
    (
        "init_lora_weights",
        _modifies_base,
        "this initialization changes the base weights; HINT: save the adapter with"
        " `path_initial_model_for_weight_conversion` to convert it to a plain LoRA",
    ),
)


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """The LoRA factors of one module: update ``scale * lora_B @ lora_A`` (``(m, r) @ (r, n)``).

    ``transposed``: the weight holds the transpose of the update (``fan_in_fan_out``, i.e. GPT-2's ``Conv1D``, and
    embeddings, whose factors peft names ``lora_embedding_A``/``lora_embedding_B``).
    """

    lora_A: Tensor
    lora_B: Tensor
    scale: float
    transposed: bool = False
    embedding: bool = False

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` of ``B @ A`` (the weight's shape is its transpose when ``transposed``)."""
        return self.lora_B.shape[0], self.lora_A.shape[1]

    def update(self, weight: float = 1.0) -> LowRankUpdate:
        return LowRankUpdate(self.lora_B, self.lora_A, self.scale * weight)

    def delta(self) -> Tensor:
        """The dense update in the weight's layout (float32, float64 for float64 factors)."""
        dtype = compute_dtype(self.lora_A.dtype)
        dense = self.scale * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))
        return dense.T if self.transposed else dense

    def keys(self, name: str) -> tuple[str, str]:
        """The ``(A, B)`` keys of this module in a peft adapter file."""
        if self.embedding:
            return f"{PREFIX}{name}.lora_embedding_A", f"{PREFIX}{name}.lora_embedding_B"
        return f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """A peft LoRA adapter in memory: its ``config`` (``adapter_config.json``), its ``modules`` by name in the base
    model (``"model.layers.0.self_attn.q_proj"``), ``extra`` tensors written back unchanged, and its folder."""

    config: dict[str, Any]
    modules: dict[str, LoraModule]
    extra: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    path: str | None = None

    def state_dict(self) -> dict[str, Tensor]:
        """The tensors of ``adapter_model.safetensors``, keyed as peft saves them."""
        out = dict(self.extra)
        for name, module in self.modules.items():
            key_a, key_b = module.keys(name)
            out[key_a], out[key_b] = module.lora_A.contiguous(), module.lora_B.contiguous()
        return out

    def write(self, folder: PathLike) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into the existing ``folder``."""
        folder = Path(folder)
        save_file(self.state_dict(), str(folder / SAFETENSORS_NAME), metadata={"format": "pt"})
        (folder / CONFIG_NAME).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")

    def save(self, output_dir: PathLike) -> Path:
        """Publish the adapter as the folder ``output_dir`` (see :meth:`write`), replacing it only once complete.

        The files are written into a hidden temporary sibling that is swapped in at the end
        (:func:`~lightning_merge.io.output.publish_folder`): an error leaves ``output_dir`` as it was.
        """
        with publish_folder(output_dir) as tmp:
            self.write(tmp)
        return Path(output_dir)


# ------------------------------------------------------------------------------------------------------ reading
def _pattern_value(patterns: Mapping[str, Any] | None, name: str, default: Any) -> Any:
    # peft's `get_pattern_key` semantics: the first key that matches the end of the module name, at a dot.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"Expected a peft adapter folder with {CONFIG_NAME}, but {path} does not exist.")
    config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"Expected {path} to hold a JSON object, but got {type(config).__name__}.")
    return config


def check_lora_config(config: Mapping[str, Any], source: str = CONFIG_NAME) -> None:
    """Refuse adapters whose update is not ``scale * B @ A`` of the unmodified base (see :data:`REFUSED_OPTIONS`).

    Raises:
        ValueError: ``peft_type`` is not ``"LORA"``, or an option of :data:`REFUSED_OPTIONS` is set.
    """
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"Expected `peft_type` to be 'LORA' in {source}, but got {config.get('peft_type')!r}: only LoRA adapters"
            " are merged in low-rank form."
        )
    for option, refused, why in REFUSED_OPTIONS:
        if refused(config.get(option)):
            raise ValueError(
                f"Expected `{option}` to be unset in {source}, but got {config[option]!r}: {why}. Only plain LoRA"
                " updates scale * B @ A are merged."
            )


def _read_tensors(folder: Path) -> tuple[dict[str, Tensor], Path]:
    for name in (SAFETENSORS_NAME, BIN_NAME):
        path = folder / name
        if path.is_file():
            if name == SAFETENSORS_NAME:
                return load_file(str(path)), path
            return torch.load(path, map_location="cpu", weights_only=True), path
    raise FileNotFoundError(
        f"Expected {SAFETENSORS_NAME} or {BIN_NAME} in the peft adapter folder {folder}, but found neither."
    )


def _split_keys(tensors: Mapping[str, Tensor], source: Path) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """``{module name: {"A" | "B" | "embedding A" | "embedding B": tensor}}`` and the pass-through tensors."""
    factors: dict[str, dict[str, Tensor]] = {}
    extra: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        match = _FACTOR_KEY.match(key)
        if match:
            kind = match["kind"].removesuffix(".weight").replace("lora_", "").replace("_", " ")
            factors.setdefault(match["module"].removeprefix(PREFIX), {})[kind] = tensor
        elif _PASSTHROUGH_KEY.match(key):
            extra[key] = tensor
        else:
            raise ValueError(
                f"Expected only LoRA factors (lora_A, lora_B) in {source}, but got the key {key!r}. HINT: DoRA"
                " magnitudes, LoRA biases, trained biases and modules_to_save are not merged."
            )
    return factors, extra


def _check_factors(
    name: str, A: Tensor | None, B: Tensor | None, source: Path, expected_rank: int
) -> tuple[Tensor, Tensor]:
    if A is None or B is None:
        missing = "lora_A" if A is None else "lora_B"
        raise ValueError(f"Expected both lora_A and lora_B for module {name!r} in {source}, but {missing} is missing.")
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(
            f"Expected lora_A (r, n) and lora_B (m, r) for module {name!r} in {source}, but got lora_A"
            f" {tuple(A.shape)} and lora_B {tuple(B.shape)}. HINT: LoRA on convolutions is not supported."
        )
    if A.shape[0] != expected_rank:
        raise ValueError(
            f"Expected rank {expected_rank} for module {name!r} (`r`/`rank_pattern` of {CONFIG_NAME}), but"
            f" lora_A in {source} has {A.shape[0]} rows."
        )
    for kind, tensor in (("lora_A", A), ("lora_B", B)):
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise ValueError(f"Expected finite floating-point {kind} for module {name!r} in {source}, but it is not.")
    return A, B


def _build_module(name: str, parts: Mapping[str, Tensor], config: Mapping[str, Any], source: Path) -> LoraModule:
    embedding = any(kind.startswith("embedding") for kind in parts)
    prefix = "embedding " if embedding else ""
    A, B = parts.get(f"{prefix}A"), parts.get(f"{prefix}B")
    rank = int(_pattern_value(config.get("rank_pattern"), name, config.get("r", 8)))
    A, B = _check_factors(name, A, B, source, rank)
    alpha = float(_pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8)))
    return LoraModule(
        lora_A=A,
        lora_B=B,
        scale=lora_scale(alpha, rank, bool(config.get("use_rslora", False))),
        transposed=embedding or bool(config.get("fan_in_fan_out", False)),
        embedding=embedding,
    )


def load_adapter(path: PathLike) -> LoraAdapter:
    """Read and validate a peft LoRA adapter folder (``adapter_config.json`` and ``adapter_model.safetensors``, or
    ``adapter_model.bin`` loaded with ``weights_only=True``).

    Per module, the rank is read from the factors and checked against ``r``/``rank_pattern``; the scale is
    ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``) with ``alpha_pattern`` applied like peft does.

    Raises:
        FileNotFoundError: a missing folder, config or weights file.
        ValueError: a refused variant (:func:`check_lora_config`), a key that is not a LoRA factor, mismatched
            factor shapes, a rank that disagrees with the config, NaN or Inf.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"Expected argument `path` to be a peft adapter folder, but {folder} is not a folder.")
    config = _read_config(folder)
    check_lora_config(config, str(folder / CONFIG_NAME))
    tensors, source = _read_tensors(folder)
    factors, extra = _split_keys(tensors, source)
    if not factors:
        raise ValueError(f"Expected LoRA factors in {source}, but it holds none.")
    modules = {name: _build_module(name, parts, config, source) for name, parts in sorted(factors.items())}
    return LoraAdapter(config=config, modules=modules, extra=extra, path=str(folder))


# ------------------------------------------------------------------------------------------------ compatibility
def _label(adapter: LoraAdapter, t: int) -> str:
    return adapter.path or f"adapters[{t}]"


def _names(names: Sequence[str] | set[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_same_base(adapters: Sequence[LoraAdapter]) -> None:
    bases = {_label(a, t): a.config.get("base_model_name_or_path") for t, a in enumerate(adapters)}
    if len(set(bases.values())) > 1:
        listed = "; ".join(f"{label}: {base!r}" for label, base in bases.items())
        raise ValueError(
            f"Expected every adapter to have the same `base_model_name_or_path`, but got {listed}. HINT: if they"
            f" were trained on the same weights under different names, make the names agree in {CONFIG_NAME}."
        )


def _check_same_modules(adapters: Sequence[LoraAdapter]) -> None:
    first = set(adapters[0].modules)
    problems = []
    for t, adapter in enumerate(adapters[1:], start=1):
        missing, extra = first - set(adapter.modules), set(adapter.modules) - first
        if missing:
            problems.append(f"{_label(adapter, t)} lacks {_names(missing)}")
        if extra:
            problems.append(f"{_label(adapter, t)} also adapts {_names(extra)}")
    if problems:
        raise ValueError(
            f"Expected every adapter to adapt the same modules as {_label(adapters[0], 0)}, but "
            + "; ".join(problems)
            + "."
        )


def _check_same_shapes(adapters: Sequence[LoraAdapter]) -> None:
    for name, module in adapters[0].modules.items():
        for t, adapter in enumerate(adapters[1:], start=1):
            other = adapter.modules[name]
            if other.shape != module.shape or other.embedding != module.embedding:
                raise ValueError(
                    f"Expected module {name!r} to have B @ A of shape {module.shape} in every adapter, as in"
                    f" {_label(adapters[0], 0)}, but {_label(adapter, t)} has {other.shape}."
                )


def _check_same_extra(adapters: Sequence[LoraAdapter]) -> None:
    first = adapters[0].extra
    for t, adapter in enumerate(adapters[1:], start=1):
        for key in sorted(set(first) | set(adapter.extra)):
            a, b = first.get(key), adapter.extra.get(key)
            if a is None or b is None or a.shape != b.shape or not torch.equal(a, b):
                raise ValueError(
                    f"Expected the non-LoRA tensor {key!r} to be identical in every adapter (it is copied, not"
                    f" merged), but {_label(adapter, t)} differs from {_label(adapters[0], 0)}."
                )


def check_compatible(adapters: Sequence[LoraAdapter]) -> None:
    """Raise ``ValueError`` unless the adapters share the base model, the adapted modules and their shapes.

    Ranks, ``lora_alpha``, rsLoRA and ``fan_in_fan_out`` may differ (``fan_in_fan_out`` changes only the weight's
    layout, and peft derives it from the module type). Other tensors peft saves with the factors (the copies of
    embedding weights) must be identical.
    """
    if not adapters:
        raise ValueError("Expected argument `adapters` to hold at least one adapter, but got an empty sequence.")
    _check_same_base(adapters)
    _check_same_modules(adapters)
    _check_same_shapes(adapters)
    _check_same_extra(adapters)


