"""The report section of semantic routing: its HTML and its figures (read from the run folder)."""

from __future__ import annotations

import os

import numpy as np

from routelens.report.build import figures_html, provenance
from routelens.report.figures import Figure, colour, interval_errors, subplots
from routelens.report.page import esc, fmt, interval, table
from routelens.results.stored import read_json_file


def section(run_dir: str, run: dict) -> str:
    summary = read_json_file(os.path.join(run_dir, "summary.json"))
    arms = ("semantic", "semantic_token", "oracle", "floor")
    rows = []
    for name, block in summary["layer_sets"].items():
        for domain, entry in block.items():
            cells = [("-" if entry.get(arm) is None else interval(entry[arm]["difference"], entry[arm]["ci"])
                      + (" *" if entry[arm]["significant"] else "")) for arm in arms]
            rows.append([name, domain, entry["items"], fmt(entry["natural"]), *cells])
    comparison = table(["layer set", "domain", "items", "natural", *[f"{arm} - natural" for arm in arms]], rows,
                       "semantic-arms")
    classes = table(["layer", "items classified right", "tokens classified right", "by domain"],
                    [[layer, fmt(c["item"], 2), fmt(c["token"], 2),
                      ", ".join(f"{d} {v:.2f}" for d, v in c["by_domain"].items())]
                     for layer, c in summary["classification"].items()], "semantic-classification")
    return (f"<h2>Semantic routing: {esc(run_dir)}</h2>"
            f"<p>{summary['calibration_items']} calibration and {summary['evaluation_items']} evaluation items; "
            f"{esc(summary['kind'])} fingerprints. Arms: "
            f"{esc('; '.join(f'{arm}: {text}' for arm, text in summary['arms'].items()))}. {esc(summary['interval'])}; "
            f"* q &lt;= {summary['alpha']}.</p>{comparison}{_semantic_accuracy(summary)}"
            f"<h3>Fingerprint classification</h3>{classes}"
            f"{figures_html(run_dir, semantic_route_figures(summary))}{provenance(run)}")


def _semantic_accuracy(summary: dict) -> str:
    if not summary.get("accuracy"):
        return ""
    arms = ("semantic", "semantic_token", "oracle", "floor")
    rows = []
    for name, block in summary["accuracy"].items():
        for domain, entry in block.items():
            rows.append([name, domain, entry["items"], fmt(entry["natural"], 2)]
                        + [("-" if arm not in entry else f"{entry[arm]['accuracy']:.2f}: "
                            f"{interval(entry[arm]['difference'], entry[arm]['ci'], 2)}, p {entry[arm]['p_value']:.2g}")
                           for arm in arms])
    return (f"<h3>Accuracy of generated answers</h3><p>{esc(summary['accuracy_definition'])}.</p>"
            + table(["layer set", "domain", "items", "natural", *[f"{arm}: accuracy, minus natural" for arm in arms]],
                    rows, "semantic-accuracy"))


def semantic_route_figures(summary: dict) -> list[Figure]:
    """Each arm's paired difference against natural routing per layer set (all evaluation
    items), and the fingerprints' domain classification accuracy per layer."""
    arms = ("semantic", "semantic_token", "oracle", "floor")
    sets = list(summary["layer_sets"])
    fig, (ax_arms, ax_class) = subplots(1, 2, figsize=(12, 4.0))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        tests = [summary["layer_sets"][name]["All"].get(arm) for name in sets]
        values = [None if t is None else t["difference"] for t in tests]
        ax_arms.bar(np.arange(len(sets)) + (i - (len(arms) - 1) / 2) * width, [np.nan if v is None else v for v in values],
                    width, label=arm.replace("_", " "), color=colour(i), capsize=3,
                    yerr=interval_errors(values, [(None, None) if t is None else t["ci"] for t in tests]))
    ax_arms.axhline(0, color="black", linewidth=0.8)
    ax_arms.set_xticks(range(len(sets)), sets)
    ax_arms.set(xlabel="layer set (forced together)", ylabel=f"arm - natural [{summary['score']}]",
                title="Routing by fingerprint against natural routing")
    ax_arms.legend(fontsize=8)
    layers = list(summary["classification"])
    chance = 1 / len(summary["classification"][layers[0]]["by_domain"])
    ax_class.plot(layers, [summary["classification"][layer]["item"] for layer in layers], marker="o", label="item (prompt)")
    ax_class.plot(layers, [summary["classification"][layer]["token"] for layer in layers], marker="s", label="token")
    ax_class.axhline(chance, color="black", linewidth=0.8, linestyle="--", label="chance")
    ax_class.set(xlabel="layer", ylabel="domain classified right [share]", ylim=(0, 1.05),
                 title="Fingerprint classification")
    ax_class.legend(fontsize=8)
    fig.tight_layout()
    return [Figure("semantic_routing", "Semantic routing", "Left: mean paired difference of the target log-prob "
                   "against natural routing, 95% bootstrap interval over items. Right: share of evaluation items "
                   "(and tokens) whose nearest fingerprint is their own domain.", fig)]
