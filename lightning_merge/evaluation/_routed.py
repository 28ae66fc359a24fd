"""Task-routed models: task ``t`` scored with its own update of the base, ``W0 + D_t``, and its own head (no ``lam``).

TSV-C (Gargiulo et al., CVPR 2025; :mod:`lightning_merge.compress`) keeps every task separately, compressed to its
top singular components, and picks the task at inference: task ``t`` runs ``W0 + trunc_k(D_t)``. Such a row sits
beside the merged ones in a :class:`~lightning_merge.evaluation.MergeReport`, whose ``retained`` score per task is
``routed / own fine-tune``.

``MergedEvalLoop.compare(..., routed={row: {task: {key: D_t}}})`` takes any updates (e.g. ``load_compressed(folder)``
of the folders ``MergeCallback(compress=...)`` wrote, ``{task: load_compressed(f) for task, f in
merge.compressed.items()}``). ``compare_callback(..., compressed={row: TSVC(...)})`` computes them **in memory** from
the callback's inputs (:class:`CompressedTasks`: the same base and task sources, keys and math as the callback's
``compress`` option and :func:`~lightning_merge.compress.compress_checkpoints`; one task's updates at a time, each key
read and truncated when it is loaded), so several ranks can be compared without writing anything.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_merge.compress import TSVC
from lightning_merge.evaluation._states import State
from lightning_merge.functional._checks import compute_dtype
from lightning_merge.io.protocol import CheckpointSource

__all__ = ["CompressedTasks", "check_compressed", "check_routed", "method_names", "routed_state"]

Compressed = TSVC | Mapping[str, TSVC | Mapping[str, Any]]


def method_names(methods: object) -> list[str]:
    """The row names ``compare_callback`` gives ``methods`` (a name, a method, a list of them, or a mapping)."""
    if isinstance(methods, Mapping):
        return [str(name) for name in methods]
    listed = [methods] if not isinstance(methods, Sequence) or isinstance(methods, str) else methods
    return [m if isinstance(m, str) else str(getattr(m, "name", m)) for m in listed]


def _check_name(name: object, argument: str, taken: Sequence[str]) -> str:
    if not isinstance(name, str) or not name or name in taken:
        raise ValueError(
            f"Expected the row names of `{argument}` to be non-empty strings other than the report's other rows"
            f" {list(taken)}, but got {name!r}."
        )
    return name


def check_compressed(compressed: Compressed | None, taken: Sequence[str]) -> dict[str, TSVC]:
    """``{row name: TSVC}`` from ``compressed`` (a ``TSVC``, named ``"tsv_c"``, or ``{row: TSVC or its options}``).

    Raises:
        TypeError: not a ``TSVC`` or such a mapping. ValueError: a row name taken by another row, a bad option.
    """
    if compressed is None:
        return {}
    items = {TSVC.name: compressed} if isinstance(compressed, TSVC) else compressed
    if not isinstance(items, Mapping) or not items:
        raise TypeError(
            "Expected argument `compressed` to be a TSVC or a non-empty mapping {row name: TSVC or its options}, but"
            f" got {compressed!r}."
        )
    out: dict[str, TSVC] = {}
    for name, method in items.items():
        _check_name(name, "compressed", [*taken, *out])
        if not isinstance(method, TSVC | Mapping):
            raise TypeError(f"Expected `compressed[{name!r}]` to be a TSVC or its options, but got {method!r}.")
        out[name] = method if isinstance(method, TSVC) else TSVC.from_options(method, f"compressed[{name!r}]")
    return out


def check_routed(routed: Mapping[str, Mapping[str, State]] | None, tasks: Sequence[str], base: State,
                 taken: Sequence[str]) -> dict[str, Mapping[str, State]]:
    """``routed`` checked before any work: distinct row names, an update for every task, keys among ``base``'s
    (``W0`` is needed for each; task heads are not updates). Shapes are checked when an update is loaded.

    Raises:
        TypeError: not mappings. ValueError: a taken row name, a task without an update, a key ``base`` lacks.
    """
    if routed is None:
        return {}
    if not isinstance(routed, Mapping):
        raise TypeError(
            f"Expected argument `routed` to be a mapping {{row: {{task: {{key: D_t}}}}}}, but got {routed!r}."
        )
    for name, updates in routed.items():
        _check_name(name, "routed", taken)
        for task in tasks:
            _check_update(updates, task, base, f"routed[{name!r}]")
    return dict(routed)


def _check_update(updates: object, task: str, base: State, what: str) -> None:
    if not isinstance(updates, Mapping) or task not in updates:
        raise ValueError(f"Expected `{what}` to hold an update for every task, but task {task!r} has none.")
    update = updates[task]
    if not isinstance(update, Mapping):
        raise TypeError(f"Expected `{what}[{task!r}]` to be a state dict, but got {type(update).__name__}.")
    extra = sorted(set(update) - set(base))
    if extra:
        raise ValueError(
            f"Expected the keys of `{what}[{task!r}]` to be keys of `base`, but got {extra[:5]}. HINT: the updates"
            " are of the merged keys; task heads go in `heads`."
        )


def routed_state(base: State, update: State, what: str) -> dict[str, Tensor]:
    """``W0 + D_t`` for every key of ``base`` (``W0`` where ``update`` has no key), in the compute dtype.

    Raises:
        ValueError: an update of another shape than ``base``'s, naming ``what[key]``.
    """
    state = {}
    for key, w0 in base.items():
        if key not in update:
            state[key] = w0
            continue
        delta = update[key]
        if tuple(delta.shape) != tuple(w0.shape):
            raise ValueError(
                f"Expected `{what}[{key!r}]` to have the shape of `base[{key!r}]` {tuple(w0.shape)}, but got"
                f" {tuple(delta.shape)}."
            )
        dtype = compute_dtype(w0.dtype)
        state[key] = w0.to(dtype) + delta.to(w0.device, dtype)
    return state


class _TaskUpdate(Mapping[str, Tensor]):
    """One task's TSV-C updates of ``keys``, each computed when read: ``trunc_k(D_t)`` for matrices, ``D_t`` else."""

    def __init__(self, owner: CompressedTasks, source: CheckpointSource) -> None:
        self.owner, self.source = owner, source

    def __getitem__(self, key: str) -> Tensor:
        owner = self.owner
        if key not in owner.known:
            raise KeyError(key)
        delta = owner.method.delta(owner.base[key].to(owner.device), self.source.get_tensor(key, owner.device))
        if key not in owner.matrix_keys:
            return delta
        return owner.method.compress(delta, len(owner.sources)).dense()

    def __iter__(self) -> Iterator[str]:
        return iter(self.owner.keys_)

    def __len__(self) -> int:
        return len(self.owner.keys_)


