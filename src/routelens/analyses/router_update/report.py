"""The report section of the router update: its HTML and its figures (read from the run folder)."""

from __future__ import annotations

import os

import pandas as pd

from routelens.analyses.router_update.table import changed_gain_line
from routelens.report.build import figures_html, provenance
from routelens.report.figures import ARM_COLOURS, Figure, subplots
from routelens.report.formats import p_value_text
from routelens.report.page import esc, fmt, interval, key_values, table
from routelens.results.stored import read_json_file, read_jsonl_file


def section(run_dir: str, run: dict) -> str:
    summary = read_json_file(os.path.join(run_dir, "summary.json"))
    steps = pd.DataFrame(read_jsonl_file(os.path.join(run_dir, "training_log.jsonl")))
    facts = {"layer": summary["layer"], "preference pairs": summary["pairs"], "tokens with pairs": summary["pair_tokens"],
             "pairs by bin": summary["pairs_by_bin"],
             "preferred route ranked higher, before -> after": f"{summary['preference_accuracy_before']:.3f} -> "
                                                                f"{summary['preference_accuracy_after']:.3f}",
             "loss, first -> last step": f"{summary['loss_first_step']:.4f} -> {summary['loss_last_step']:.4f}",
             "parameters and buffers hashed": summary["parameters_checked"],
             "changed (everything else bit-identical)": summary["parameters_changed"],
             "router delta": summary["router_delta"]}
    changes = summary.get("heldout_route_changes")
    change_table = ""
    if changes:
        scored = "changed_gain" in changes["All"]   # runs made before the changed routes were scored: counts only
        change_table = ("<h3>Held-out tokens whose standard route changed, and whether the new routes are better</h3>"
                        + table(["bin", "tokens", "route changed", "share"]
                                + (["p new - p old, changed tokens [95% CI]", "improved", "worsened", "tied",
                                    "sign test p"] if scored else []),
                                [[b, changes[b]["tokens"], changes[b]["route_changed"], fmt(changes[b]["share"])]
                                 + ([interval(changes[b]["changed_gain"], changes[b]["changed_gain_ci"], 4),
                                     changes[b]["improved"], changes[b]["worsened"], changes[b]["tied"],
                                     p_value_text(changes[b]["sign_test"])] if scored else [])
                                 for b in ("Fragile", "Ambiguous", "Confident", "All")], "update-changes")
                        + f"<p>{esc(changed_gain_line(changes))}</p>")
    figures = router_update_figures(steps, summary)
    return (f"<h2>Router-only update: {esc(run_dir)}</h2>{key_values(facts)}{change_table}"
            f"{figures_html(run_dir, figures)}{provenance(run)}")


# ---------------------------------------------------------------------------- router update
def router_update_figures(steps: pd.DataFrame, summary: dict) -> list[Figure]:
    fig, (ax_loss, ax_margin) = subplots(1, 2, figsize=(11, 3.6))
    ax_loss.plot(steps["step"], steps["loss"], color=ARM_COLOURS[0])
    ax_loss.set(title="DPO loss per step", xlabel="optimizer step [count]", ylabel="loss [nats]")
    ax_margin.plot(steps["step"], steps["reward_margin"], color=ARM_COLOURS[1])
    ax_margin.set(title="Implicit reward margin per step", xlabel="optimizer step [count]",
                  ylabel="margin [nats of log-probability ratio]")
    fig.suptitle(f"Router-only update of layer {summary['layer']}: {summary['pairs']} preference pairs")
    fig.tight_layout()
    return [Figure("update_training", "Training curve", "Minibatch loss and mean margin (log pi - log pi_ref of the "
                   "preferred minus the rejected route).", fig)]
