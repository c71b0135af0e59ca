"""The tables `routelens` prints at the end of the isolation study, read from its summary.json
(of any age: a run made before the equal-compute arms shows their columns as - and says so)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from routelens.analyses.isolation.comparisons import COMPARISONS, VERDICT, comparisons_of, missing_arms_note
from routelens.report.formats import interval_text


def count_text(value) -> str:
    return "-" if value is None else str(value)


def delta_text(value) -> str:
    return "-" if value is None else f"{value:+.3f}"


def verdict_title(summary: dict) -> str:
    """The study's headline: the verdict's counts against the single-expert floor, or why there are none."""
    verdict = comparisons_of(summary)[VERDICT]
    where = f"of {summary['cells']} cells (domain x layer x expert)"
    if verdict is None:
        natural = comparisons_of(summary)["forced_vs_natural"]
        return (f"expert isolation: no verdict at equal compute (no single-expert floor); {natural['significant']} {where} "
                f"differ from natural routing (BH step-up, alpha {summary['alpha']})")
    return (f"expert isolation: {verdict['harmful']} {where} harmful, {verdict['helpful']} helpful against the "
            f"single-expert floor (equal compute and scale; BH step-up, alpha {summary['alpha']})")


def isolation_tables(summary: dict) -> list[Table]:
    score = summary["score"]
    found = comparisons_of(summary)
    comparisons = Table(title=verdict_title(summary))
    for column in ("comparison", "compute", "scale", "significant", "harmful", "helpful"):
        comparisons.add_column(column, justify="left" if column in ("comparison", "compute", "scale") else "right")
    for c in COMPARISONS:
        counts = found[c.name] or {}
        comparisons.add_row(c.label + (" (verdict)" if c.name == VERDICT else ""), c.compute, c.scale,
                            *(count_text(counts.get(key)) for key in ("significant", "harmful", "helpful")))

    domains = Table(title="per domain: the verdict's counts, cells that differ from natural routing, calibration")
    for column in ("domain", "items", "harmful", "helpful", "differ from natural", "calibration: router share",
                   "calibration: top-k share"):
        domains.add_column(column, justify="left" if column == "domain" else "right")
    verdict = found[VERDICT] or {}
    for domain, n in summary["items_per_domain"].items():
        calibration = summary["calibration"][domain]
        domains.add_row(domain, str(n), *(count_text((verdict.get(f"{kind}_by_domain") or {}).get(domain))
                                          for kind in ("harmful", "helpful")),
                        count_text((found["forced_vs_natural"].get("significant_by_domain") or {}).get(domain)),
                        *(f"{c['fisher_z_mean']:+.3f} {interval_text(c['ci'])}" if c["fisher_z_mean"] is not None else "-"
                          for c in (calibration["router_share"], calibration["selection_share"])))

    layers = Table(title=f"per layer: the best single expert (median delta of {score} vs natural, 95% CI); the k-expert "
                         "and single-expert floors' median deltas vs natural; mean gate mass per token of the natural "
                         "route and of the k-expert floor; the verdict's harmful / helpful cells; the most-activated "
                         "expert (its top-k share x E, its rank by delta)")
    for column in ("domain", "layer", "best", "median delta", "95% CI", "k floor", "1 floor", "mass", "harm / help",
                   "most used", "share x E", "rank"):
        layers.add_column(column, justify="left" if column == "domain" else "right", no_wrap=column == "95% CI")
    dominance = {(row["domain"], row["layer"]): row for row in summary["dominance"]}
    for row in summary["layer_table"]:
        most = dominance[(row["domain"], row["layer"])]
        layers.add_row(row["domain"], str(row["layer"]), str(row["best_expert"]), f"{row['best_median_delta']:+.3f}",
                       interval_text(row["best_ci"]), delta_text(row["floor_median_delta"]),
                       delta_text(row.get("single_floor_median_delta")), mass_text(row),
                       f"{count_text(row.get('harmful_cells'))} / {count_text(row.get('helpful_cells'))}",
                       str(most["most_activated"]), f"{most['vs_uniform']:.2f}", str(most["rank_of_most_activated"]))
    return [comparisons, domains, layers]


def mass_text(row: dict) -> str:
    """A layer's mean gate mass per token, natural route / k-expert floor ("-" where not recorded)."""
    natural, floor = row.get("natural_gate_mass"), row.get("floor_gate_mass")
    return "-" if natural is None else f"{natural:.2f} / " + ("-" if floor is None else f"{floor:.2f}")


def print_isolation_summary(summary: dict, console: Console | None = None) -> None:
    console = console or Console(width=160)
    for table in isolation_tables(summary):
        console.print(table)
    if comparisons_of(summary)[VERDICT] is not None:
        console.print("verdict: each cell's forced expert against the single-expert floor (one expert per token at "
                      "weight 1.0 in both: equal compute and scale), paired per item; harmful / helpful: BH q <= alpha "
                      "and median delta below / above 0. Forced vs natural or the k-expert floor is one expert against "
                      "k; matched mass removes the difference of scale, not of compute.")
    note = missing_arms_note(summary)
    if note:
        console.print(f"note: {note}")
    smallest = summary.get("smallest_possible_p")
    if smallest is not None and smallest > summary["alpha"]:
        console.print(f"note: with {min(summary['items_per_domain'].values())} items in a domain the Wilcoxon test "
                      f"cannot give p below {smallest:.3g} > alpha {summary['alpha']}: use more items per domain")
