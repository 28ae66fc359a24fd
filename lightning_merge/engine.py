"""The streaming merge engine: plan the keys, shard them across ranks, merge parameter by parameter, write.

Data flows one way: checkpoint sources (:mod:`lightning_merge.io`) -> this per-key loop -> a method object
(:mod:`lightning_merge.methods`, the math). At most the ``T + 1`` tensors of the parameter being merged are
held at once, and the output is streamed to disk as it is produced, so memory stays bounded by the largest
parameter, not by the model size times ``T``. Never imports Lightning.

Example:
    >>> from lightning_merge.methods import get_method
    >>> base = {"w": torch.zeros(4, 4), "b": torch.zeros(4), "step": torch.tensor(3)}
    >>> tuned = [{"w": torch.eye(4), "b": torch.ones(4), "step": torch.tensor(9)} for _ in range(2)]
    >>> plan = plan_merge(open_source(base), [open_source(t) for t in tuned])
    >>> plan.merge_keys, plan.skipped
    (('w', 'b'), {'step': 'non-floating-point buffer (torch.int64), copied from the base'})
    >>> sources = [open_source(t) for t in tuned]
    >>> merged = dict(merge_keys(get_method("average"), open_source(base), sources, plan.merge_keys))
    >>> merged["b"]
    tensor([1., 1., 1., 1.])
"""

from __future__ import annotations

import dataclasses
import fnmatch
import heapq
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_merge.functional._checks import check_choice, finite_as
from lightning_merge.io.hashing import HASHES, ReadMarks, start_hashing
from lightning_merge.io.sources import (
    CheckpointSource,
    HFFolderSource,
    open_source,
    source_files,
    source_location,
)
from lightning_merge.io.writer import DEFAULT_MAX_SHARD_SIZE, TensorSpec, write_stream
from lightning_merge.methods import MergeMethod, get_method

__all__ = [
    "MergePlan",
    "MergeRecord",
    "merge_checkpoints",
    "merge_keys",
    "plan_merge",
    "shard_keys",
]

log = logging.getLogger(__name__)

RECORD_FILE = "merge_record.json"
SourceLike = str | os.PathLike | Mapping[str, Tensor] | CheckpointSource
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


# --------------------------------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class MergePlan:
    """Which keys are merged and how, decided up front from the base and every fine-tuned source.

    Attributes:
        matrix_keys: floating-point 2-D parameters, merged as matrices.
        other_keys: other floating-point parameters (biases, norms, 1-D, 0-D, conv kernels).
        excluded_keys: base keys matched by ``exclude`` (task-specific, e.g. heads): never merged, copied from
            base.
        skipped: key -> reason, for keys not merged: non-floating-point buffers (copied from the base), and
            with ``strict=False`` keys missing from or shaped differently in a fine-tuned source (copied from
            the base), or present only in a fine-tuned source (not written).
        shapes: the shape of every base key, in the base's order (the order of the merged output).
    """

    matrix_keys: tuple[str, ...]
    other_keys: tuple[str, ...]
    excluded_keys: tuple[str, ...]
    skipped: dict[str, str]
    shapes: dict[str, tuple[int, ...]]

    @property
    def merge_keys(self) -> tuple[str, ...]:
        """The keys to merge: matrices first, then the other parameters, each in the base's order."""
        return self.matrix_keys + self.other_keys


def _compile_exclude(exclude: Sequence[str]) -> list[Callable[[str], bool]]:
    """Matchers for ``exclude``: globs (``fnmatch``, case-sensitive), or regexes (``re.fullmatch``) after
    ``re:``."""
    if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
        raise TypeError(f"Expected argument `exclude` to be a sequence of str patterns, but got {exclude!r}.")
    return [_matcher(p) for p in exclude]


def _matcher(pattern: str) -> Callable[[str], bool]:
    if not pattern.startswith("re:"):
        return lambda key: fnmatch.fnmatchcase(key, pattern)
    try:
        regex = re.compile(pattern[3:])
    except re.error as err:
        raise ValueError(
            f"Expected argument `exclude` to hold valid regexes after 're:', but got {pattern!r} ({err})."
        ) from None
    return lambda key: regex.fullmatch(key) is not None


