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
from collections.abc import Callable, Sequence

import regex

from lightning_merge.functional._checks import Fix, HintedError
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
        skipped: key -> reason, for keys not merged: non-floating-point buffers (copied from the base, or not
            written when only a fine-tuned source has them), and with ``strict=False`` keys missing from, shaped
            differently in, or not floating-point in a fine-tuned source (copied from the base), or present only in
            a fine-tuned source (not written).
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


PATTERN_TIMEOUT_S = 0.25
"""The most one ``re:`` pattern may take on one key: patterns come from configs and keys from files, either may be
hostile, and a backtracking regex (``re:(a|aa)+$`` on a long key) would otherwise hang the merge."""


def _matcher(pattern: str) -> Callable[[str], bool]:
    if not pattern.startswith("re:"):
        return lambda key: fnmatch.fnmatchcase(key, pattern)  # fnmatch's translation does not backtrack badly
    try:
        compiled = regex.compile(pattern[3:])
    except regex.error as err:
        raise ValueError(
            f"Expected argument `exclude` to hold valid regexes after 're:', but got {pattern!r} ({err})."
        ) from None

    def matches(key: str) -> bool:
        try:
            return compiled.fullmatch(key, timeout=PATTERN_TIMEOUT_S) is not None
        except TimeoutError:
            raise ValueError(
                f"Expected argument `exclude` to hold patterns that match in bounded time, but {pattern!r} took over"
                f" {PATTERN_TIMEOUT_S} s on key {key[:80]!r} (catastrophic backtracking). HINT: use a glob, or a"
                " regex without nested repetition."
            ) from None

    return matches


def _head_glob(key: str) -> str:
    return key.rsplit(".", 1)[0] + ".*" if "." in key else key


def _missing_problem(key: str, base: CheckpointSource, ft: CheckpointSource, num_missing: int,
                     total: int) -> HintedError:
    message = (
        f"Key {key!r} of the base {base.name!r} is missing in the fine-tuned checkpoint {ft.name!r}"
        f" ({num_missing} of {total} base parameters are missing there)."
    )
    if num_missing == total:
        return HintedError(message, "the key names differ throughout; check the key prefix (e.g. {0} for a"
                           " LightningModule checkpoint)", [Fix("prefix", "model.")])
    return HintedError(message, "exclude task-specific keys ({0}) or pass {1} to merge the common keys",
                       [Fix("exclude", [_head_glob(key)]), Fix("strict", False)])


def _shape_problem(key: str, base: CheckpointSource, ft: CheckpointSource) -> HintedError:
    return HintedError(
        f"Key {key!r} has shape {tuple(base.shape(key))} in the base {base.name!r} but {tuple(ft.shape(key))} in"
        f" the fine-tuned checkpoint {ft.name!r}.",
        "if it is task-specific (e.g. a classification head), exclude it with {0}; or pass {1} to merge the other"
        " keys", [Fix("exclude", [_head_glob(key)]), Fix("strict", False)],
    )


def _dtype_problem(key: str, base: CheckpointSource, ft: CheckpointSource) -> HintedError:
    return HintedError(
        f"Key {key!r} is {base.dtype(key)} in the base {base.name!r} but {ft.dtype(key)} in the fine-tuned"
        f" checkpoint {ft.name!r}: a task vector needs floating-point values on both sides (another architecture,"
        " or a buffer saved in place of the parameter?).",
        "exclude it ({0}) to copy it from the base, or pass {1} to merge the other keys",
        [Fix("exclude", [key]), Fix("strict", False)],
    )


def _extra_problem(key: str, base: CheckpointSource, ft: CheckpointSource) -> HintedError:
    return HintedError(
        f"Key {key!r} of the fine-tuned checkpoint {ft.name!r} is not in the base {base.name!r}.",
        "exclude it if it is task-specific ({0}), or pass {1} to leave it out",
        [Fix("exclude", [_head_glob(key)]), Fix("strict", False)],
    )


@dataclasses.dataclass
class _Checks:
    """Problems found while planning: ``key -> (short reason, error)``, in discovery order."""

    problems: dict[str, tuple[str, HintedError]] = dataclasses.field(default_factory=dict)

    def add(self, key: str, reason: str, error: HintedError) -> None:
        self.problems.setdefault(key, (reason, error))

    def raise_first(self) -> None:
        if self.problems:
            error = next(iter(self.problems.values()))[1]
            more = len(self.problems) - 1
            raise error.wrapped(after=f" ({more} more problem{'s' * (more > 1)} of this kind.)" if more else "")


