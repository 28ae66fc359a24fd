"""The streaming merge: per key, load the base and the ``T`` fine-tuned tensors, merge them, drop them.

This stage owns :func:`merge_keys` and :func:`stream_keys` (the per-key loop, with the next key's inputs prefetched in a
worker thread while this key is merged), the combination of one key (``method(base, finetuned)`` in the wider of the
input and output dtypes, checked finite when cast narrower), the resolution of the ``device`` and ``dtype``
arguments (:data:`DTYPES`), :func:`task_matrices` for a scaling search, and their progress bar, which advances by
each key's cost (:func:`key_cost`, the cost model that shards the keys) and names the current key. At most the
inputs of two keys are held at once, so memory is bounded by the largest parameter, not by the model size times ``T``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_merge.engine.plan import check_sources
from lightning_merge.functional._checks import HintedError, finite_as, numel
from lightning_merge.io.hashing import ReadMarks
from lightning_merge.io.sources import CheckpointSource
from lightning_merge.methods import MergeMethod

__all__ = ["DTYPES", "key_cost", "merge_keys", "resolve_device", "resolve_dtype", "stream_keys", "task_matrices"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_device(device: torch.device | str | None) -> torch.device:
    """The ``device`` argument as a ``torch.device`` (CPU when ``None``), checked to be usable before any work: an
    empty tensor is allocated on it (``cuda:0`` without CUDA, ``cuda:3`` on a machine with one GPU fail here), and
    ``meta`` (no values to merge) is refused."""
    try:
        resolved = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"Expected argument `device` to be a torch device such as 'cpu' or 'cuda:0', but got {device!r}."
        ) from None
    if resolved.type == "meta":
        raise ValueError("Expected argument `device` to be a device that holds values, such as 'cpu' or 'cuda:0',"
                         " but got 'meta' (meta tensors have shapes but no values to merge).")
    try:
        torch.empty(0, device=resolved)
    except Exception as err:  # RuntimeError, or AssertionError from a torch built without CUDA
        reason = " ".join(str(err).split()).split(". ")[0] or type(err).__name__
        raise ValueError(f"Expected argument `device` to be a device of this machine, but {device!r} is not"
                         f" available ({reason}).") from None
    return resolved


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The ``dtype`` argument as a floating-point ``torch.dtype`` (a name of :data:`DTYPES` or a dtype), or ``None``."""
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
    """The base tensor of ``key`` and, when it is merged (and floating-point), the ``T`` fine-tuned tensors."""
    tensor = base.get_tensor(key, device if merge else None)
    if not merge or not tensor.is_floating_point():
        return tensor, []
    return tensor, [ft.get_tensor(key, device) for ft in finetuned]


def _combine(method: MergeMethod, loaded: Loaded, dtype: torch.dtype | None) -> Tensor:
    """``method(base, finetuned)`` on CPU in ``dtype`` (default: the base's); the base, cast, when nothing to merge."""
    tensor, finetuned = loaded
    out_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    if not finetuned:
        return tensor.to(device="cpu", dtype=out_dtype)
    # merge in the wider of the two dtypes, so that asking for float32 output from bf16 inputs loses nothing
    tensor = tensor.to(torch.promote_types(tensor.dtype, out_dtype))
    merged = method(tensor, finetuned)  # finite in tensor.dtype: only a cast to a narrower dtype needs a check
    return (merged if merged.dtype == out_dtype else finite_as(merged, out_dtype)).cpu()


def _combine_key(method: MergeMethod, key: str, loaded: Loaded, dtype: torch.dtype | None,
                 finetuned: Sequence[CheckpointSource], base_name: str = "base") -> Tensor:
    """:func:`_combine`, naming the key and the checkpoints in a value error (e.g. NaN from a corrupt file): the
    base when it is the one that is not finite."""
    try:
        return _combine(method, loaded, dtype)
    except ValueError as err:
        base, tuned = loaded
        if tuned and not torch.isfinite(base).all():  # a NaN in the base makes every task vector NaN: name the base
            raise ValueError(f"Could not merge key {key!r}: the base {base_name!r} holds NaN or Inf in it, so every"
                             " task vector does; the fine-tuned checkpoints are not to blame.") from None
        names = [ft.name for ft in finetuned]
        where = f" (`task_vectors[t]` is the fine-tuned checkpoint t of {names})."
        if isinstance(err, HintedError):
            raise err.wrapped(f"Could not merge key {key!r}: ", where) from None
        raise ValueError(f"Could not merge key {key!r}: {err}{where}") from None


