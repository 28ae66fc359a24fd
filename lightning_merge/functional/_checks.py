"""Argument validation shared by the merge functions (one error template, checks before any work)."""

from __future__ import annotations

import dataclasses
import math
import shlex
from collections.abc import Sequence
from typing import Literal, TypeGuard

import torch
from torch import Tensor

Rank = int | float | None


def numel(shape: Sequence[int]) -> int:
    """The number of entries of a tensor of this shape (1 for a 0-d shape).

    Example:
        >>> numel((3072, 768)), numel(())
        (2359296, 1)
    """
    return math.prod(shape)


def is_int(value: object) -> TypeGuard[int]:
    """Whether ``value`` is an ``int`` (a ``bool`` is not one here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is a finite ``int`` or ``float`` (a ``bool`` is not a number here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_positive_int(name: str, value: object, *, unit: str | None = None) -> None:
    """Raise ``ValueError`` unless ``value`` is an int of at least 1 (``unit``, e.g. ``"bytes"``, goes in the message).

    Example:
        >>> check_positive_int("chunk_size", 0, unit="bytes")
        Traceback (most recent call last):
        ...
        ValueError: Expected argument `chunk_size` to be a positive int (bytes), but got 0.
    """
    if not (is_int(value) and value >= 1):
        suffix = f" ({unit})" if unit else ""
        raise ValueError(f"Expected argument `{name}` to be a positive int{suffix}, but got {value!r}.")


def check_non_negative_int(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is an int of at least 0."""
    if not (is_int(value) and value >= 0):
        raise ValueError(f"Expected argument `{name}` to be a non-negative int, but got {value!r}.")


def check_finite_numbers(name: str, values: object, *, non_empty: bool = False) -> tuple[float, ...]:
    """``values`` as a tuple of floats; ``ValueError`` unless it is a sequence of finite numbers (and not empty
    with ``non_empty``).

    Example:
        >>> check_finite_numbers("grid", [0, 0.5])
        (0.0, 0.5)
    """
    items = tuple(values) if isinstance(values, Sequence) else None
    numbers = tuple(float(v) for v in items if is_finite_number(v)) if items is not None else ()
    if items is None or (non_empty and not items) or len(numbers) != len(items):
        kind = "a non-empty sequence" if non_empty else "a sequence"
        raise ValueError(f"Expected argument `{name}` to be {kind} of finite numbers, but got {values!r}.")
    return numbers


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 stays float64, everything else (fp16, bf16, fp32) runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stack_task_vectors(task_vectors: Sequence[Tensor] | Tensor, weights: Sequence[float] | None = None) -> Tensor:
    """Validate the task vectors and stack them as ``(T, *shape)`` in the compute dtype, times ``weights``.

    A stacked ``(T, *shape)`` tensor already in the compute dtype is used as is (no copy); the input is never
    modified.

    Raises:
        ValueError: empty input, mismatched shapes, non-finite values, or ``weights`` of the wrong length.
        TypeError: a non-tensor or a non-floating-point tensor.
    """
    if isinstance(task_vectors, Tensor):
        _check_tensor(task_vectors, "task_vectors")
        if task_vectors.ndim == 0 or task_vectors.shape[0] == 0:
            raise ValueError("Expected argument `task_vectors` to hold at least one tensor, but got an empty stack.")
        stacked = task_vectors.to(compute_dtype(task_vectors.dtype))
    else:
        stacked = _stack(list(task_vectors))
    _check_finite(stacked)
    if weights is not None:
        check_weights(weights, stacked.shape[0])
        w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
        stacked = stacked * w.view(-1, *([1] * (stacked.ndim - 1)))
    return stacked


def _check_tensor(tv: object, name: str) -> None:
    if not isinstance(tv, Tensor):
        raise TypeError(f"Expected argument `{name}` to be a torch.Tensor, but got {type(tv).__name__}.")
    if not tv.is_floating_point():
        raise TypeError(f"Expected argument `{name}` to be a floating-point tensor, but got dtype {tv.dtype}.")


def _stack(task_vectors: list[Tensor]) -> Tensor:
    if not task_vectors:
        raise ValueError("Expected argument `task_vectors` to hold at least one tensor, but got an empty sequence.")
    for t, tv in enumerate(task_vectors):
        _check_tensor(tv, f"task_vectors[{t}]")
        if tv.shape != task_vectors[0].shape:
            raise ValueError(
                f"Expected every task vector to have shape {tuple(task_vectors[0].shape)} like `task_vectors[0]`,"
                f" but `task_vectors[{t}]` has shape {tuple(tv.shape)}."
            )
    first = task_vectors[0]
    out = torch.empty((len(task_vectors), *first.shape), dtype=compute_dtype(first.dtype), device=first.device)
    for t, tv in enumerate(task_vectors):
        out[t].copy_(tv)
    return out


def _check_finite(stacked: Tensor) -> None:
    # One reduction instead of a full-size boolean mask: a NaN or Inf anywhere makes the sum non-finite. Only then
    # (or on an overflowing sum of finite values) is the exact per-task check run, for the message.
    if torch.isfinite(stacked.sum()):
        return
    bad = [t for t in range(stacked.shape[0]) if not torch.isfinite(stacked[t]).all()]
    if bad:
        raise ValueError(f"Expected finite task vectors, but `task_vectors{bad}` contain NaN or Inf.")