def _head_glob(key: str) -> str:
    return key.rsplit(".", 1)[0] + ".*" if "." in key else key


def _missing_problem(key: str, base: CheckpointSource, ft: CheckpointSource, num_missing: int) -> str:
    total = len(base.keys())
    hint = (
        "the key names differ throughout; check the key prefix (e.g. prefix='model.' for a LightningModule"
        " checkpoint)"
        if num_missing == total
        else f"exclude task-specific keys (exclude=[{_head_glob(key)!r}]) or pass strict=False to merge the"
        " common keys"
    )
    return (
        f"Key {key!r} of the base {base.name!r} is missing in the fine-tuned checkpoint {ft.name!r}"
        f" ({num_missing} of {total} base keys are missing there). HINT: {hint}."
    )


def _shape_problem(key: str, base: CheckpointSource, ft: CheckpointSource) -> str:
    return (
        f"Key {key!r} has shape {tuple(base.shape(key))} in the base {base.name!r} but"
        f" {tuple(ft.shape(key))} in the"
        f" fine-tuned checkpoint {ft.name!r}. HINT: if it is task-specific (e.g. a classification head),"
        f" exclude it"
        f" with exclude=[{_head_glob(key)!r}]; or pass strict=False to merge the other keys."
    )


def _extra_problem(key: str, base: CheckpointSource, ft: CheckpointSource) -> str:
    return (
        f"Key {key!r} of the fine-tuned checkpoint {ft.name!r} is not in the base {base.name!r}. HINT:"
        f" exclude it if it"
        f" is task-specific (exclude=[{_head_glob(key)!r}]), or pass strict=False to leave it out."
    )


@dataclasses.dataclass
class _Checks:
    """Problems found while planning: ``key -> (short reason, full message)``, in discovery order."""

    problems: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)

    def add(self, key: str, reason: str, message: str) -> None:
        self.problems.setdefault(key, (reason, message))

    def raise_first(self) -> None:
        if self.problems:
            message = next(iter(self.problems.values()))[1]
            more = len(self.problems) - 1
            suffix = f" ({more} more problem{'s' * (more > 1)} of this kind.)" if more else ""
            raise ValueError(message + suffix)


def _check_key(key: str, base: CheckpointSource, finetuned: Sequence[CheckpointSource],
               key_sets: list[set[str]], missing: list[int], checks: _Checks) -> bool:
    """Record the first problem of ``key`` in any fine-tuned source; ``True`` when it can be merged."""
    for ft, keys, num_missing in zip(finetuned, key_sets, missing):
        if key not in keys:
            message = _missing_problem(key, base, ft, num_missing)
            checks.add(key, f"missing in {ft.name!r}, copied from the base", message)
        elif tuple(ft.shape(key)) != tuple(base.shape(key)):
            reason = (
                f"shape {tuple(ft.shape(key))} in {ft.name!r} != {tuple(base.shape(key))} in the base,"
                f" copied from the base"
            )
            checks.add(key, reason, _shape_problem(key, base, ft))
    return key not in checks.problems


def _check_sources(base: CheckpointSource, finetuned: Sequence[CheckpointSource]) -> None:
    for arg, src in [("base", base), *((f"finetuned[{i}]", f) for i, f in enumerate(finetuned))]:
        if not isinstance(src, CheckpointSource):
            raise TypeError(
                f"Expected argument `{arg}` to be a CheckpointSource, but got {type(src).__name__}."
            )
    if not finetuned:
        raise ValueError("Expected argument `finetuned` to hold at least one checkpoint, but got none.")