def _prefetched(load: Callable[[str], Loaded], keys: Sequence[str]) -> Iterator[tuple[str, Loaded]]:
    """``(key, load(key))`` in order; a worker thread loads the next key while the caller merges this one.

    Reading overlaps the merge at the cost of holding the inputs of two keys instead of one.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning-merge-read") as pool:
        pending = pool.submit(load, keys[0]) if keys else None
        for i, key in enumerate(keys):
            loaded = pending.result()  # type: ignore[union-attr]  # keys[i] was submitted
            pending = pool.submit(load, keys[i + 1]) if i + 1 < len(keys) else None
            yield key, loaded
            del loaded


def _mark_read(marks: ReadMarks, sources: Sequence[CheckpointSource], key: str) -> None:
    for source in sources:
        if (where := source.location(key)) is not None:
            marks.advance(where[0], where[2])


def _check_method(method: MergeMethod) -> None:
    if not isinstance(method, MergeMethod):
        raise TypeError(f"Expected argument `method` to be a MergeMethod, but got {type(method).__name__}.")


def key_cost(method: MergeMethod, base: CheckpointSource, key: str, num_tasks: int, merged: bool) -> float:
    """The work of one key on the progress bar: ``method.cost(shape, num_tasks)`` (the cost model that shards the
    keys across ranks, :func:`~lightning_merge.engine.shard_keys`) for a merged floating-point key; for a key copied
    from the base its number of elements, i.e. what averaging one task would cost (a copy touches each element once);
    at least 1, so that every key moves the bar.

    Example:
        >>> from lightning_merge.io.sources import open_source
        >>> from lightning_merge.methods import get_method
        >>> base = open_source({"w": torch.zeros(4, 3), "step": torch.tensor(3)})
        >>> key_cost(get_method("average"), base, "w", 2, True), key_cost(get_method("average"), base, "step", 2, True)
        (24.0, 1.0)
    """
    shape = tuple(base.shape(key))
    if merged and base.dtype(key).is_floating_point:
        return max(1.0, float(method.cost(shape, num_tasks)))
    return float(max(1, numel(shape)))


class _Progress:
    """A progress bar over the keys' costs (:func:`key_cost`) that shows the key being worked on."""

    def __init__(self, costs: Mapping[str, float], enabled: bool, desc: str) -> None:
        self.costs = costs
        self.bar = tqdm(total=sum(costs.values()), desc=desc, unit="flop", unit_scale=True, disable=not enabled,
                        leave=False, dynamic_ncols=True)

    def start(self, key: str) -> None:
        self.bar.set_postfix_str(key)

    def done(self, key: str) -> None:
        self.bar.update(self.costs[key])

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def _progress(method: MergeMethod, base: CheckpointSource, num_tasks: int, keys: Sequence[str],
              merged: Collection[str] | None, enabled: bool, desc: str) -> _Progress:
    costs = {k: key_cost(method, base, k, num_tasks, merged is None or k in merged) for k in keys}
    return _Progress(costs, enabled, desc)


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
        progress: show a progress bar over the work of the keys (:func:`key_cost`: the method's cost model,
            so its ETA holds when one key, e.g. an embedding matrix, is most of the work) and the current key.
    """
    _check_method(method)
    check_sources(base, finetuned)
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    return stream_keys(method, base, finetuned, list(keys), device, dtype, progress)


def stream_keys(
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
    """Merge ``keys`` in order (only those in ``merged`` when given; the others are copied from the base); after
    each key, report to ``marks`` how far into each file the merge has read (``CheckpointSource.location``)."""

    def load(key: str) -> Loaded:
        return _load(base, finetuned, key, device, merged is None or key in merged)

    with _progress(method, base, len(finetuned), keys, merged, progress, f"merging ({method.name})") as bar:
        for key, loaded in _prefetched(load, keys):
            bar.start(key)
            tensor = _combine_key(method, key, loaded, dtype, finetuned, base.name)
            if marks is not None:
                _mark_read(marks, [base, *finetuned] if loaded[1] else [base], key)
            del loaded
            bar.done(key)
            yield key, tensor
            del tensor


def task_matrices(
    method: MergeMethod,
    base: CheckpointSource,
    finetuned: Sequence[CheckpointSource],
    keys: Iterable[str],
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Iterator[tuple[str, Tensor]]:
    """Stream ``(key, M)``: the merged task matrix of each key with scaling 1, for ``W(lam) = W0 + lam * M``.

    Computed once per method, it lets a scaling search try every ``lam`` without merging again
    (see :func:`lightning_merge.evaluation.search_scaling`): :meth:`MergeMethod.merged_delta` with scaling 1, on
    CPU, in float32 (float64 for float64 inputs). The next key's inputs are read while this one is computed, as in
    :func:`merge_keys`; ``progress`` shows the same progress bar (over :func:`key_cost`, with the current key).
    """
    _check_method(method)
    check_sources(base, finetuned)
    unit, device, keys = method.with_scaling(1.0), resolve_device(device), list(keys)

    def load(key: str) -> Loaded:
        return base.get_tensor(key, device), [ft.get_tensor(key, device) for ft in finetuned]

    return _stream_task_matrices(unit, base, len(finetuned), keys, load, progress)


def _stream_task_matrices(unit: MergeMethod, base: CheckpointSource, num_tasks: int, keys: Sequence[str],
                          load: Callable[[str], Loaded], progress: bool) -> Iterator[tuple[str, Tensor]]:
    with _progress(unit, base, num_tasks, keys, None, progress, f"task matrices ({unit.name})") as bar:
        for key, (tensor, tuned) in _prefetched(load, keys):
            bar.start(key)
            matrix = unit.merged_delta(tensor, tuned).cpu()
            del tensor, tuned
            bar.done(key)
            yield key, matrix
