"""Results: per-task scores (:class:`EvalResult`) and the comparison of models (:class:`MergeReport`).

The schema is FusionBench's ``{task: {metric: value}}`` per model, with means over tasks and the normalized
score ``merged / own fine-tuned`` per task.
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
            model) and one row per method, in that order.
        scaling: the chosen coefficient ``lam`` per method.
        curves: ``{method: {lam: mean validation score}}`` of the scaling search.
        higher_is_better: the direction of ``metric`` (decides :attr:`best`).

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

    @property
    def methods(self) -> list[str]:
        """The merge methods, in the order they were scored."""
        return [name for name in self.rows if name not in (PRETRAINED, FINETUNED)]

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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: rows with their means, normalized scores, scaling and curves."""
        rows = {name: {"scores": r.scores, "mean": r.mean} for name, r in self.rows.items()}
        normalized = {m: self.normalized(m) for m in self.methods} if FINETUNED in self.rows else {}
        curves = {m: [[lam, score] for lam, score in curve.items()] for m, curve in self.curves.items()}
        return {"metric": self.metric, "higher_is_better": self.higher_is_better, "rows": rows,
                "normalized": normalized, "scaling": self.scaling, "curves": curves, "best": self.best}

    def _columns(self) -> list[str]:
        columns = [name for name in (PRETRAINED, FINETUNED) if name in self.rows]
        for method in self.methods:
            columns += [method, f"{method}/ft"] if FINETUNED in self.rows else [method]
        return columns

    def _cell(self, column: str, task: str | None) -> float | None:
        name, _, norm = column.partition("/")
        if norm:
            return self.normalized_mean(name) if task is None else self.normalized(name)[task]
        row = self.rows[name]
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
            normalized = self.normalized(name) if name in self.methods and FINETUNED in self.rows else {}
            for task in [*row.scores, "mean"]:
                scores = row.mean if task == "mean" else row.scores[task]
                for metric, value in scores.items():
                    norm = self._norm_cell(name, task, metric, normalized)
                    yield [name, task, metric, value, norm, self.scaling.get(name, "")]

    def _norm_cell(self, name: str, task: str, metric: str, normalized: dict[str, float]) -> float | str:
        if not normalized or metric != self.metric:
            return ""
        return self.normalized_mean(name) if task == "mean" else normalized[task]

    @rank_zero_only
    def to_csv(self, path: str | Path) -> None:
        """Long format, a line per model, task (and ``mean``) and metric.

        Columns: ``model,task,metric,value,normalized,scaling`` (normalized for the primary metric only).
        """
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["model", "task", "metric", "value", "normalized", "scaling"])
            writer.writerows(self._records())

    @rank_zero_only
    def to_json(self, path: str | Path) -> None:
        """:meth:`to_dict` as JSON (curves as ``[lam, score]`` pairs)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @rank_zero_only
    def plot(self, path: str | Path) -> None:
        """A PNG: per-task bars of the primary metric per model, and the ``lam`` curve of each method.

        Raises:
            ImportError: matplotlib is not installed.
        """
        from lightning_merge.evaluation._plot import plot_report

        plot_report(self, path)