def plan_merge(
    base: CheckpointSource,
    finetuned: Sequence[CheckpointSource],
    *,
    exclude: Sequence[str] = (),
    strict: bool = True,
) -> MergePlan:
    """Classify the base's keys and check them against every fine-tuned source before any tensor is read.

    Args:
        base: the pre-trained checkpoint; the output has exactly its keys.
        finetuned: the ``T`` fine-tuned checkpoints.
        exclude: glob patterns (``"head.*"``), or regexes prefixed with ``re:``
            (``"re:.*\\.classifier\\..*"``), of task-specific keys: never merged, copied from the base.
        strict: raise on the first missing key, shape mismatch, or key absent from the base (with the key, the
            files, the shapes and a hint); ``False`` records them in :attr:`MergePlan.skipped` instead.

    Raises:
        ValueError: with ``strict=True``, a key problem; an invalid regex; no fine-tuned source.
        TypeError: a source that is not a :class:`CheckpointSource`, or ``exclude`` that is not a list of str.
    """
    _check_sources(base, finetuned)
    matchers = _compile_exclude(exclude)
    base_keys = base.keys()
    key_sets = [set(ft.keys()) for ft in finetuned]
    missing = [sum(k not in keys for k in base_keys) for keys in key_sets]
    excluded = [k for k in base_keys if any(m(k) for m in matchers)]
    checks, skipped, merged = _Checks(), {}, []
    for key in base_keys:
        if key in excluded:
            continue
        if not base.dtype(key).is_floating_point:
            skipped[key] = f"non-floating-point buffer ({base.dtype(key)}), copied from the base"
        elif _check_key(key, base, finetuned, key_sets, missing, checks):
            merged.append(key)
    _check_extra_keys(base, finetuned, set(base_keys), matchers, checks)
    if strict:
        checks.raise_first()
    skipped.update({k: reason for k, (reason, _) in checks.problems.items()})
    _warn_unused(exclude, matchers, base_keys)
    shapes = {k: tuple(base.shape(k)) for k in base_keys}
    return MergePlan(
        matrix_keys=tuple(k for k in merged if len(shapes[k]) == 2),
        other_keys=tuple(k for k in merged if len(shapes[k]) != 2),
        excluded_keys=tuple(excluded),
        skipped=skipped,
        shapes=shapes,
    )


def _check_extra_keys(base: CheckpointSource, finetuned: Sequence[CheckpointSource], base_keys: set[str],
                      matchers: list[Callable[[str], bool]], checks: _Checks) -> None:
    for ft in finetuned:
        for key in ft.keys():
            if key not in base_keys and not any(m(key) for m in matchers):
                reason = f"only in the fine-tuned {ft.name!r}, not written"
                checks.add(key, reason, _extra_problem(key, base, ft))


def _warn_unused(exclude: Sequence[str], matchers: list[Callable[[str], bool]], keys: list[str]) -> None:
    for pattern, match in zip(exclude, matchers):
        if not any(match(k) for k in keys):
            log.warning("Exclude pattern %r matches no key of the base.", pattern)


# ------------------------------------------------------------------------------------------------ sharding


def shard_keys(plan: MergePlan, method: MergeMethod, num_tasks: int, world_size: int) -> list[list[str]]:
    """Assign the plan's merge keys to ``world_size`` ranks, balancing ``method.cost(shape, num_tasks)``.

    Greedy longest-processing-time: keys by decreasing cost (ties in plan order) each go to the least-loaded
    rank (ties to the lowest rank). Deterministic, so every rank computes the same assignment; each rank's
    keys are returned in plan order.

    Example:
        >>> from lightning_merge.methods import get_method
        >>> plan = MergePlan(("a", "b"), ("c",), (), {}, {"a": (8, 8), "b": (4, 4), "c": (4,)})
        >>> shard_keys(plan, get_method("average"), num_tasks=2, world_size=2)
        [['a'], ['b', 'c']]
    """
    for arg, value in (("num_tasks", num_tasks), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Expected argument `{arg}` to be a positive int, but got {value!r}.")
    order = {k: i for i, k in enumerate(plan.merge_keys)}
    by_cost = sorted(order, key=lambda k: (-method.cost(plan.shapes[k], num_tasks), order[k]))
    loads = [(0.0, rank) for rank in range(world_size)]
    assigned: list[list[str]] = [[] for _ in range(world_size)]
    for key in by_cost:
        load, rank = heapq.heappop(loads)
        assigned[rank].append(key)
        heapq.heappush(loads, (load + method.cost(plan.shapes[key], num_tasks), rank))
    return [sorted(keys, key=order.__getitem__) for keys in assigned]


# ---------------------------------------------------------------------------------------------- streaming


def _resolve_device(device: torch.device | str | None) -> torch.device:
    try:
        return torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"Expected argument `device` to be a torch device such as 'cpu' or 'cuda:0', but got {device!r}."
        ) from None


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(
        f"Expected argument `dtype` to be None or a floating-point dtype {sorted(DTYPES)}, but got {dtype!r}."
    )