class CompressedTasks(Mapping[str, Mapping[str, Tensor]]):
    """``{task: {key: update}}``: each task's TSV-C update of ``keys`` (:meth:`TSVC.compress` of ``D_t = W_t - W0``
    for the 2-D ``matrix_keys``, with ``T = len(sources)`` for the default rank; ``D_t`` whole for the others),
    computed lazily from ``base`` (``{key: W0}``) and ``sources`` (``{task: fine-tuned source}``), on ``device``
    (default CPU; the SVDs run there).

    Example:
        >>> import torch
        >>> from lightning_merge.io import open_source
        >>> base = {"w": torch.zeros(3, 2), "b": torch.zeros(3)}
        >>> tuned = {"w": torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), "b": torch.ones(3)}
        >>> tasks = CompressedTasks(TSVC(rank=1), base, {"t": open_source(tuned)}, ["w", "b"], ["w"])
        >>> tasks["t"]["w"], tasks["t"]["b"]
        (tensor([[3., 0.],
                [0., 0.],
                [0., 0.]]), tensor([1., 1., 1.]))
    """

    def __init__(self, method: TSVC, base: State, sources: Mapping[str, CheckpointSource], keys: Sequence[str],
                 matrix_keys: Sequence[str], device: torch.device | str | None = None) -> None:
        self.method, self.base, self.sources = method, base, dict(sources)
        self.device = torch.device(device if device is not None else "cpu")
        self.keys_, self.known, self.matrix_keys = list(keys), set(keys), set(matrix_keys)

    def __getitem__(self, task: str) -> Mapping[str, Tensor]:
        return _TaskUpdate(self, self.sources[task])

    def __iter__(self) -> Iterator[str]:
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)
