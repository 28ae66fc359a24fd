"""peft LoRA adapters: read, validate, merge in low-rank form, write one adapter, or merge into base weights.

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

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from lightning_merge.functional._checks import compute_dtype
from lightning_merge.functional.lora import LowRankUpdate, lora_scale
from lightning_merge.io.hashing import HASHES, hash_file
from lightning_merge.io.output import check_output, publish_folder
from lightning_merge.io.record import RECORD_FILE, MergeRecord, describe_input
from lightning_merge.io.sources import CheckpointSource, open_source
from lightning_merge.io.writer import DEFAULT_MAX_SHARD_SIZE, TensorSpec, write_stream
from lightning_merge.methods import MergeMethod, get_method

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


# ---------------------------------------------------------------------------------- adapters into base weights
def _into_base_inputs(adapters: Sequence[PathLike | LoraAdapter]) -> list[Path]:
    """The adapter folders on disk (adapters in memory without a ``path`` have none)."""
    folders = [a.path if isinstance(a, LoraAdapter) else a for a in adapters]
    return [Path(folder) for folder in folders if isinstance(folder, str | os.PathLike)]


def _adapter_files(folder: Path) -> list[Path]:
    return [folder / name for name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME) if (folder / name).is_file()]


def _describe_into_base_inputs(base: CheckpointSource, folders: Sequence[Path], adapter: LoraAdapter,
                               input_hash: str | None) -> list[dict[str, Any]]:
    """The record's inputs: the base and every adapter folder, with file sizes and hashes."""
    files = {"base": list(base.files()), **{str(f): _adapter_files(f) for f in folders}}
    every = [path for paths in files.values() for path in paths]
    hashes = {path: hash_file(path, input_hash) for path in every} if input_hash is not None else {}
    inputs = [describe_input("base", base.name, len(base.keys()), files["base"], hashes)]
    for folder in folders:
        inputs.append(describe_input("adapter", str(folder), len(adapter.modules), files[str(folder)], hashes))
    return inputs


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


def _copy_model_config(base: CheckpointSource, folder: Path) -> None:
    """Copy a Hugging Face base folder's ``config.json`` and ``generation_config.json``, so that
    ``from_pretrained`` loads the output."""
    root = base.root()
    for name in ("config.json", "generation_config.json"):
        if root is not None and (Path(root) / name).is_file():
            shutil.copyfile(Path(root) / name, folder / name)


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
    folder's ``config.json`` and ``generation_config.json`` are copied too, so ``from_pretrained`` loads the output.
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
        overwrite: replace an existing ``output`` (once the new one is complete).
        input_hash: ``"xxh3_128"``, ``"sha256"`` or ``None`` (no hashes), as in ``merge_checkpoints``.
        progress: show a progress bar while writing.

    Returns:
        The :class:`~lightning_merge.io.record.MergeRecord`, also saved as ``output/merge_record.json``.

    Raises:
        FileExistsError: ``output`` exists and ``overwrite`` is False.
        ValueError, TypeError: refused adapters or method, a base that lacks an adapted weight or has another
            shape, an output inside an input, an unknown ``dtype`` or ``input_hash``.
    """
    start = time.perf_counter()
    method, out_dtype = get_method(method), _into_base_dtype(dtype)
    if input_hash not in (*HASHES, None):
        raise ValueError(f"Expected argument `input_hash` to be one of {[*HASHES, None]}, but got {input_hash!r}.")
    source = open_source(base, prefix=prefix, label="base")
    folders = _into_base_inputs(adapters)
    inputs = [*([source.root()] if source.root() is not None else []), *folders]
    output = check_output(output, overwrite=overwrite, inputs=inputs)
    adapter = merge_adapters(method, adapters, compact=compact)
    keys = set(source.keys())
    names = [f"{name}.weight" for name in adapter.modules]
    updated = merge_into_base(adapter, {k: source.get_tensor(k) for k in names if k in keys})
    described = _describe_into_base_inputs(source, folders, adapter, input_hash)
    with publish_folder(output) as tmp:
        files = _write_base_plus_update(tmp, source, updated, out_dtype, max_shard_size, progress)
        _copy_model_config(source, tmp)
        record = MergeRecord(
            method=method.name, options=method.options(), scaling=float(method.scaling), inputs=described,
            outputs=[*files, RECORD_FILE], merged_keys=sorted(updated),
            dtype=None if out_dtype is None else str(out_dtype).removeprefix("torch."),
            seconds=round(time.perf_counter() - start, 3),
        )
        record.save(tmp)
    return record


def _into_base_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    from lightning_merge.engine import DTYPES

    if dtype is None or dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"Expected argument `dtype` to be a floating-point torch dtype or one of {sorted(DTYPES)},"
                         f" but got {dtype!r}.")
    return DTYPES[dtype]
