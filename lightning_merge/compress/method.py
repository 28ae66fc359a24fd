"""The TSV-C configuration object and the names of compressed tasks (folder names, checked before any work)."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor

from lightning_merge.functional._checks import Rank, check_choice, check_rank, compute_dtype
from lightning_merge.functional.compress import Truncation, check_energy, tsv_c, tsv_c_tasks
from lightning_merge.functional.svd import SOLVERS, Solver

__all__ = ["TSVC", "check_task_names", "default_task_names"]


@dataclasses.dataclass(frozen=True)
class TSVC:
    """TSV-C, Task Singular Vectors Compress (Gargiulo et al., CVPR 2025, arXiv:2412.00081): each task's matrix
    parameters kept as their rank-``k`` truncations ``U_k diag(s_k) V_k^T`` (see
    :func:`lightning_merge.functional.tsv_c`), the other parameters whole.

    Attributes:
        rank: ``k`` per task, an int or a fraction of ``min(m, n)``; ``None`` (and no ``energy``):
            ``max(1, floor(r / T))`` for ``T`` tasks compressed together.
        energy: instead of ``rank``, the smallest ``k`` keeping this fraction of ``||D_t||_F^2``, per matrix.
        solver: ``"auto"`` (randomized where faster and provably converged), ``"exact"`` or ``"randomized"``.

    Example:
        >>> TSVC(rank=0.1).options()
        {'rank': 0.1, 'energy': None, 'solver': 'auto'}
        >>> TSVC(rank=4, energy=0.9)
        Traceback (most recent call last):
        ...
        ValueError: Expected at most one of the arguments `rank` and `energy`, but got rank=4 and energy=0.9.
    """

    name: ClassVar[str] = "tsv_c"
    reference_url: ClassVar[str] = "https://arxiv.org/abs/2412.00081"
    rank: Rank = None
    energy: float | None = None
    solver: Solver = "auto"

    def __post_init__(self) -> None:
        check_rank(self.rank)
        check_energy(self.energy)
        check_choice("solver", self.solver, SOLVERS)
        if self.rank is not None and self.energy is not None:
            raise ValueError(
                "Expected at most one of the arguments `rank` and `energy`, but got"
                f" rank={self.rank!r} and energy={self.energy!r}."
            )
        if self.energy is not None:
            object.__setattr__(self, "energy", float(self.energy))

    @classmethod
    def from_options(cls, options: Mapping[str, Any], argument: str = "options") -> TSVC:
        """``TSVC(**options)``, with an unknown option a ``ValueError`` naming ``argument`` (a config mapping).

        Example:
            >>> TSVC.from_options({"rank": 0.1})
            TSVC(rank=0.1, energy=None, solver='auto')
            >>> TSVC.from_options({"rnak": 2}, "compress")
            Traceback (most recent call last):
            ...
            ValueError: Expected argument `compress` to hold TSV-C options among ['rank', 'energy', 'solver'], ...
        """
        if not isinstance(options, Mapping):
            raise TypeError(f"Expected argument `{argument}` to be a mapping of TSV-C options, but got {options!r}.")
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = [str(key) for key in options if key not in known]
        if unknown:
            raise ValueError(
                f"Expected argument `{argument}` to hold TSV-C options among {known}, but got {unknown[0]!r}."
            )
        return cls(**options)

    def options(self) -> dict[str, Any]:
        """The constructor arguments, as primitives (for the record and ``TSVC(**options)``)."""
        return dataclasses.asdict(self)

    def compress(self, task_matrix: Tensor, num_tasks: int = 1) -> Truncation:
        """The truncation of one ``m x n`` task matrix (:func:`lightning_merge.functional.tsv_c`)."""
        return tsv_c(task_matrix, rank=self.rank, energy=self.energy, num_tasks=num_tasks, solver=self.solver)

    def compress_tasks(self, task_matrices: Tensor) -> list[Truncation]:
        """The truncations of the ``T`` task matrices ``(T, m, n)`` of one parameter, as one batch
        (:func:`lightning_merge.functional.tsv_c_tasks`: ``"auto"`` decides for the parameter from its first task)."""
        return tsv_c_tasks(task_matrices, rank=self.rank, energy=self.energy, solver=self.solver)

    def delta(self, base: Tensor, finetuned: Tensor) -> Tensor:
        """``D_t = W_t - W0`` in the compute dtype (float32, float64 for float64 weights): no cancellation in bf16."""
        dtype = compute_dtype(base.dtype)
        return finetuned.to(dtype) - base.to(dtype)


_RESERVED = {"merge_record.json"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def _name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not name:
        return "a non-empty string"
    if "/" in name or "\\" in name or "\0" in name or any(ord(c) < 32 for c in name):
        return "a name without path separators, NUL or control characters"
    if name.startswith(".") or name in _RESERVED:
        return "a name that does not start with '.' (no '.', '..' or hidden folders) and is not 'merge_record.json'"
    if len(name.encode()) > 255:
        return "a name of at most 255 bytes"
    return None


def check_task_names(names: Sequence[object]) -> list[str]:
    """``names`` as folder names, checked: non-empty strings, no path separators, NUL or control characters, no
    leading ``.`` (so no ``.``, ``..`` or hidden folders), at most 255 bytes, distinct even ignoring case.

    Raises:
        ValueError: the first bad name, named with its position.

    Example:
        >>> check_task_names(["mnist", "svhn"])
        ['mnist', 'svhn']
        >>> check_task_names(["../etc"])
        Traceback (most recent call last):
        ...
        ValueError: Expected task name 0 to be a name without path separators, ... but got '../etc'.
    """
    if not names:
        raise ValueError("Expected at least one task, but got none.")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        problem = _name_problem(name)
        if problem is not None:
            raise ValueError(f"Expected task name {i} to be {problem}, but got {name!r}.")
        folded = str(name).casefold()
        if folded in seen:
            raise ValueError(
                f"Expected distinct task names (they become folder names, compared ignoring case), but names"
                f" {seen[folded]} and {i} are {names[seen[folded]]!r} and {name!r}."
            )
        seen[folded] = i
    return [str(n) for n in names]


def _stem(item: object) -> str | None:
    if not isinstance(item, str | os.PathLike):
        return None
    path = Path(item)
    stem = path.name if path.is_dir() else path.stem
    safe = _UNSAFE.sub("_", stem).lstrip(".")
    return safe or None


def default_task_names(finetuned: Sequence[object] | Mapping[str, object]) -> list[str]:
    """The task names: a mapping's keys (checked, never changed), else each path's file stem made safe (characters
    outside ``[A-Za-z0-9._+-]`` become ``_``), or ``task0``, ``task1``, ... when stems are missing or collide.

    Example:
        >>> default_task_names(["runs/a b.ckpt", "runs/c.safetensors"]), default_task_names(["x/m.ckpt", "y/m.ckpt"])
        (['a_b', 'c'], ['task0', 'task1'])
    """
    if isinstance(finetuned, Mapping):
        return check_task_names(list(finetuned))
    stems = [_stem(item) for item in finetuned]
    if all(stems) and len({str(s).casefold() for s in stems}) == len(stems):
        try:
            return check_task_names(stems)
        except ValueError:
            pass
    return [f"task{i}" for i in range(len(stems))]
