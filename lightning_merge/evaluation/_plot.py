"""The report's figure; matplotlib is an optional extra, imported only here and only when plotting."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_merge.evaluation.report import MergeReport


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("MergeReport.plot needs matplotlib: pip install lightning-merge[plot]") from err
    return Figure


def _bars(ax: Any, report: MergeReport) -> None:
    groups = [*report.tasks, "mean"]
    width = 0.8 / len(report.rows)
    for i, (name, row) in enumerate(report.rows.items()):
        values = [row.scores[t][report.metric] for t in report.tasks] + [row.mean[report.metric]]
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, rotation=30, ha="right")
    ax.set_ylabel(report.metric)
    ax.set_title("scores per task")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _curves(ax: Any, report: MergeReport) -> None:
    for method, curve in report.curves.items():
        (line,) = ax.plot(list(curve), list(curve.values()), marker=".", label=method)
        lam = report.scaling[method]
        ax.plot([lam], [curve[lam]], marker="*", markersize=12, color=line.get_color())
    ax.set_xlabel("scaling coefficient lam")
    ax.set_ylabel(f"mean validation {report.metric}")
    ax.set_title("scaling search")
    ax.legend(fontsize="small")


def plot_report(report: MergeReport, path: str | Path) -> None:
    """Bars per task and model; beside them, after a search, the curves ``lam -> mean score``."""
    figure_class = _figure_class()
    searched = any(len(curve) > 1 for curve in report.curves.values())
    fig = figure_class(figsize=(13 if searched else 7, 4.5), layout="constrained")
    axes = fig.subplots(1, 2 if searched else 1, squeeze=False)[0]
    _bars(axes[0], report)
    if searched:
        _curves(axes[1], report)
    fig.savefig(path, dpi=100)
