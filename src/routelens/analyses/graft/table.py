"""The tables `routelens` prints at the end of the graft evaluation, read from its summary.json."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from routelens.report.formats import with_interval


def graft_evaluation_table(summary: dict) -> Table:
    """Per domain: the natural score recipient -> grafted, and per grafted slot its selection
    share and the grafted against the original expert forced alone (after - before, 95% CI, q)."""
    table = Table(title="graft evaluation: after - before per item (mean target log-prob in nats; selection share; "
                        f"95% bootstrap CI over items; * q <= {summary['alpha']})")
    for column in ("domain", "items", "natural: recipient -> grafted", "slot", "selected: before -> after",
                   "forced: original -> grafted"):
        table.add_column(column, justify="left" if column in ("domain", "slot") else "right")

    def cell(test: dict, digits: int = 3) -> str:
        star = "*" if test["significant"] else ""
        return (f"{test['before']:.{digits}f} -> {test['after']:.{digits}f} "
                f"({with_interval(test['difference'], test['ci'], digits)}){star}")

    for domain, block in summary["domains"].items():
        for index, (pair, tests) in enumerate(block["pairs"].items()):
            table.add_row(domain if index == 0 else "", str(block["natural"]["items"]) if index == 0 else "",
                          cell(block["natural"]) if index == 0 else "", pair, cell(tests["selection"], 2),
                          cell(tests["forced"]))
        table.add_section()
    return table


def print_graft_evaluation(summary: dict, console: Console | None = None) -> None:
    (console or Console(width=190)).print(graft_evaluation_table(summary))