Loaded = tuple[Tensor, list[Tensor]]


def _load(
    base: CheckpointSource,
    finetuned: Sequence[CheckpointSource],
    key: str,
    device: torch.device | None,
    merge: bool,
) -> Loaded:
    """The base tensor of ``key`` and, when it is merged (and floating-point), the ``T`` fine-tuned
    tensors."""
    tensor = base.get_tensor(key, device if merge else None)
    if not merge or not tensor.is_floating_point():
        return tensor, []
    return tensor, [ft.get_tensor(key, device) for ft in finetuned]


def _combine(method: MergeMethod, loaded: Loaded, dtype: torch.dtype | None) -> Tensor:
    """``method(base, finetuned)`` on CPU in ``dtype`` (default: the base's); the base, cast, when nothing to
    merge."""
    tensor, finetuned = loaded
    out_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    if not finetuned:
        return tensor.to(device="cpu", dtype=out_dtype)
    # merge in the wider of the two dtypes, so that asking for float32 output from bf16 inputs loses nothing
    tensor = tensor.to(torch.promote_types(tensor.dtype, out_dtype))
    merged = method(tensor, finetuned)  # finite in tensor.dtype: only a cast to a narrower dtype needs a check
    return (merged if merged.dtype == out_dtype else finite_as(merged, out_dtype)).cpu()


def _combine_key(method: MergeMethod, key: str, loaded: Loaded, dtype: torch.dtype | None,
                 finetuned: Sequence[CheckpointSource]) -> Tensor:
    """:func:`_combine`, naming the key and the checkpoints in a value error (e.g. NaN from a corrupt file)."""
    try:
        return _combine(method, loaded, dtype)
    except ValueError as err:
        names = [ft.name for ft in finetuned]
        raise ValueError(
            f"Could not merge key {key!r}: {err} (`task_vectors[t]` is the fine-tuned checkpoint t of"
            f" {names})."
        ) from None


