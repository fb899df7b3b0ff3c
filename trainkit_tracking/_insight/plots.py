"""The leaderboard picture of a sweep: each trial's score with its fold values (``plots`` extra).

Drawn on a ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so the
user's backend and open figures are left alone. Importing this module needs matplotlib.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from trainkit_tracking._insight.cv_stats import Leaderboard, TrialRow

_FOLD = "#4c72b0"
_MEAN = "#1f3a68"
_BEST = "#dd8452"
_OTHER = "#9a9a9a"


# The fold dots stand in a narrow strip right of the trial's mean ± std bar.
_STRIP_AT, _STRIP_WIDTH, _BAR_AT = 0.2, 0.12, -0.06


def _jitter(count: int) -> list[float]:
    """Evenly spread, deterministic x offsets for ``count`` fold dots."""
    if count <= 1:
        return [_STRIP_AT] * count
    return [_STRIP_AT - _STRIP_WIDTH / 2 + _STRIP_WIDTH * i / (count - 1) for i in range(count)]


def _label(row: TrialRow) -> str:
    return f"t{row.number}" if row.number is not None else row.record.run_id[:6]


def plot_leaderboard(board: Leaderboard, path: Path) -> None:
    """Write ``path`` (PNG): fold values as dots, mean ± std as a bar, the best trial marked."""
    rows = board.rows
    width = min(16.0, max(6.0, 2.5 + 0.42 * len(rows)))
    # Fixed margins, not a layout engine: "constrained" doubles the cost of a drawing that
    # the sweep's end waits for.
    figure = Figure(figsize=(width, 4.2), dpi=110)
    figure.subplots_adjust(left=0.75 / width, right=0.99, bottom=0.15, top=0.84)
    FigureCanvasAgg(figure)
    axes: Any = figure.add_subplot()
    seen: dict[str, Any] = {}
    metrics: set[str] = set()
    for x, row in enumerate(rows):
        if row.score is None:
            continue
        metrics.add(row.score.metric)
        s = row.score.stats
        finished = row.record.status == "FINISHED"
        is_best = board.best_number is not None and row.number == board.best_number
        dot_color = _FOLD if finished else _OTHER
        if row.score.from_folds:
            axes.scatter(
                [x + dx for dx in _jitter(len(row.score.values))],
                row.score.values,
                s=16,
                color=dot_color,
                alpha=0.7,
                zorder=2,
                linewidths=0,
            )
            seen.setdefault("fold value", Line2D([], [], color=_FOLD, marker="o", ls="", ms=4))
        if finished:
            color, marker, label = (_BEST, "*", "best trial") if is_best else (_MEAN, "D", "")
        else:
            marker = "x"
            color = _OTHER
            label = "pruned" if row.pruned else row.record.status.lower()
        if is_best:
            axes.axvspan(x - 0.45, x + 0.45, color=_BEST, alpha=0.12, lw=0, zorder=0)
        axes.errorbar(
            [x + (_BAR_AT if row.score.from_folds else 0.0)],
            [s.mean],
            yerr=[[s.std], [s.std]] if row.score.from_folds else None,
            fmt=marker,
            color=color,
            ecolor=color,
            ms=14 if is_best else 6,
            capsize=4,
            elinewidth=1.4,
            zorder=3,
        )
        if finished and not is_best:
            seen.setdefault(
                "mean ± std", Line2D([], [], color=_MEAN, marker="D", ls="-", ms=5, lw=1.2)
            )
        if is_best:
            spread = f" ± {s.std:.3g} ({s.n} folds)" if row.score.from_folds else ""
            label = f"best: {_label(row)} = {s.mean:.4g}{spread}"
        if label:
            seen.setdefault(label, Line2D([], [], color=color, marker=marker, ls="", ms=8))
    axes.set_xticks(range(len(rows)))
    axes.set_xticklabels([_label(r) for r in rows], fontsize=8)
    if len(rows) > 30:
        axes.xaxis.set_major_locator(MaxNLocator(nbins=30, integer=True))
    axes.set_xlim(-0.7, len(rows) - 0.3)
    axes.set_xlabel("trial")
    metric = ", ".join(sorted(metrics)) or (board.study_metric or "score")
    hint = {"MAXIMIZE": "higher is better", "MINIMIZE": "lower is better"}.get(
        board.direction or ""
    )
    axes.set_ylabel(metric + (f"  ({hint})" if hint else ""))
    axes.grid(axis="y", alpha=0.3)
    axes.margins(y=0.18)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    # About ten characters of a 9-10 pt title fit in an inch of figure.
    room = int(width * 10)
    name = board.sweep.name or board.sweep.run_id
    if len(name) > room:
        name = name[: room - 3] + "..."
    figure.suptitle(
        f"{metric} per trial: mean ± std over its CV folds"[:room], fontsize=10, x=0.02, ha="left"
    )
    axes.set_title(name, fontsize=8, loc="left", color="#555555")
    for tick, row in zip(axes.get_xticklabels(), rows, strict=False):
        if board.best_number is not None and row.number == board.best_number:
            tick.set_color(_BEST)
            tick.set_fontweight("bold")
        elif row.record.status != "FINISHED":  # pruned, failed or still running
            tick.set_color(_OTHER)
    if seen:
        axes.legend(list(seen.values()), list(seen), fontsize=8, loc="best", frameon=False, ncols=1)
    figure.savefig(path, format="png")
