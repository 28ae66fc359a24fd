"""peft adapter folders: read and validate them (``load_adapter``), hold them (``LoraAdapter``), write them.

Owns everything about the folder format: ``adapter_config.json`` (the options that make an update something other
than ``scale * B @ A`` are refused, naming the option), ``adapter_model.safetensors`` keys, the per-module rank and
scale (``r``/``rank_pattern``, ``lora_alpha``/``alpha_pattern``, rsLoRA), and the checks that several adapters are
of one base model (:func:`check_compatible`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import regex as re_timeout
import torch
from safetensors.torch import save_file
from torch import Tensor

from lightning_merge.functional._checks import compute_dtype, is_finite_number, is_int
from lightning_merge.functional.lora import LowRankUpdate, lora_scale
from lightning_merge.io.hf import folder_member
from lightning_merge.io.output import publish_folder
from lightning_merge.io.sources import open_source

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

    def save(self, output_dir: PathLike, overwrite: bool = False) -> Path:
        """Publish the adapter as the new folder ``output_dir`` (see :meth:`write`).

        The files are written into a hidden temporary sibling that is swapped in at the end
        (:func:`~lightning_merge.io.output.publish_folder`): an error leaves ``output_dir`` as it was. An existing
        ``output_dir`` is refused unless ``overwrite``, and even then replaced only when it is a previous output of
        this library or empty (:func:`~lightning_merge.io.output.not_replaceable`), never a folder of the user's.
        """
        with publish_folder(output_dir, overwrite=overwrite, argument="output_dir") as tmp:
            self.write(tmp)
        return Path(output_dir)


# ------------------------------------------------------------------------------------------------------ reading
PATTERN_TIMEOUT_S = 0.25
"""The longest one ``rank_pattern``/``alpha_pattern`` key may take to match one module name (ordinary patterns take
microseconds; a catastrophically backtracking one is refused instead of hanging the merge)."""

_MAX_PATTERN_CHARS = 1024
Patterns = list[tuple[str, Any, Any]]  # (key, compiled regex, value)


def _compile_patterns(config: Mapping[str, Any], field: str, check: Callable[[str, Any], Any], source: str) -> Patterns:
    r"""The keys of ``config[field]`` (``rank_pattern``, ``alpha_pattern``) compiled with peft's rule, their values
    checked by ``check``.

    peft's ``get_pattern_key`` applies the first key ``k`` for which ``re.match(rf"(.*\.)?({k})$", name)`` matches
    the module name; the same expression is compiled here with the ``regex`` package (a dependency of
    transformers), whose matches take a timeout: the keys come from the adapter folder, and a key such as ``(a+)+b``
    would otherwise backtrack for hours on a long module name.
    """
    patterns = config.get(field)
    if patterns is None:
        return []
    if not isinstance(patterns, dict):
        raise ValueError(f"Expected `{field}` in {source} to be an object of module patterns, but got {patterns!r}.")
    compiled = []
    for key, value in patterns.items():
        if len(key) > _MAX_PATTERN_CHARS:
            raise ValueError(f"Expected the `{field}` keys in {source} to be module names or patterns of at most"
                             f" {_MAX_PATTERN_CHARS} characters, but one has {len(key)}.")
        try:
            regex = re_timeout.compile(rf"(.*\.)?({key})$")
        except re_timeout.error as err:
            raise ValueError(f"Expected the `{field}` key {key!r} in {source} to be a valid regex, but it is not"
                             f" ({err}).") from None
        compiled.append((key, regex, check(f"{field}[{key!r}]", value)))
    return compiled


def _pattern_value(patterns: Patterns, name: str, default: Any, field: str, source: str) -> Any:
    """peft's ``get_pattern_key`` semantics: the value of the first key that matches the end of ``name``, at a dot."""
    for key, regex, value in patterns:
        try:
            if regex.match(name, timeout=PATTERN_TIMEOUT_S):
                return value
        except TimeoutError:
            raise ValueError(
                f"Expected the `{field}` key {key!r} in {source} to match module names quickly, but matching"
                f" {name!r} took over {PATTERN_TIMEOUT_S} s (catastrophic backtracking). HINT: write the module"
                " names themselves as keys."
            ) from None
    return default


def _positive_int(source: str) -> Callable[[str, Any], int]:
    def check(field: str, value: Any) -> int:
        if not is_int(value) or value < 1:
            raise ValueError(f"Expected `{field}` in {source} to be a positive int, but got {value!r}.")
        return value

    return check


def _finite_number(source: str) -> Callable[[str, Any], float]:
    def check(field: str, value: Any) -> float:
        if not is_finite_number(value):
            raise ValueError(f"Expected `{field}` in {source} to be a finite number, but got {value!r}.")
        return float(value)

    return check


@dataclasses.dataclass(frozen=True)
class _Scaling:
    """The validated fields of ``adapter_config.json`` that set each module's rank and scale."""

    r: int
    lora_alpha: float
    ranks: Patterns
    alphas: Patterns
    use_rslora: bool
    fan_in_fan_out: bool
    source: str

    def rank(self, name: str) -> int:
        return int(_pattern_value(self.ranks, name, self.r, "rank_pattern", self.source))

    def alpha(self, name: str) -> float:
        return float(_pattern_value(self.alphas, name, self.lora_alpha, "alpha_pattern", self.source))


