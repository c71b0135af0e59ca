"""The tables `routelens` prints at the end of the isolation study, read from its summary.json."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from routelens.report.formats import interval_text


def isolation_tables(summary: dict) -> list[Table]:
    score = summary["score"]
    counts = Table(title=f"expert isolation: {summary['significant_cells']} of {summary['cells']} cells significant "
                         f"(BH step-up, alpha {summary['alpha']}); {summary['significant_better_than_natural']} "
                         f"better than natural; {summary['significant_vs_floor']} differ from the random floor "
                         f"({summary['significant_better_than_floor']} better)")
    for column in ("domain", "items", "significant", "calibration: router share", "calibration: top-k share"):
        counts.add_column(column, justify="left" if column == "domain" else "right")
    for domain, n in summary["items_per_domain"].items():
        calibration = summary["calibration"][domain]
        counts.add_row(domain, str(n), str(summary["significant_by_domain"][domain]),
                       *(f"{c['fisher_z_mean']:+.3f} {interval_text(c['ci'])}" if c["fisher_z_mean"] is not None else "-"
                         for c in (calibration["router_share"], calibration["selection_share"])))
    layers = Table(title=f"per layer: best single expert (median delta of {score} vs natural, 95% CI), "
                         "random floor, most-activated expert")
    for column in ("domain", "layer", "best expert", "median delta", "95% CI", "floor delta",
                   "most activated", "share x E", "its rank"):
        layers.add_column(column, justify="left" if column == "domain" else "right")
    dominance = {(row["domain"], row["layer"]): row for row in summary["dominance"]}
    for row in summary["layer_table"]:
        most = dominance[(row["domain"], row["layer"])]
        layers.add_row(row["domain"], str(row["layer"]), str(row["best_expert"]), f"{row['best_median_delta']:+.3f}",
                       interval_text(row["best_ci"]), "-" if row["floor_median_delta"] is None else f"{row['floor_median_delta']:+.3f}",
                       str(most["most_activated"]), f"{most['vs_uniform']:.2f}", str(most["rank_of_most_activated"]))
    return [counts, layers]


def print_isolation_summary(summary: dict, console: Console | None = None) -> None:
    console = console or Console(width=140)
    for table in isolation_tables(summary):
        console.print(table)
    smallest = summary.get("smallest_possible_p")
    if smallest is not None and smallest > summary["alpha"]:
        console.print(f"note: with {min(summary['items_per_domain'].values())} items in a domain the Wilcoxon test "
                      f"cannot give p below {smallest:.3g} > alpha {summary['alpha']}: use more items per domain")
