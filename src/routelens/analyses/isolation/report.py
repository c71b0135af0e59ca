"""The report section of the isolation study: its HTML and its figures (read from the run folder)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from routelens.analyses.isolation.comparisons import (
    BY_NAME,
    COMPARISONS,
    VERDICT,
    comparisons_of,
    finite,
    missing_arms_note,
)
from routelens.analyses.isolation.table import verdict_title
from routelens.report.build import figures_html, p_at_floor, provenance
from routelens.report.figures import Figure, colour, grid, interval_errors, subplots
from routelens.report.page import esc, fmt, interval, table
from routelens.results.stored import read_json_file, read_table_file


def section(run_dir: str, run: dict) -> str:
    cells = read_table_file(os.path.join(run_dir, "cells.parquet"))
    calibration = read_table_file(os.path.join(run_dir, "calibration.parquet"))
    summary = read_json_file(os.path.join(run_dir, "summary.json"))
    domains = list(summary["items_per_domain"])
    found = comparisons_of(summary)
    comparison_rows = [[c.label + (" (the verdict)" if c.name == VERDICT else ""), f"{c.arm} - {c.baseline}", c.compute,
                        c.scale, *(fmt((found[c.name] or {}).get(key)) for key in ("significant", "harmful", "helpful"))]
                       for c in COMPARISONS]
    comparisons = table(["comparison", "paired delta per item", "compute", "scale", "significant", "harmful", "helpful"],
                        comparison_rows, "iso-comparisons")
    verdict = found[VERDICT] or {}
    rows = []
    for domain in domains:
        c = summary["calibration"][domain]
        rows.append([domain, summary["items_per_domain"][domain],
                     *(fmt((verdict.get(f"{kind}_by_domain") or {}).get(domain)) for kind in ("harmful", "helpful")),
                     fmt((found["forced_vs_natural"].get("significant_by_domain") or {}).get(domain)),
                     interval(c["router_share"]["fisher_z_mean"], c["router_share"]["ci"]),
                     interval(c["selection_share"]["fisher_z_mean"], c["selection_share"]["ci"])])
    counts = table(["domain", "items", "harmful (verdict)", "helpful (verdict)", "differ from natural",
                    "calibration: router share (Fisher-z mean, 95% CI)", "calibration: top-k share"], rows, "iso-domains")
    dominance = {(d["domain"], d["layer"]): d for d in summary["dominance"]}
    layer_rows = []
    for row in summary["layer_table"]:
        d = dominance[(row["domain"], row["layer"])]
        layer_rows.append([row["domain"], row["layer"], row["best_expert"], interval(row["best_median_delta"], row["best_ci"]),
                           fmt(row.get("best_matched_expert")),
                           interval(row.get("best_matched_median_delta"), row.get("best_matched_ci")),
                           fmt(row["floor_median_delta"]), fmt(row.get("single_floor_median_delta")),
                           fmt(row.get("natural_gate_mass")), fmt(row.get("floor_gate_mass")),
                           fmt(row.get("harmful_cells")), fmt(row.get("helpful_cells")), d["most_activated"],
                           fmt(d["vs_uniform"], 2), d["rank_of_most_activated"], "yes" if d["most_activated_is_best"] else "no"])
    layers = table(["domain", "layer", "best expert", "its median delta vs natural [95% CI]", "best at matched mass",
                    "its median delta vs natural [95% CI]", "k-expert floor delta", "single-expert floor delta",
                    "natural gate mass", "k-expert floor gate mass", "harmful (verdict)", "helpful (verdict)",
                    "most activated", "share x E", "its rank", "most activated is best"], layer_rows, "iso-layers")
    figures = isolation_figures(cells, calibration, summary)
    note = missing_arms_note(summary)
    return (f"<h2>Expert isolation: {esc(run_dir)}</h2>"
            f"<p>{esc(verdict_title(summary))}. Score: {esc(summary['score'])}. Each comparison is a paired delta per "
            f"item, tested by a two-sided Wilcoxon signed-rank test per (domain, layer, expert) cell, with "
            f"Benjamini-Hochberg step-up q-values over that comparison's cells; harmful / helpful: q &lt;= "
            f"{summary['alpha']} and the median delta below / above 0. The verdict is judged against the single-expert "
            f"floor, the only baseline of the forced expert's own compute and scale.</p>"
            + (f"<p><strong>Note:</strong> {esc(note)}.</p>" if note else "")
            + f"{comparisons}{counts}<h3>Layer table and dominance</h3>"
            f"<p>Deltas are medians over items against natural routing; gate mass is the total weight per token "
            f"(forced and single-expert floor: 1.0).</p>{layers}{figures_html(run_dir, figures)}"
            f"{top_cells(cells, summary)}{provenance(run)}")


def top_cells(cells: pd.DataFrame, summary: dict) -> str:
    """The 20 cells with the smallest q-values of the verdict's comparison (of forced vs
    natural in a run without it): its median [95% CI], p and q, and every other comparison's
    median and q."""
    present = [c for c in COMPARISONS if f"q_value{c.suffix}" in cells and cells[f"q_value{c.suffix}"].notna().any()]
    basis = BY_NAME[VERDICT] if BY_NAME[VERDICT] in present else BY_NAME["forced_vs_natural"]
    others = [c for c in present if c is not basis]
    top = cells.sort_values([f"q_value{basis.suffix}", f"median_delta{basis.suffix}"]).head(20)
    headers = ["domain", "layer", "expert", "n", "verdict", f"{basis.label}: median [95% CI]", "p", "q",
               *(f"{c.label}: median (q)" for c in others)]
    rows = []
    for _, r in top.iterrows():
        ci = [finite(r[f"ci_low{basis.suffix}"]), finite(r[f"ci_high{basis.suffix}"])]
        rows.append([r["domain"], r["layer"], r["expert"], r["n"], fmt(r.get("verdict")),
                     interval(finite(r[f"median_delta{basis.suffix}"]), ci), p_at_floor(r[f"p_value{basis.suffix}"], r["n"]),
                     f"{r[f'q_value{basis.suffix}']:.2e}",
                     *(f"{fmt(finite(r[f'median_delta{c.suffix}']))} ({r[f'q_value{c.suffix}']:.1e})" for c in others)])
    return (f"<h3>The 20 cells with the smallest q-values ({esc(basis.label)})</h3>"
            f"<p>A p marked <em>(floor)</em> is the smallest the exact signed-rank test allows with n items "
            f"(2 / 2<sup>n</sup>): every item moved the same way, and only more items could lower it.</p>"
            + table(headers, rows, "iso-cells"))


# ---------------------------------------------------------------------------- isolation
def delta_heatmap(cells: pd.DataFrame, summary: dict, comparison, name: str, title: str, caption: str) -> Figure:
    """One comparison's median delta per (layer, expert), a panel per domain, significant cells dotted."""
    domains, layers, experts = list(summary["items_per_domain"]), summary["layers"], summary["num_experts"]
    column, significant_column = f"median_delta{comparison.suffix}", f"significant{comparison.suffix}"
    fig, axes = grid(len(domains), width=min(0.32 * experts + 2.5, 9), height=0.45 * len(layers) + 2.2, columns=2)
    limit = float(np.nanmax(np.abs(cells[column]))) or 1.0
    for ax, domain in zip(axes, domains):
        at = cells[cells["domain"] == domain]
        medians = at.pivot(index="layer", columns="expert", values=column).reindex(index=layers, columns=range(experts))
        image = ax.imshow(medians.to_numpy(), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        significant = at[at[significant_column]]
        ax.scatter(significant["expert"], [layers.index(layer) for layer in significant["layer"]], marker=".", s=12,
                   color="black", label="significant (BH)")
        ax.set_yticks(range(len(layers)), layers)
        ax.set(title=f"{domain} ({summary['items_per_domain'][domain]} items)", xlabel="forced expert [expert id]",
               ylabel="layer [decoder-layer index]")
        fig.colorbar(image, ax=ax, label="median delta [nats]")
    fig.suptitle(f"{comparison.label}: median change of the {summary['score']} (dot: significant at FDR {summary['alpha']})")
    fig.tight_layout()
    return Figure(name, title, caption, fig)


def isolation_figures(cells: pd.DataFrame, calibration: pd.DataFrame, summary: dict) -> list[Figure]:
    domains = list(summary["items_per_domain"])
    layers = summary["layers"]
    figures = []

    figures.append(delta_heatmap(cells, summary, BY_NAME["forced_vs_natural"], "iso_delta_heatmap",
                                 "Delta per (layer, expert) against natural routing",
                                 "Blue: forcing the expert helps; red: it hurts. Dots mark cells that survive the "
                                 "Benjamini-Hochberg step-up procedure. One expert's compute against k."))
    verdict = BY_NAME[VERDICT]
    if f"p_value{verdict.suffix}" in cells and cells[f"p_value{verdict.suffix}"].notna().any():
        figures.append(delta_heatmap(cells, summary, verdict, "iso_verdict_heatmap",
                                     "Delta per (layer, expert) against the single-expert floor (the verdict)",
                                     "Blue: the forced expert beats a random single expert at weight 1.0 (helpful); "
                                     "red: it does worse (harmful). Equal compute and scale. Dots: significant (BH)."))

    fig, axes = grid(len(layers))
    for ax, layer in zip(axes, layers):
        for i, domain in enumerate(domains):
            at = cells[(cells["domain"] == domain) & (cells["layer"] == layer)]
            row = calibration[(calibration["domain"] == domain) & (calibration["share"] == "router_share")
                              & (calibration["layer"] == layer)]
            rho = row["spearman"].iloc[0] if len(row) else np.nan
            ax.scatter(at["natural_share"], at["mean_delta"], s=14, color=colour(i), label=f"{domain} (rho {rho:+.2f})")
        ax.set(title=f"layer {layer}", xlabel="natural share [mean router probability]", ylabel="mean delta [nats]")
        ax.legend(fontsize=7)
    fig.suptitle("Calibration: does the router prefer the experts that hurt least when forced alone?")
    fig.tight_layout()
    figures.append(Figure("iso_calibration", "Calibration per layer", "One point per expert; rho is Spearman's "
                          "correlation between share and mean delta in that domain and layer.", fig))

    dominance = pd.DataFrame(summary["dominance"])
    fig, ax = subplots(figsize=(7, 3.8))
    width = 0.8 / max(len(domains), 1)
    for i, domain in enumerate(domains):
        at = dominance[dominance["domain"] == domain].set_index("layer").reindex(layers)
        ax.bar(np.arange(len(layers)) + (i - (len(domains) - 1) / 2) * width, at["vs_uniform"], width, label=domain,
               color=colour(i))
    ax.axhline(1, color="black", linestyle="--", linewidth=1, label="uniform (1/E)")
    ax.set_xticks(range(len(layers)), layers)
    ax.set(title="Dominance: the most-activated expert's top-k share against uniform", xlabel="layer [decoder-layer index]",
           ylabel="share x E [ratio to uniform]")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    figures.append(Figure("iso_dominance", "Dominance", "Top-k selection share of each layer's most-activated "
                          "expert, divided by the uniform share 1/E.", fig))

    table = pd.DataFrame(summary["layer_table"])
    fig, ax = subplots(figsize=(7, 3.8))
    for i, domain in enumerate(domains):
        at = table[table["domain"] == domain].set_index("layer").reindex(layers)
        values = at["best_median_delta"].tolist()
        ax.errorbar(layers, values, yerr=interval_errors(values, at["best_ci"].tolist()), marker="o", capsize=3,
                    color=colour(i), label=f"{domain}: best expert")
        ax.plot(layers, at["floor_median_delta"], linestyle=":", marker="x", color=colour(i), label=f"{domain}: k-expert floor")
        if "single_floor_median_delta" in at and at["single_floor_median_delta"].notna().any():
            ax.plot(layers, at["single_floor_median_delta"].astype(float), linestyle="--", marker="+", color=colour(i),
                    label=f"{domain}: single-expert floor")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(layers)
    ax.set(title="Effect by layer: the best single expert and the random floors", xlabel="layer [decoder-layer index]",
           ylabel="median delta vs natural [nats]")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    figures.append(Figure("iso_layers", "Layer table", "Best single expert per layer (95% CI of the median) against "
                          "random k-expert routes (natural routing's compute) and random single experts at weight 1.0 "
                          "(the forced expert's compute), all as median deltas vs natural.", fig))
    return figures
