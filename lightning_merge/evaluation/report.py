"""Results: per-task scores (:class:`EvalResult`) and the comparison of models (:class:`MergeReport`).

The schema is FusionBench's ``{task: {metric: value}}`` per model, with means over tasks, the normalized
score ``merged / own fine-tuned`` per task, and for task-routed rows (each task run with its own update, e.g. its
TSV-C compression) the retained score ``routed / own fine-tuned`` per task.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

PRETRAINED = "pretrained"
FINETUNED = "finetuned"


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Scores of one model, ``scores[task][metric]``, and their mean over tasks.

    Example:
        >>> result = EvalResult({"a": {"accuracy": 1.0}, "b": {"accuracy": 0.5}})
        >>> result.mean
        {'accuracy': 0.75}
    """

    scores: dict[str, dict[str, float]]

    @property
    def mean(self) -> dict[str, float]:
        """``(1/T) sum_t scores[t][metric]`` for every metric that all tasks report."""
        common = set.intersection(*(set(s) for s in self.scores.values())) if self.scores else set()
        first = next(iter(self.scores.values()), {})
        return {m: sum(s[m] for s in self.scores.values()) / len(self.scores) for m in first if m in common}


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else math.nan


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _line(name: str, cells: list[str], first: int, widths: list[int]) -> str:
    return (name.ljust(first) + "".join(f"  {v:>{w}}" for v, w in zip(cells, widths, strict=True))).rstrip()