def finite_as(merged: Tensor, dtype: torch.dtype) -> Tensor:
    """``merged`` cast to ``dtype``, checked finite: finite inputs can still sum past the range of a dtype
    (float16 tops out at 65504), and an overflow must be an error, not an Inf or NaN in the merged model.

    Raises:
        ValueError: a merged value is NaN or Inf in ``dtype``.
    """
    out = merged.to(dtype)
    probe = out.float() if dtype.itemsize == 1 else out  # float8 has no sum on CPU; its values fit float32
    # the cheap reduction first (as in _check_finite); the exact check only when it is not finite
    if not torch.isfinite(probe.sum()) and not torch.isfinite(probe).all():
        raise HintedError(
            f"Expected the merged values to be finite in {dtype}, but some overflow to NaN or Inf although"
            " the task vectors are finite.", "lower {0} or {1}, or merge in a wider dtype ({2})",
            [Fix("scaling"), Fix("weights"), Fix("dtype", "float32")],
        )
    return out


def check_weights(weights: Sequence[float] | None, num_tasks: int | None = None) -> None:
    if weights is None:
        return
    weights = list(weights)
    check_finite_numbers("weights", weights)
    if num_tasks is not None and len(weights) != num_tasks:
        raise ValueError(
            f"Expected argument `weights` to have one entry per task ({num_tasks}), but got {len(weights)}."
        )


def check_rank(rank: Rank) -> None:
    ok_int = is_int(rank) and rank > 0
    ok_float = isinstance(rank, float) and 0.0 < rank <= 1.0
    if not (rank is None or ok_int or ok_float):
        raise ValueError(
            f"Expected argument `rank` to be None, a positive int or a float in (0, 1], but got {rank!r}."
        )


def resolve_rank(rank: Rank, r: int, num_tasks: int) -> int:
    """Per-task number of kept components ``k`` for a matrix of rank budget ``r = min(m, n)``.

    ``None``: ``max(1, r // T)`` (METHODS.md; the reference returns zero when ``r < T``, we keep one). An int is
    clamped to ``r``; a float is a fraction of ``r`` (at least one component).
    """
    check_rank(rank)
    if rank is None:
        return max(1, r // num_tasks)
    if isinstance(rank, int):
        return min(rank, r)
    return max(1, math.floor(rank * r))


def check_scaling(scaling: float) -> None:
    if not is_finite_number(scaling):
        raise ValueError(f"Expected argument `scaling` to be a finite number, but got {scaling!r}.")


def check_density(density: float) -> None:
    if not (is_finite_number(density) and 0.0 < density <= 1.0):
        raise ValueError(f"Expected argument `density` to be a float in (0, 1], but got {density!r}.")


def check_rcond(rcond: float) -> None:
    if not (is_finite_number(rcond) and 0.0 <= rcond < 1.0):
        raise ValueError(f"Expected argument `rcond` to be a float in [0, 1), but got {rcond!r}.")


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"Expected argument `{name}` to be one of {list(choices)}, but got {value!r}.")


_NAME_ONLY = object()


@dataclasses.dataclass(frozen=True)
class Fix:
    """An option of the interface (a keyword of the Python API, a flag of the command) and, optionally, the value
    that would fix an error; each interface renders it in its own language.

    Example:
        >>> Fix("exclude", ["pooler.dense.*"]).python(), Fix("exclude", ["pooler.dense.*"]).command()
        ("exclude=['pooler.dense.*']", "--exclude 'pooler.dense.*'")
        >>> Fix("strict", False).command(), Fix("base_prefix", "model.").command(), Fix("scaling").command()
        ('--no-strict', '--base-prefix model.', '`--scaling`')
    """

    option: str
    value: object = _NAME_ONLY

    def python(self) -> str:
        return f"`{self.option}`" if self.value is _NAME_ONLY else f"{self.option}={self.value!r}"

    def command(self) -> str:
        flag = "--" + self.option.replace("_", "-")
        if self.value is _NAME_ONLY:
            return f"`{flag}`"
        if isinstance(self.value, bool):
            return flag if self.value else f"--no-{flag[2:]}"
        values = self.value if isinstance(self.value, list | tuple) else [self.value]
        return " ".join([flag, *(shlex.quote(str(v)) for v in values)])


class HintedError(ValueError):
    """A ``ValueError`` whose ``HINT:`` names options: ``hint`` is a template whose ``{0}``, ``{1}``, ... are the
    ``fixes``. ``str(err)`` speaks the Python API (``exclude=['head.*']``, ``strict=False``);
    ``err.render("command")`` speaks the command line (``--exclude 'head.*'``, ``--no-strict``), which is how
    ``lightning-merge`` prints it. ``suffix`` follows the hint (e.g. how many more problems there are).

    Example:
        >>> err = HintedError("Key 'head.w' is missing.", "exclude it ({0}) or pass {1}", [Fix("exclude", ["head.*"]),
        ...                   Fix("strict", False)])
        >>> str(err)
        "Key 'head.w' is missing. HINT: exclude it (exclude=['head.*']) or pass strict=False."
        >>> err.render("command")
        "Key 'head.w' is missing. HINT: exclude it (--exclude 'head.*') or pass --no-strict."
    """

    def __init__(self, message: str, hint: str, fixes: Sequence[Fix], suffix: str = "") -> None:
        self.message, self.hint, self.fixes, self.suffix = message, hint, tuple(fixes), suffix
        super().__init__(self.render("python"))

    def render(self, language: Literal["python", "command"]) -> str:
        shown = [fix.python() if language == "python" else fix.command() for fix in self.fixes]
        return f"{self.message} HINT: {self.hint.format(*shown)}.{self.suffix}"

    def wrapped(self, before: str = "", after: str = "") -> HintedError:
        """The same error with text added before the message and after the hint."""
        return HintedError(before + self.message, self.hint, self.fixes, self.suffix + after)
