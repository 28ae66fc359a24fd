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
        label = f"{name} (task-routed)" if name in report.routed else name
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=label)
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


def _retained(ax: Any, report: MergeReport) -> None:
    groups = [*report.tasks, "mean"]
    width = 0.8 / len(report.routed)
    for i, name in enumerate(report.routed):
        values = [*report.retained(name).values(), report.retained_mean(name)]
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=name)
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, rotation=30, ha="right")
    ax.set_ylabel(f"retained {report.metric} (routed / own fine-tune)")
    ax.set_title("task-routed: retained per task")
    ax.legend(fontsize="small")


def plot_report(report: MergeReport, path: str | Path) -> None:
    """Bars per task and model; beside them, after a search, the curves ``lam -> mean score``, and with task-routed
    rows (and the own fine-tunes) their retained score per task."""
    figure_class = _figure_class()
    searched = any(len(curve) > 1 for curve in report.curves.values())
    retained = bool(report.routed) and "finetuned" in report.rows
    panels = [_bars, *([_curves] if searched else []), *([_retained] if retained else [])]
    fig = figure_class(figsize=(7 + 6 * (len(panels) - 1), 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        panel(ax, report)
    fig.savefig(path, dpi=100)