@dataclasses.dataclass(frozen=True)
class MergeReport:
    """Scores of the pre-trained model, each task's own fine-tuned model and every merge method, side by side.

    Args:
        metric: the primary metric: the one of the table, the plot and the scaling search.
        rows: ``{model: EvalResult}`` with ``"pretrained"``, ``"finetuned"`` (each task scored by its own
            model), one row per method, then the task-routed rows, in that order.
        scaling: the chosen coefficient ``lam`` per method.
        curves: ``{method: {lam: mean validation score}}`` of the scaling search.
        higher_is_better: the direction of ``metric`` (decides :attr:`best`).
        routed: the names of the task-routed rows (each task scored with its own update of the base and its head,
            no ``lam``): not methods, never :attr:`best`; their ratio to the own fine-tunes is :meth:`retained`.

    Example:
        >>> report = MergeReport("accuracy", {
        ...     "finetuned": EvalResult({"a": {"accuracy": 1.0}, "b": {"accuracy": 0.8}}),
        ...     "tsv_m": EvalResult({"a": {"accuracy": 0.9}, "b": {"accuracy": 0.8}})},
        ...     scaling={"tsv_m": 1.0}, curves={"tsv_m": {0.5: 0.7, 1.0: 0.85}})
        >>> report.normalized("tsv_m")
        {'a': 0.9, 'b': 1.0}
        >>> print(report.to_table())
        accuracy   finetuned   tsv_m  tsv_m/ft
        a             1.0000  0.9000    0.9000
        b             0.8000  0.8000    1.0000
        mean          0.9000  0.8500    0.9500
        scaling               1.0000
    """

    metric: str
    rows: dict[str, EvalResult]
    scaling: dict[str, float] = dataclasses.field(default_factory=dict)
    curves: dict[str, dict[float, float]] = dataclasses.field(default_factory=dict)
    higher_is_better: bool = True
    routed: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        bad = [name for name in self.routed if name not in self.rows or name in (PRETRAINED, FINETUNED)]
        if bad:
            raise ValueError(
                f"Expected argument `routed` to name rows other than {PRETRAINED!r} and {FINETUNED!r}, but got"
                f" {bad[0]!r} (rows: {list(self.rows)})."
            )

    @property
    def methods(self) -> list[str]:
        """The merge methods, in the order they were scored."""
        return [name for name in self.rows if name not in (PRETRAINED, FINETUNED, *self.routed)]

    @property
    def tasks(self) -> list[str]:
        return list(next(iter(self.rows.values())).scores) if self.rows else []

    @property
    def best(self) -> str | None:
        """The method with the best mean validation score at its chosen ``lam`` (None without methods)."""
        if not self.methods:
            return None
        sign = 1.0 if self.higher_is_better else -1.0
        return max(self.methods, key=lambda m: sign * self._val_score(m))

    def _val_score(self, method: str) -> float:
        score = self.curves.get(method, {}).get(self.scaling.get(method, math.nan), math.nan)
        return -math.inf if math.isnan(score) else score

    def normalized(self, name: str, metric: str | None = None) -> dict[str, float]:
        """``score_t(name) / score_t(own fine-tuned)`` per task (NaN where the fine-tuned score is zero).

        Raises:
            ValueError: the report has no ``"finetuned"`` row or no row ``name``.
        """
        if FINETUNED not in self.rows or name not in self.rows:
            raise ValueError(
                f"Expected rows {FINETUNED!r} and {name!r} to normalize, but the report has"
                f" {list(self.rows)}."
            )
        metric = metric or self.metric
        own, merged = self.rows[FINETUNED].scores, self.rows[name].scores
        return {t: _ratio(merged[t][metric], own[t][metric]) for t in merged}

    def normalized_mean(self, name: str, metric: str | None = None) -> float:
        values = list(self.normalized(name, metric).values())
        return sum(values) / len(values)

    def retained(self, name: str, metric: str | None = None) -> dict[str, float]:
        """``score_t(routed row name) / score_t(own fine-tuned)`` per task: how much of each fine-tune a task-routed
        model keeps (e.g. TSV-C's compressed update; 1.0 is lossless).

        Example:
            >>> report = MergeReport("accuracy", {
            ...     "finetuned": EvalResult({"a": {"accuracy": 1.0}, "b": {"accuracy": 0.5}}),
            ...     "tsv_c": EvalResult({"a": {"accuracy": 0.75}, "b": {"accuracy": 0.5}})}, routed=["tsv_c"])
            >>> report.retained("tsv_c"), report.methods, report.best
            ({'a': 0.75, 'b': 1.0}, [], None)

        Raises:
            ValueError: ``name`` is not a task-routed row, or the report has no ``"finetuned"`` row.
        """
        if name not in self.routed:
            raise ValueError(
                f"Expected a task-routed row {self.routed}, but got {name!r}. HINT: a merge's ratio is"
                " `normalized(name)`."
            )
        return self.normalized(name, metric)

    def retained_mean(self, name: str, metric: str | None = None) -> float:
        values = list(self.retained(name, metric).values())
        return sum(values) / len(values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: rows with their means, normalized scores, scaling and curves."""
        rows = {name: {"scores": r.scores, "mean": r.mean} for name, r in self.rows.items()}
        normalized = {m: self.normalized(m) for m in self.methods} if FINETUNED in self.rows else {}
        retained = {r: self.retained(r) for r in self.routed} if FINETUNED in self.rows else {}
        curves = {m: [[lam, score] for lam, score in curve.items()] for m, curve in self.curves.items()}
        return {"metric": self.metric, "higher_is_better": self.higher_is_better, "rows": rows,
                "normalized": normalized, "scaling": self.scaling, "curves": curves, "best": self.best,
                "routed": list(self.routed), "retained": retained}

    def _columns(self) -> list[str]:
        columns = [name for name in (PRETRAINED, FINETUNED) if name in self.rows]
        for method in self.methods:
            columns += [method, f"{method}/ft"] if FINETUNED in self.rows else [method]
        for name in self.routed:
            columns += [name, f"{name}/retained"] if FINETUNED in self.rows else [name]
        return columns

    def _cell(self, column: str, task: str | None) -> float | None:
        if column not in self.rows:  # "<row>/ft" or "<row>/retained": the ratio to the own fine-tunes
            name = column.rpartition("/")[0]
            return self.normalized_mean(name) if task is None else self.normalized(name)[task]
        row = self.rows[column]
        return row.mean.get(self.metric) if task is None else row.scores[task][self.metric]

    def to_table(self) -> str:
        """The primary metric, task rows and a ``mean`` row; ``<method>/ft`` is the normalized score."""
        columns = self._columns()
        widths = [max(len(c), 8) for c in columns]
        first = max(len(self.metric), *(len(t) for t in self.tasks), len("scaling"))
        rows = [(self.metric, columns)]
        rows += [(task, [_fmt(self._cell(c, task)) for c in columns]) for task in self.tasks]
        rows.append(("mean", [_fmt(self._cell(c, None)) for c in columns]))
        rows.append(("scaling", [_fmt(self.scaling.get(c)) for c in columns]))
        return "\n".join(_line(name, cells, first, widths) for name, cells in rows)

    def _records(self) -> Iterator[list[Any]]:
        for name, row in self.rows.items():
            ratios = self.normalized(name) if name not in (PRETRAINED, FINETUNED) and FINETUNED in self.rows else {}
            normalized, retained = (ratios, {}) if name in self.methods else ({}, ratios)
            for task in [*row.scores, "mean"]:
                scores = row.mean if task == "mean" else row.scores[task]
                for metric, value in scores.items():
                    norm = self._norm_cell(name, task, metric, normalized)
                    kept = self._norm_cell(name, task, metric, retained)
                    yield [name, task, metric, value, norm, self.scaling.get(name, ""), kept]

    def _norm_cell(self, name: str, task: str, metric: str, normalized: dict[str, float]) -> float | str:
        if not normalized or metric != self.metric:
            return ""
        return self.normalized_mean(name) if task == "mean" else normalized[task]

    @rank_zero_only
    def to_csv(self, path: str | Path) -> None:
        """Long format, a line per model, task (and ``mean``) and metric.

        Columns: ``model,task,metric,value,normalized,scaling,retained``: ``normalized`` for the methods' rows and
        ``retained`` for the task-routed rows (both ``row / own fine-tuned``), for the primary metric only.
        """
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["model", "task", "metric", "value", "normalized", "scaling", "retained"])
            writer.writerows(self._records())

    @rank_zero_only
    def to_json(self, path: str | Path) -> None:
        """:meth:`to_dict` as JSON (curves as ``[lam, score]`` pairs)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @rank_zero_only
    def plot(self, path: str | Path) -> None:
        """A PNG: per-task bars of the primary metric per model, the ``lam`` curve of each method, and the retained
        score per task of each task-routed row.

        Raises:
            ImportError: matplotlib is not installed.
        """
        from lightning_merge.evaluation._plot import plot_report

        plot_report(self, path)