def _check_key(key: str, base: CheckpointSource, finetuned: Sequence[CheckpointSource],
               key_sets: list[set[str]], missing: list[int], total: int, checks: _Checks) -> bool:
    """Record the first problem of ``key`` in any fine-tuned source; ``True`` when it can be merged."""
    for ft, keys, num_missing in zip(finetuned, key_sets, missing, strict=True):
        if key not in keys:
            error = _missing_problem(key, base, ft, num_missing, total)
            checks.add(key, f"missing in {ft.name!r}, copied from the base", error)
        elif tuple(ft.shape(key)) != tuple(base.shape(key)):
            shapes = f"shape {tuple(ft.shape(key))} in {ft.name!r} != {tuple(base.shape(key))} in the base"
            checks.add(key, f"{shapes}, copied from the base", _shape_problem(key, base, ft))
        elif not ft.dtype(key).is_floating_point:
            dtypes = f"{ft.dtype(key)} in {ft.name!r}, {base.dtype(key)} in the base"
            checks.add(key, f"{dtypes}, copied from the base", _dtype_problem(key, base, ft))
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
        strict: raise on the first missing key, shape mismatch, non-floating-point fine-tuned value of a
            floating-point base key, or key absent from the base (with the key, the files, the shapes and a hint);
            ``False`` records them in :attr:`MergePlan.skipped` instead.

    Non-floating-point tensors (integer buffers such as ``position_ids`` or ``token_type_ids``, step counters, bool
    masks) are not task parameters: the engine copies them from the base and never reads them from a fine-tune, so
    they are not checked against the fine-tunes, a fine-tune may lack them, and one that has them where the base
    does not is not an error (they are not written). They are not counted among the "missing" keys either: the
    count in a missing-key message is over the base's floating-point keys that are not excluded. A key that is
    floating-point in the base must be floating-point in every fine-tune (an int64 tensor there is refused, not
    subtracted).

    Errors are :class:`~lightning_merge.functional._checks.HintedError`: their hint names the options in the
    language of the interface (``exclude=['head.*']`` here, ``--exclude 'head.*'`` from ``lightning-merge``).

    Raises:
        HintedError: with ``strict=True``, a key problem (a ``ValueError``).
        ValueError: an invalid regex; no fine-tuned source.
        TypeError: a source that is not a :class:`CheckpointSource`, or ``exclude`` that is not a list of str.
    """
    check_sources(base, finetuned)
    matchers = compile_exclude(exclude)
    base_keys = base.keys()
    key_sets = [set(ft.keys()) for ft in finetuned]
    excluded = [k for k in base_keys if any(m(k) for m in matchers)]
    skipped = {k: f"non-floating-point buffer ({base.dtype(k)}), copied from the base" for k in base_keys
               if k not in excluded and not base.dtype(k).is_floating_point}
    parameters = [k for k in base_keys if k not in excluded and k not in skipped]
    missing = [sum(k not in keys for k in parameters) for keys in key_sets]
    checks, merged = _Checks(), []
    for key in parameters:
        if _check_key(key, base, finetuned, key_sets, missing, len(parameters), checks):
            merged.append(key)
    _check_extra_keys(base, finetuned, set(base_keys), matchers, checks, skipped)
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
                      matchers: list[Callable[[str], bool]], checks: _Checks, skipped: dict[str, str]) -> None:
    """Keys of a fine-tuned source absent from the base: a problem, except non-floating-point buffers (recorded in
    ``skipped``: an integer buffer such as ``position_ids`` is saved by some library versions and not by others)."""
    for ft in finetuned:
        for key in ft.keys():
            if key in base_keys or any(m(key) for m in matchers):
                continue
            if not ft.dtype(key).is_floating_point:
                skipped.setdefault(key, f"non-floating-point buffer only in the fine-tuned {ft.name!r}, not written")
            else:
                checks.add(key, f"only in the fine-tuned {ft.name!r}, not written", _extra_problem(key, base, ft))


def _warn_unused(exclude: Sequence[str], matchers: list[Callable[[str], bool]], keys: list[str]) -> None:
    for pattern, match in zip(exclude, matchers, strict=True):
        if not any(match(k) for k in keys):
            log.warning("Exclude pattern %r matches no key of the base.", pattern)