def _prefetched(load: Callable[[str], Loaded], keys: Sequence[str]) -> Iterator[tuple[str, Loaded]]:
    """``(key, load(key))`` in order; a worker thread loads the next key while the caller merges this one.

    Reading overlaps the merge at the cost of holding the inputs of two keys instead of one.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning-merge-read") as pool:
        pending = pool.submit(load, keys[0]) if keys else None
        for i, key in enumerate(keys):
            loaded = pending.result()
            pending = pool.submit(load, keys[i + 1]) if i + 1 < len(keys) else None
            yield key, loaded
            del loaded


def _mark_read(marks: ReadMarks, sources: Sequence[CheckpointSource], key: str) -> None:
    for source in sources:
        if (where := source_location(source, key)) is not None:
            marks.advance(where[0], where[2])


def _nbytes(source: CheckpointSource, key: str) -> int:
    return TensorSpec(key, tuple(source.shape(key)), source.dtype(key)).nbytes


def _progress_bar(total: int, enabled: bool, desc: str) -> tqdm:
    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled, leave=False
    )


def merge_keys(
    method: MergeMethod,
    base: CheckpointSource,
    finetuned: Sequence[CheckpointSource],
    keys: Iterable[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool = False,
) -> Iterator[tuple[str, Tensor]]:
    """Stream ``(key, merged tensor)``: per key, load the base and ``T`` fine-tuned tensors, merge, drop them.

    The merged tensor is ``method(base, finetuned)`` computed on ``device``, returned on CPU in the base's
    dtype (or ``dtype``; the merge then runs in the wider of the two). Non-floating-point tensors are the
    base's, unchanged. With the same device, dtype and number of threads the result is bitwise the in-memory
    ``method(base_tensor, finetuned_tensors)`` (BLAS reductions depend on the thread count: e.g. 1 against 2
    threads moved a TSV-M merge by 1e-4 relative).

    Args:
        method: the method object (see :func:`lightning_merge.methods.get_method`).
        base: the base source. finetuned: the ``T`` fine-tuned sources. keys: the keys to merge, in order.
        device: where the tensors are loaded and merged (default CPU).
        dtype: the dtype of the yielded tensors (default: the base's).
        progress: show a progress bar over the bytes of the base tensors.
    """
    if not isinstance(method, MergeMethod):
        raise TypeError(f"Expected argument `method` to be a MergeMethod, but got {type(method).__name__}.")
    _check_sources(base, finetuned)
    device, dtype = _resolve_device(device), _resolve_dtype(dtype)
    return _stream(method, base, finetuned, list(keys), device, dtype, progress)


def _stream(
    method: MergeMethod,
    base: CheckpointSource,
    finetuned: Sequence[CheckpointSource],
    keys: Sequence[str],
    device: torch.device,
    dtype: torch.dtype | None,
    progress: bool,
    merged: Collection[str] | None = None,
    marks: ReadMarks | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Merge ``keys`` in order (only those in ``merged`` when given; the others are copied from the base);
    after each key, report to ``marks`` how far into each file the merge has read."""
    def load(key: str) -> Loaded:
        return _load(base, finetuned, key, device, merged is None or key in merged)

    with _progress_bar(sum(_nbytes(base, k) for k in keys), progress, f"merging ({method.name})") as bar:
        for key, loaded in _prefetched(load, keys):
            tensor = _combine_key(method, key, loaded, dtype, finetuned)
            if marks is not None:
                _mark_read(marks, [base, *finetuned] if loaded[1] else [base], key)
            del loaded
            bar.update(_nbytes(base, key))
            yield key, tensor
            del tensor


# --------------------------------------------------------------------------------------------- the record


@dataclasses.dataclass(frozen=True)
class MergeRecord:
    """What a merge did; saved as ``merge_record.json`` beside the merged weights.

    Attributes:
        method: the registry name. options: its constructor arguments. scaling: the coefficient ``lam``.
        inputs: per source, its role (``"base"``/``"finetuned"``), name, prefix and files with sizes and
            hashes (``"xxh3_128:<hex>"``, ``"sha256:<hex>"`` or ``None``).
        outputs: the files written in the output folder.
        merged_keys, excluded_keys, skipped: as in :class:`MergePlan`.
        device, dtype: where and in which output dtype the merge ran. version:
            ``lightning_merge.__version__``.
    """

    method: str
    options: dict[str, Any]
    scaling: float
    inputs: list[dict[str, Any]]
    outputs: list[str]
    merged_keys: list[str]
    excluded_keys: list[str]
    skipped: dict[str, str]
    exclude: list[str]
    strict: bool
    device: str
    dtype: str | None
    version: str
    created: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-serializable primitives."""
        return dataclasses.asdict(self)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``merge_record.json`` into ``folder``."""
        path = Path(folder) / RECORD_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _describe_inputs(base: CheckpointSource, finetuned: Sequence[CheckpointSource],
                     hashing: Future[dict[Path, str]] | None) -> list[dict[str, Any]]:
    hashes = hashing.result() if hashing is not None else {}

    def describe(role: str, source: CheckpointSource) -> dict[str, Any]:
        files = [
            {"path": str(p), "bytes": p.stat().st_size, "hash": hashes.get(p)} for p in source_files(source)
        ]
        return {"role": role, "name": source.name, "keys": len(source.keys()), "files": files}

    return [describe("base", base), *(describe("finetuned", f) for f in finetuned)]


def _version() -> str:
    import lightning_merge  # at call time: the package's __init__ may import this module

    return str(getattr(lightning_merge, "__version__", "unknown"))


# ------------------------------------------------------------------------------------------ merge to disk


def _check_output(output: str | os.PathLike, overwrite: bool, sources: Sequence[CheckpointSource]) -> Path:
    if not isinstance(output, str | os.PathLike):
        raise TypeError(f"Expected argument `output` to be a folder path, but got {type(output).__name__}.")
    output = Path(output).absolute()
    if output.suffix in (".safetensors", ".ckpt", ".bin", ".pt", ".pth"):
        raise ValueError(
            f"Expected argument `output` to be a folder path, but got the file name {str(output)!r}. HINT:"
            f" the merged"
            " model is a folder (model.safetensors, its shards and merge_record.json); drop the extension."
        )
    if output.exists() and not overwrite:
        raise FileExistsError(
            f"Expected argument `output` to be a new path, but {str(output)!r} already exists. HINT: pass"
            " overwrite=True (--overwrite) to replace it, or choose another path."
        )
    _check_not_input(output, sources)
    return output


def _check_not_input(output: Path, sources: Sequence[CheckpointSource]) -> None:
    resolved = output.resolve()
    for source in sources:
        folder = [Path(source.path)] if isinstance(source, HFFolderSource) else []
        for path in folder + source_files(source):
            path = path.resolve()
            if path == resolved or resolved in path.parents:
                raise ValueError(
                    f"Expected argument `output` to be outside the inputs, but {str(output)!r} holds the"
                    f" input"
                    f" {str(path)!r}. HINT: inputs are never modified; choose another output path."
                )


def _replace(tmp: Path, output: Path) -> None:
    """Move ``tmp`` to ``output``; an existing ``output`` (allowed by the caller) is removed only after the
    move."""
    old = None
    if output.exists() or output.is_symlink():
        old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def _output_specs(plan: MergePlan, base: CheckpointSource, dtype: torch.dtype | None) -> list[TensorSpec]:
    def out_dtype(key: str) -> torch.dtype:
        return dtype if dtype is not None and base.dtype(key).is_floating_point else base.dtype(key)

    return [TensorSpec(k, shape, out_dtype(k)) for k, shape in plan.shapes.items()]


def merge_checkpoints(
    method: str | MergeMethod,
    base: SourceLike,
    finetuned: Sequence[SourceLike],
    output: str | os.PathLike,
    *,
    exclude: Sequence[str] = (),
    strict: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    prefix: str | None = None,
    base_prefix: str | None = None,
    input_hash: str | None = "xxh3_128",
) -> MergeRecord:
    """Merge checkpoints on disk into ``output``, a folder of safetensors plus ``merge_record.json``.

    The plan is checked before any work (see :func:`plan_merge`); tensors are merged one key at a time (see
    :func:`merge_keys`) and streamed into a temporary folder beside ``output``, renamed to ``output`` at the
    end: an interrupted merge leaves nothing behind. Inputs are only read. Keys that are excluded, skipped or
    not floating-point are copied from the base, so the output has exactly the base's keys and loads like it.

    Args:
        method: a method object or a registry name (with default options).
        base, finetuned: paths (files or Hugging Face folders), state dicts, or sources.
        output: the output folder; sharded above ``max_shard_size`` bytes, with
            ``model.safetensors.index.json``.
        exclude, strict: see :func:`plan_merge`. device, dtype: see :func:`merge_keys` (``dtype`` also applies
            to copied floating-point tensors).
        overwrite: replace an existing ``output`` (after the new one is complete).
        progress: show a progress bar.
        prefix: key prefix stripped from every source (e.g. ``"model."`` for LightningModule checkpoints).
        base_prefix: the prefix of the base if it differs (default: ``prefix``).
        input_hash: record the hash of every input file, as ``"<algorithm>:<hex>"``: ``"xxh3_128"`` (in a
            background thread that trails the merge's reads of safetensors inputs, so it hashes the pages the
            merge has just read; pickled checkpoints are read once more), ``"sha256"`` (matches the Hugging
            Face Hub's LFS ids; about 10x the time of reading the inputs from the page cache) or ``None``.

    Returns:
        The :class:`MergeRecord`, also saved as ``output/merge_record.json``.

    Raises:
        FileExistsError: ``output`` exists and ``overwrite`` is False.
        FileNotFoundError: an input that does not exist.
        ValueError, TypeError: invalid arguments or, with ``strict=True``, keys that do not match.
    """
    start = time.perf_counter()
    method = get_method(method)
    check_choice("input_hash", input_hash, (*HASHES, None))
    device, dtype = _resolve_device(device), _resolve_dtype(dtype)
    base_src = open_source(base, prefix=base_prefix if base_prefix is not None else prefix, label="base")
    ft_srcs = [
        open_source(f, prefix=prefix, label=f"finetuned[{i}]") for i, f in enumerate(_as_list(finetuned))
    ]
    output = _check_output(output, overwrite, [base_src, *ft_srcs])
    plan = plan_merge(base_src, ft_srcs, exclude=exclude, strict=strict)
    num_keys = len(plan.merge_keys)
    log.info("Merging %d keys of %d checkpoints with %s into %s", num_keys, len(ft_srcs), method.name, output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning-merge-hash")
    marks = ReadMarks()
    try:
        tmp.mkdir()
        hashing = start_hashing([base_src, *ft_srcs], input_hash, pool, marks)
        keys, to_merge = list(plan.shapes), set(plan.merge_keys)
        stream = _stream(method, base_src, ft_srcs, keys, device, dtype, progress, to_merge, marks)
        files = write_stream(tmp, _output_specs(plan, base_src, dtype), stream, max_shard_size=max_shard_size)
        marks.close()
        inputs = _describe_inputs(base_src, ft_srcs, hashing)
        record = _record(method, plan, inputs, [*files, RECORD_FILE], exclude, strict, device, dtype, start)
        record.save(tmp)
        _replace(tmp, output)
    except BaseException:
        marks.close(abort=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    log.info("Merged %s in %.1f s", output, record.seconds)
    return record


def _as_list(finetuned: Sequence[SourceLike]) -> list[SourceLike]:
    if isinstance(finetuned, str | os.PathLike | Mapping) or not isinstance(finetuned, Sequence):
        raise TypeError(
            f"Expected argument `finetuned` to be a sequence of checkpoints, but got"
            f" {type(finetuned).__name__}."
            " HINT: wrap a single checkpoint in a list."
        )
    return list(finetuned)


def _record(method: MergeMethod, plan: MergePlan, inputs: list[dict[str, Any]], outputs: list[str],
            exclude: Sequence[str], strict: bool, device: torch.device, dtype: torch.dtype | None,
            start: float) -> MergeRecord:
    return MergeRecord(
        method=method.name,
        options=method.options(),
        scaling=float(method.scaling),
        inputs=inputs,
        outputs=outputs,
        merged_keys=list(plan.merge_keys),
        excluded_keys=list(plan.excluded_keys),
        skipped=dict(plan.skipped),
        exclude=list(exclude),
        strict=bool(strict),
        device=str(device),
        dtype=None if dtype is None else str(dtype).removeprefix("torch."),
        version=_version(),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        seconds=round(time.perf_counter() - start, 3),
    )


def task_matrices(
    method: MergeMethod,
    base: CheckpointSource,
    finetuned: Sequence[CheckpointSource],
    keys: Iterable[str],
    *,
    device: torch.device | str | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Stream ``(key, M)``: the merged task matrix of each key with scaling 1, for ``W(lam) = W0 + lam * M``.

    Computed once per method, it lets a scaling search try every ``lam`` without merging again
    (see :func:`lightning_merge.evaluation.search_scaling`): :meth:`MergeMethod.merged_delta` with scaling 1, on
    CPU, in float32 (float64 for float64 inputs).
    """
    if not isinstance(method, MergeMethod):
        raise TypeError(f"Expected argument `method` to be a MergeMethod, but got {type(method).__name__}.")
    _check_sources(base, finetuned)
    unit, device = method.with_scaling(1.0), _resolve_device(device)
    for key in keys:
        tuned = [ft.get_tensor(key, device) for ft in finetuned]
        yield key, unit.merged_delta(base.get_tensor(key, device), tuned).cpu()