def _scaling(config: Mapping[str, Any], source: str) -> _Scaling:
    """Check the types of ``r``, ``lora_alpha``, the patterns and the switches (peft's defaults when absent), naming
    the field and the file: a string ``r`` or ``lora_alpha``, ``null``, or ``"false"`` (truthy) would otherwise be
    read as something else or fail far from the file."""
    for switch in ("use_rslora", "fan_in_fan_out"):
        if config.get(switch) is not None and not isinstance(config[switch], bool):
            raise ValueError(f"Expected `{switch}` in {source} to be true or false, but got {config[switch]!r}.")
    return _Scaling(
        r=_positive_int(source)("r", config.get("r", 8)),
        lora_alpha=_finite_number(source)("lora_alpha", config.get("lora_alpha", 8)),
        ranks=_compile_patterns(config, "rank_pattern", _positive_int(source), source),
        alphas=_compile_patterns(config, "alpha_pattern", _finite_number(source), source),
        use_rslora=bool(config.get("use_rslora")),
        fan_in_fan_out=bool(config.get("fan_in_fan_out")),
        source=source,
    )


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"Expected a peft adapter folder with {CONFIG_NAME}, but {path} does not exist.")
    try:
        config = json.loads(path.read_bytes())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"Expected {path} to hold JSON, but it does not ({err}).") from None
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
    """Every tensor of the folder's weights file, read like any checkpoint (:func:`~lightning_merge.io.open_source`):
    a truncated or malformed file, a ``.bin`` whose unpickling would run code, or a link out of the folder, is a
    ``ValueError`` naming it."""
    for name in (SAFETENSORS_NAME, BIN_NAME):
        path = folder / name
        if path.is_file():
            source = open_source(folder_member(folder, name, "the adapter's weights"))
            return {key: source.get_tensor(key) for key in source.keys()}, path
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


def _build_module(name: str, parts: Mapping[str, Tensor], scaling: _Scaling, source: Path) -> LoraModule:
    embedding = any(kind.startswith("embedding") for kind in parts)
    prefix = "embedding " if embedding else ""
    rank = scaling.rank(name)
    A, B = _check_factors(name, parts.get(f"{prefix}A"), parts.get(f"{prefix}B"), source, rank)
    scale = lora_scale(scaling.alpha(name), rank, scaling.use_rslora)
    _check_scale(name, A, B, scale, scaling.source)
    return LoraModule(
        lora_A=A,
        lora_B=B,
        scale=scale,
        transposed=embedding or scaling.fan_in_fan_out,
        embedding=embedding,
    )


def _check_scale(name: str, A: Tensor, B: Tensor, scale: float, source: str) -> None:
    """Refuse a scale with which ``scale * B @ A`` may leave the compute dtype's range: every entry is at most
    ``|scale| * r * max|B| * max|A|``, checked here in float64 (a ``lora_alpha`` of 1e308 would otherwise merge to
    exactly 0 or to an SVD error, far from its cause)."""
    bound = abs(scale) * A.shape[0] * float(B.abs().max()) * float(A.abs().max()) if A.numel() and B.numel() else 0.0
    limit = torch.finfo(compute_dtype(A.dtype)).max
    if not math.isfinite(scale) or not bound <= limit:
        raise ValueError(
            f"Expected `lora_alpha`/`alpha_pattern` in {source} to give module {name!r} an update scale * B @ A"
            f" within the range of {compute_dtype(A.dtype)} (at most {limit:.3g}), but scale {scale:.3g} times its"
            f" factors may reach {bound:.3g}."
        )


def load_adapter(path: PathLike) -> LoraAdapter:
    """Read and validate a peft LoRA adapter folder (``adapter_config.json`` and ``adapter_model.safetensors``, or
    ``adapter_model.bin`` loaded with ``weights_only=True``).

    Per module, the rank is read from the factors and checked against ``r``/``rank_pattern``; the scale is
    ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``) with ``alpha_pattern`` applied like peft does.

    Every field that sets the update is checked before the weights are read: ``r`` and the ``rank_pattern`` values
    positive ints, ``lora_alpha`` and the ``alpha_pattern`` values finite numbers, ``use_rslora`` and
    ``fan_in_fan_out`` booleans, the pattern keys valid regexes that match in bounded time
    (:data:`PATTERN_TIMEOUT_S`); then each module's ``scale * B @ A`` is checked to fit its compute dtype.

    Raises:
        FileNotFoundError: a missing folder, config or weights file.
        ValueError: a config that is not JSON or has a field of the wrong type (naming the file and the field), a
            refused variant (:func:`check_lora_config`), a weights file that is truncated, malformed or needs code
            to unpickle (naming it), a key that is not a LoRA factor, mismatched factor shapes, a rank that
            disagrees with the config, a scale that overflows, NaN or Inf.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"Expected argument `path` to be a peft adapter folder, but {folder} is not a folder.")
    config = _read_config(folder)
    check_lora_config(config, str(folder / CONFIG_NAME))
    scaling = _scaling(config, str(folder / CONFIG_NAME))
    tensors, source = _read_tensors(folder)
    factors, extra = _split_keys(tensors, source)
    if not factors:
        raise ValueError(f"Expected LoRA factors in {source}, but it holds none.")
    modules = {name: _build_module(name, parts, scaling, source) for name, parts in sorted(factors.items())}
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


