"""The tables `routelens` prints at the end of semantic routing, read from its summary.json."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from routelens.report.formats import with_interval


def semantic_route_table(summary: dict) -> Table:
    """All domains: each arm's paired difference against natural routing, per layer set."""
    arms = ("semantic", "semantic_token", "oracle", "floor")
    table = Table(title=f"semantic routing ({summary['kind']} fingerprints): arm - natural, {summary['score']}, all "
                        f"evaluation items (95% bootstrap CI; * q <= {summary['alpha']})")
    for column in ("layer set", "items", "natural", *arms):
        table.add_column(column, justify="left" if column == "layer set" else "right")
    for name, block in summary["layer_sets"].items():
        entry = block["All"]
        cells = []
        for arm in arms:
            test = entry.get(arm)
            cells.append("-" if test is None else
                         with_interval(test["difference"], test["ci"]) + ("*" if test["significant"] else ""))
        table.add_row(name, str(entry["items"]), f"{entry['natural']:.3f}", *cells)
    return table


def semantic_accuracy_table(summary: dict) -> Table:
    """All domains: greedy accuracy per arm and its paired difference against natural routing."""
    arms = ("semantic", "semantic_token", "oracle", "floor")
    table = Table(title="semantic routing: greedy accuracy of the final answers, all evaluation items "
                        "(arm - natural, 95% bootstrap CI; exact McNemar p)")
    for column in ("layer set", "items", "natural", *arms):
        table.add_column(column, justify="left" if column == "layer set" else "right")
    for name, block in summary["accuracy"].items():
        entry = block["All"]
        table.add_row(name, str(entry["items"]), f"{entry['natural']:.2f}",
                      *["-" if arm not in entry else f"{entry[arm]['accuracy']:.2f} "
                        f"({with_interval(entry[arm]['difference'], entry[arm]['ci'], 2)}, p {entry[arm]['p_value']:.2g})"
                        for arm in arms])
    return table


def print_semantic_route_summary(summary: dict, console: Console | None = None) -> None:
    console = console or Console(width=190)
    console.print(semantic_route_table(summary))
    if summary.get("accuracy"):
        console.print(semantic_accuracy_table(summary))
    console.print("fingerprint classification of evaluation items (nearest domain of the prompt; chance "
                  f"1/{len(next(iter(summary['classification'].values()))['by_domain'])}): " + "; ".join(
                      f"layer {layer} {c['item']:.2f} (tokens {c['token']:.2f})"
                      for layer, c in summary["classification"].items()))
