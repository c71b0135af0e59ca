"""The tables `routelens` prints at the end of pass@k, read from its summary.json."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from routelens.report.formats import interval_text


def passk_table(summary: dict) -> Table:
    arms = summary["arms"]
    table = Table(title=f"pass@k, {summary['samples_per_problem']} samples per problem at T={summary['temperature']} "
                        f"(95% bootstrap CI over problems{'; difference paired' if len(arms) == 2 else ''})")
    table.add_column("group")
    table.add_column("k", justify="right")
    for arm in arms:
        table.add_column(arm, justify="right")
    if len(arms) == 2:
        table.add_column(f"{arms[1]} - {arms[0]}", justify="right")
    blocks = [("all", summary["all"])] + sorted((summary.get("by_group") or {}).items())
    for name, block in blocks:
        for k in summary["ks"]:
            key = f"pass@{k}"
            cells = [f"{block[a][key]['mean']:.3f} {interval_text(block[a][key]['ci'])}" for a in arms]
            if len(arms) == 2:
                d = block["difference"][key]
                cells.append(f"{d['mean']:+.3f} {interval_text(d['ci'])}")
            table.add_row(name, str(k), *cells)
        table.add_section()
    return table


def print_passk_summary(summary: dict, console: Console | None = None) -> None:
    (console or Console(width=140)).print(passk_table(summary))
