"""The short per layer x bin table printed at the end of a run, read from summary.json."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from routelens.analyses.counterfactual import ALL_TOKENS, BINS


def _with_interval(value, interval, digits: int = 3) -> str:
    if value is None:
        return "-"
    low, high = interval
    text = f"{value:.{digits}f}"
    return text if low is None else f"{text} [{low:.{digits}f}, {high:.{digits}f}]"


def summary_table(summary: dict) -> Table:
    table = Table(title="counterfactual routing: per layer x bin (95% bootstrap CI over trajectories)")
    for column in ("layer", "bin", "tokens", "p std", "gain", "win rate", "alignment"):
        table.add_column(column, justify="right" if column not in ("bin",) else "left")
    for layer, groups in summary["layers"].items():
        for name in (*BINS, ALL_TOKENS):
            group = groups[name]
            table.add_row(
                layer, name, str(group["tokens"]),
                "-" if group["p_standard"] is None else f"{group['p_standard']:.3f}",
                _with_interval(group["gain"], group["gain_ci"]),
                _with_interval(group["win_rate"], group["win_rate_ci"]),
                _with_interval(group["alignment"], group["alignment_ci"]),
            )
        table.add_section()
    return table


def print_summary(summary: dict, console: Console | None = None) -> None:
    (console or Console(width=140)).print(summary_table(summary))
