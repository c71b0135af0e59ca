"""The report section of pass@k: its HTML and its figures (read from the run folder)."""

from __future__ import annotations

import os

import numpy as np

from routelens.report.build import figures_html, provenance
from routelens.report.figures import ARM_COLOURS, Figure, grid, interval_errors, subplots
from routelens.report.page import esc, interval, table
from routelens.results.stored import read_json_file


def section(run_dir: str, run: dict) -> str:
    summary = read_json_file(os.path.join(run_dir, "summary.json"))
    arms = summary["arms"]
    rows = []
    blocks = [("all", summary["all"])] + sorted((summary.get("by_group") or {}).items())
    for name, block in blocks:
        for k in summary["ks"]:
            key = f"pass@{k}"
            row = [name, k] + [interval(block[a][key]["mean"], block[a][key]["ci"]) for a in arms]
            if len(arms) == 2:
                row.append(interval(block["difference"][key]["mean"], block["difference"][key]["ci"]))
            rows.append(row)
    headers = ["problems", "k"] + arms + ([f"{arms[1]} - {arms[0]} (paired)"] if len(arms) == 2 else [])
    figures = passk_figures(summary)
    return (f"<h2>pass@k: {esc(run_dir)}</h2><p>{esc(summary['estimator'])}; {esc(summary['interval'])}.</p>"
            f"{table(headers, rows, 'passk')}{figures_html(run_dir, figures)}{provenance(run)}")


# ---------------------------------------------------------------------------- pass@k
def passk_figures(summary: dict) -> list[Figure]:
    arms, ks = summary["arms"], summary["ks"]
    blocks = [("all problems", summary["all"])] + sorted((summary.get("by_group") or {}).items())
    fig, axes = grid(len(blocks), width=4.0, height=3.4)
    for ax, (name, block) in zip(axes, blocks):
        for i, arm in enumerate(arms):
            means = [block[arm][f"pass@{k}"]["mean"] for k in ks]
            low = [block[arm][f"pass@{k}"]["ci"][0] for k in ks]
            high = [block[arm][f"pass@{k}"]["ci"][1] for k in ks]
            ax.plot(ks, means, marker="o", color=ARM_COLOURS[i], label=arm)
            ax.fill_between(ks, [np.nan if v is None else v for v in low], [np.nan if v is None else v for v in high],
                            color=ARM_COLOURS[i], alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set(title=name, xlabel="k [samples]", ylabel="pass@k [share of problems]", ylim=(0, 1.02))
        ax.legend(fontsize=8)
    fig.suptitle(f"pass@k with 95% bootstrap intervals ({summary['samples_per_problem']} samples per problem, "
                 f"T={summary['temperature']})")
    fig.tight_layout()
    figures = [Figure("passk_curves", "pass@k curves", "Unbiased pass@k; bands are 95% percentile bootstrap "
                      "intervals over problems.", fig)]
    if len(arms) == 2:
        fig, ax = subplots(figsize=(6.5, 3.8))
        for i, (name, block) in enumerate(blocks):
            means = [block["difference"][f"pass@{k}"]["mean"] for k in ks]
            intervals = [block["difference"][f"pass@{k}"]["ci"] for k in ks]
            ax.errorbar(np.array(ks) * (1 + 0.04 * i), means, yerr=interval_errors(means, intervals), marker="o",
                        capsize=3, label=name)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set(title=f"{arms[1]} - {arms[0]}: paired difference of pass@k (95% CI)", xlabel="k [samples]",
               ylabel="difference of pass@k [share of problems]")
        ax.legend(fontsize=7)
        fig.tight_layout()
        figures.append(Figure("passk_difference", "Paired difference", "Problems resampled together for both "
                              "arms (the same problems and sampling seeds).", fig))
    return figures
