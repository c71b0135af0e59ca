"""The report section of the isolation study: its HTML and its figures (read from the run folder)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from routelens.report.build import figures_html, p_at_floor, provenance
from routelens.report.figures import Figure, colour, grid, interval_errors, subplots
from routelens.report.page import esc, fmt, interval, table
from routelens.results.run_folder import read_json


def section(run_dir: str, run: dict) -> str:
    cells = pd.read_parquet(os.path.join(run_dir, "cells.parquet"))
    calibration = pd.read_parquet(os.path.join(run_dir, "calibration.parquet"))
    summary = read_json(os.path.join(run_dir, "summary.json"))
    domains = list(summary["items_per_domain"])
    rows = []
    for domain in domains:
        c = summary["calibration"][domain]
        rows.append([domain, summary["items_per_domain"][domain], summary["significant_by_domain"][domain],
                     interval(c["router_share"]["fisher_z_mean"], c["router_share"]["ci"]),
                     interval(c["selection_share"]["fisher_z_mean"], c["selection_share"]["ci"])])
    counts = table(["domain", "items", "significant cells", "calibration: router share (Fisher-z mean, 95% CI)",
                    "calibration: top-k share"], rows, "iso-domains")
    dominance = {(d["domain"], d["layer"]): d for d in summary["dominance"]}
    layer_rows = []
    for row in summary["layer_table"]:
        d = dominance[(row["domain"], row["layer"])]
        layer_rows.append([row["domain"], row["layer"], row["best_expert"], interval(row["best_median_delta"], row["best_ci"]),
                           fmt(row["floor_median_delta"]), row["significant_cells"], d["most_activated"],
                           fmt(d["vs_uniform"], 2), d["rank_of_most_activated"], "yes" if d["most_activated_is_best"] else "no"])
    layers = table(["domain", "layer", "best expert", "its median delta [95% CI]", "floor delta", "significant cells",
                    "most activated", "share x E", "its rank", "most activated is best"], layer_rows, "iso-layers")
    top = cells.sort_values(["q_value", "median_delta"], ascending=[True, False]).head(20)
    top_table = table(["domain", "layer", "expert", "n", "median delta [95% CI]", "p", "q", "vs floor: median", "q vs floor",
                       "natural share"],
                      [[r["domain"], r["layer"], r["expert"], r["n"], interval(r["median_delta"], [r["ci_low"], r["ci_high"]]),
                        p_at_floor(r["p_value"], r["n"]), f"{r['q_value']:.2e}", fmt(r["median_delta_vs_floor"]),
                        f"{r['q_value_vs_floor']:.2e}", fmt(r["natural_share"])] for _, r in top.iterrows()], "iso-cells")
    figures = isolation_figures(cells, calibration, summary)
    return (f"<h2>Expert isolation: {esc(run_dir)}</h2>"
            f"<p>{summary['significant_cells']} of {summary['cells']} (domain, layer, expert) cells significant at FDR "
            f"{summary['alpha']} (Benjamini-Hochberg step-up); {summary['significant_better_than_natural']} better than "
            f"natural routing; {summary['significant_vs_floor']} differ from the random floor "
            f"({summary.get('significant_better_than_floor', '?')} better). Score: {esc(summary['score'])}.</p>"
            f"{counts}<h3>Layer table and dominance</h3>{layers}{figures_html(run_dir, figures)}"
            f"<h3>The 20 cells with the smallest q-values</h3>"
            f"<p>A p marked <em>(floor)</em> is the smallest the exact signed-rank test allows with n items "
            f"(2 / 2<sup>n</sup>): every item moved the same way, and only more items could lower it.</p>"
            f"{top_table}{provenance(run)}")


# ---------------------------------------------------------------------------- isolation
def isolation_figures(cells: pd.DataFrame, calibration: pd.DataFrame, summary: dict) -> list[Figure]:
    domains = list(summary["items_per_domain"])
    layers = summary["layers"]
    experts = summary["num_experts"]
    figures = []

    fig, axes = grid(len(domains), width=min(0.32 * experts + 2.5, 9), height=0.45 * len(layers) + 2.2, columns=2)
    limit = float(np.nanmax(np.abs(cells["median_delta"]))) or 1.0
    for ax, domain in zip(axes, domains):
        at = cells[cells["domain"] == domain]
        medians = at.pivot(index="layer", columns="expert", values="median_delta").reindex(index=layers,
                                                                                          columns=range(experts))
        image = ax.imshow(medians.to_numpy(), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        significant = at[at["significant"]]
        ax.scatter(significant["expert"], [layers.index(layer) for layer in significant["layer"]], marker=".", s=12,
                   color="black", label="significant (BH)")
        ax.set_yticks(range(len(layers)), layers)
        ax.set(title=f"{domain} ({summary['items_per_domain'][domain]} items)", xlabel="forced expert [expert id]",
               ylabel="layer [decoder-layer index]")
        fig.colorbar(image, ax=ax, label="median delta vs natural [nats]")
    fig.suptitle(f"Forcing one expert per layer: median change of the {summary['score']} "
                 f"(dot: significant at FDR {summary['alpha']})")
    fig.tight_layout()
    figures.append(Figure("iso_delta_heatmap", "Delta per (layer, expert)", "Blue: forcing the expert helps; red: it "
                          "hurts. Dots mark cells that survive the Benjamini-Hochberg step-up procedure.", fig))

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
        ax.plot(layers, at["floor_median_delta"], linestyle=":", marker="x", color=colour(i), label=f"{domain}: random floor")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(layers)
    ax.set(title="Effect by layer: the best single expert and the random-routing floor", xlabel="layer [decoder-layer index]",
           ylabel="median delta vs natural [nats]")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    figures.append(Figure("iso_layers", "Layer table", "Best single expert per layer (95% CI of the median) "
                          "against random equal-compute routes.", fig))
    return figures
