"""The tables `routelens` prints at the end of the rollouts, read from its summary.json."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from routelens.report.formats import with_interval


def rollout_table(summary: dict) -> Table:
    """Accuracy per arm and the paired differences against the standard route, per bin."""
    table = Table(title=f"rollouts: {summary['samples_per_arm']} continuation(s) per arm and token at "
                        f"T={summary['temperature']}, answers checked by {summary['checker']} "
                        "(95% bootstrap CI over trajectories; * fewer than 10 trajectories)")
    for column in ("bin", "tokens", "standard", "best alt", "random alt", "best - standard", "random - standard",
                   "proxy agrees"):
        table.add_column(column, justify="left" if column == "bin" else "right")
    for name, group in summary["bins"].items():
        outcome = group["outcome"]
        agreement = outcome["proxy_agreement"]
        table.add_row(name + ("*" if group["few_clusters"] else ""), str(group["tokens"]),
                      *[with_interval(group[f"accuracy_{arm}"], group[f"accuracy_{arm}_ci"])
                        for arm in ("standard", "best_alt", "random_alt")],
                      with_interval(group["best_alt_minus_standard"], group["best_alt_minus_standard_ci"]),
                      with_interval(group["random_alt_minus_standard"], group["random_alt_minus_standard_ci"]),
                      "-" if agreement is None else
                      f"{agreement:.2f} ({outcome['best_alt_better']} of {outcome['best_alt_better'] + outcome['best_alt_worse']})")
    return table


def print_rollout_summary(summary: dict, console: Console | None = None) -> None:
    console = console or Console(width=190)
    console.print(rollout_table(summary))
    selection = summary["selection"]
    console.print(f"tokens: {selection['chosen']} chosen by --tokens {selection['tokens']}"
                  + (f", {selection['skipped_without_alternative']} skipped (no alternative expert set)"
                     if selection["skipped_without_alternative"] else "")
                  + "; proxy agrees: share of tokens whose outcome differs where the best alternative wins")
