"""The merge plan: which keys are merged, which are excluded or skipped, checked before any tensor is read.

This stage owns :class:`MergePlan` and :func:`plan_merge`: the ``exclude`` matchers (globs, or regexes after
``re:``), the checks of every fine-tuned source's keys and shapes against the base (with messages that name the key,
the checkpoints, the shapes and a hint), and :func:`check_sources`, the argument check shared by the later stages.
It reads only keys, shapes and dtypes (file headers where the format has them), never tensor data.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import re
from collections.abc import Callable, Sequence

from lightning_merge.io.sources import CheckpointSource

__all__ = ["MergePlan", "check_sources", "compile_exclude", "plan_merge"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MergePlan:
    """Which keys are merged and how, decided up front from the base and every fine-tuned source.

    Attributes:
        matrix_keys: floating-point 2-D parameters, merged as matrices.
        other_keys: other floating-point parameters (biases, norms, 1-D, 0-D, conv kernels).
        excluded_keys: base keys matched by ``exclude`` (task-specific, e.g. heads): never merged, copied from base.
        skipped: key -> reason, for keys not merged: non-floating-point buffers (copied from the base), and with
            ``strict=False`` keys missing from or shaped differently in a fine-tuned source (copied from the base),
            or present only in a fine-tuned source (not written).
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


def compile_exclude(exclude: Sequence[str]) -> list[Callable[[str], bool]]:
    """Matchers for ``exclude``: globs (``fnmatch``, case-sensitive), or regexes (``re.fullmatch``) after ``re:``."""
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
        "the key names differ throughout; check the key prefix (e.g. prefix='model.' for a LightningModule checkpoint)"
        if num_missing == total
        else f"exclude task-specific keys (exclude=[{_head_glob(key)!r}]) or pass strict=False to merge the common keys"
    )
    return (
        f"Key {key!r} of the base {base.name!r} is missing in the fine-tuned checkpoint {ft.name!r}"
        f" ({num_missing} of {total} base keys are missing there). HINT: {hint}."
    )


def _shape_problem(key: str, base: CheckpointSource, ft: CheckpointSource) -> str:
    return (
        f"Key {key!r} has shape {tuple(base.shape(key))} in the base {base.name!r} but {tuple(ft.shape(key))} in"
        f" the fine-tuned checkpoint {ft.name!r}. HINT: if it is task-specific (e.g. a classification head), exclude"
        f" it with exclude=[{_head_glob(key)!r}]; or pass strict=False to merge the other keys."
    )


def _extra_problem(key: str, base: CheckpointSource, ft: CheckpointSource) -> str:
    return (
        f"Key {key!r} of the fine-tuned checkpoint {ft.name!r} is not in the base {base.name!r}. HINT: exclude it"
        f" if it is task-specific (exclude=[{_head_glob(key)!r}]), or pass strict=False to leave it out."
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
    for ft, keys, num_missing in zip(finetuned, key_sets, missing, strict=True):
        if key not in keys:
            message = _missing_problem(key, base, ft, num_missing)
            checks.add(key, f"missing in {ft.name!r}, copied from the base", message)
        elif tuple(ft.shape(key)) != tuple(base.shape(key)):
            shapes = f"shape {tuple(ft.shape(key))} in {ft.name!r} != {tuple(base.shape(key))} in the base"
            checks.add(key, f"{shapes}, copied from the base", _shape_problem(key, base, ft))
    return key not in checks.problems


def check_sources(base: CheckpointSource, finetuned: Sequence[CheckpointSource]) -> None:
    """Check that ``base`` and every fine-tuned source are :class:`CheckpointSource` objects, at least one fine-tuned.

    Raises:
        TypeError: a source that is not a :class:`CheckpointSource` (named by its argument).
        ValueError: no fine-tuned source.
    """
    for arg, src in [("base", base), *((f"finetuned[{i}]", f) for i, f in enumerate(finetuned))]:
        if not isinstance(src, CheckpointSource):
            raise TypeError(f"Expected argument `{arg}` to be a CheckpointSource, but got {type(src).__name__}.")
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
    check_sources(base, finetuned)
    matchers = compile_exclude(exclude)
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
    for pattern, match in zip(exclude, matchers, strict=True):
        if not any(match(k) for k in keys):
            log.warning("Exclude pattern %r matches no key of the base.", pattern)
