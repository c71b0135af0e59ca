"""Print the tables of docs/findings.md (Markdown) from run folders' summary.json.

    python scripts/findings_tables.py counterfactual RUN [RUN_MATCHED_MASS]
    python scripts/findings_tables.py joint RUN
    python scripts/findings_tables.py rollout RUN
    python scripts/findings_tables.py isolation RUN
    python scripts/findings_tables.py router-update RUN [RUN ...]

Every number of the page's tables comes from one of these commands on the run folders the
page names; nothing is typed by hand.
"""

from __future__ import annotations

import json
import os
import sys

from routelens.report.formats import with_interval as ci  # value [low, high], "-" when absent

BINS = ("Confident", "Ambiguous", "Fragile")


def summary(run: str) -> dict:
    with open(os.path.join(run, "summary.json"), encoding="utf-8") as handle:
        return json.load(handle)


def p_text(value) -> str:
    return "-" if value is None else f"{value:.2g}"


def counterfactual(run: str, matched: str | None = None) -> None:
    s = summary(run)
    other = summary(matched) if matched else None
    print(f"cluster unit: {s['cluster_unit']}; confidence {s['confidence']}; cells {s['cells']}; "
          f"null routes {s['null_routes']}; weights {s['alternative_weights']}\n")
    head = ["layer", "bin", "tokens (problems)", "p(std)", "gain (best of S - std)", "std - uniform",
            "win / tie / loss", "ahead / behind / even", "sign p", "q (BH)"]
    if other:
        head.append("std - uniform, matched mass")
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for layer, groups in s["layers"].items():
        for name in BINS:
            g = groups[name]
            test = g["win_loss_sign_test"]
            if not g["tokens"]:
                print(f"| {layer} | {name} | 0 |" + " - |" * (len(head) - 3))
                continue
            row = [layer, name, f"{g['tokens']} ({g['clusters']})", f"{g['p_standard']:.3f}",
                   ci(g["gain"], g["gain_ci"]) + ("†" if g["gain_survives_adjustment"] is False else ""),
                   ci(g["standard_minus_uniform"], g["standard_minus_uniform_ci"])
                   + ("†" if g["standard_minus_uniform_survives_adjustment"] is False else ""),
                   f"{g['win_rate']:.3f} / {g['tie_rate']:.3f} / {g['loss_rate']:.3f}",
                   f"{test['clusters_alternatives_ahead']} / {test['clusters_standard_ahead']} / {test['clusters_even']}",
                   p_text(test["p_value"]), p_text(test.get("q_value"))]
            if other:
                h = other["layers"][layer][name]
                row.append(ci(h["standard_minus_uniform"], h["standard_minus_uniform_ci"])
                           + ("†" if h["standard_minus_uniform_survives_adjustment"] is False else ""))
            print("| " + " | ".join(map(str, row)) + " |")
    print("\nalignment (raw; matched-mass run: scale-free)\n")
    print("| layer | bin | alignment | best of m sampled - best of m uniform |" + (" alignment, matched mass |" if other else "")
          + "\n| --- | --- | --- | --- |" + (" --- |" if other else ""))
    for layer, groups in s["layers"].items():
        for name in BINS:
            g = groups[name]
            row = [layer, name, ci(g["alignment"], g["alignment_ci"]),
                   ci(g["best_minus_uniform_best"], g["best_minus_uniform_best_ci"])]
            if other:
                h = other["layers"][layer][name]
                row.append(ci(h["alignment"], h["alignment_ci"]))
            print("| " + " | ".join(map(str, row)) + " |")


def joint(run: str) -> None:
    block = summary(run)["joint"]
    print(f"layers {block['layers']}; cluster unit {block.get('cluster_unit')}\n")
    print("| bin | tokens (problems) | interaction | adjusted over the bins | verdict | best joint gain | "
          "best single-layer gain |\n| --- | --- | --- | --- | --- | --- | --- |")
    for name in BINS:
        g = block["bins"][name]
        print(f"| {name} | {g['tokens']} ({g.get('clusters', g['trajectories'])}) | "
              f"{ci(g['interaction'], g['interaction_ci'], 4)} | {ci(g['interaction'], g['interaction_ci_adjusted'], 4)} | "
              f"{g['verdict']} | {ci(g['gain'], g['gain_ci'], 4)} | "
              f"{ci(g['max_single_gain'], g['max_single_gain_ci'], 4)} |")


def rollout(run: str) -> None:
    s = summary(run)
    g = s["bins"]["All"]
    print(f"selection {s['selection']}; best_by {s['best_by']}; units: {g['tokens']} tokens, {g['positions']} positions, "
          f"{g['trajectories']} trajectories, {g['problems']} problems; intervals over {s['resampled']}\n")
    print("| arm | final answers correct | minus standard (paired) | via the first token | beyond the first token | "
          "first token = trajectory's | correct given it is / is not |\n| --- | --- | --- | --- | --- | --- | --- |")
    for arm in ("standard", "best_alt", "random_alt"):
        paired = [ci(g[f"{arm}_minus_standard{part}"], g[f"{arm}_minus_standard{part}_ci"])
                  for part in ("", "_via_first_token", "_beyond_first_token")] if arm != "standard" else ["", "", ""]
        print(f"| {arm} | {ci(g[f'accuracy_{arm}'], g[f'accuracy_{arm}_ci'])} | " + " | ".join(paired)
              + f" | {g[f'first_token_match_{arm}']:.3f} | {g[f'accuracy_{arm}_given_match']:.3f} / "
                f"{g[f'accuracy_{arm}_given_other']:.3f} |")


def isolation(run: str) -> None:
    s = summary(run)
    print(f"items per domain {s['items_per_domain']}; layers {s['layers']}; {s['num_experts']} experts; "
          f"BH at {s['alpha']} per comparison; score {s['score']}\n")
    print("| comparison | significant | harmful | helpful | the verdict's basis |\n| --- | --- | --- | --- | --- |")
    for name, c in s["comparisons"].items():
        print(f"| {name} | {c['significant']} / {c['cells']} | {c['harmful']} | {c['helpful']} | "
              f"{'yes' if c['verdict_basis'] else ''} |")
    verdict = s["verdict"]
    print(f"\nverdict ({verdict['comparison']}): harmful {verdict['harmful']}, helpful {verdict['helpful']}, "
          f"neither {verdict['neither']}; by domain " + "; ".join(
              f"{d} {v['harmful']} / {v['helpful']}" for d, v in verdict["by_domain"].items()))


def router_update(*runs: str) -> None:
    """Each update run's held-out check, and pass@k of its `passk-...` sibling folder (the
    experiment script's layout: update-lrX beside passk-lrX) where there is one."""
    print("| lr | held-out tokens changed | p new - p old, changed tokens | improved / worsened / tied | sign p | "
          "pass@1 base -> updated, difference | pass@16 base -> updated, difference |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for run in runs:
        s = summary(run)
        with open(os.path.join(run, "run.json"), encoding="utf-8") as handle:
            lr = json.load(handle)["config"]["lr"]
        c = s["heldout_route_changes"]["All"]
        row = [f"{lr:g}", f"{c['route_changed']} / {c['tokens']}", ci(c["changed_gain"], c["changed_gain_ci"], 4),
               f"{c['improved']} / {c['worsened']} / {c['tied']}", p_text((c["sign_test"] or {}).get("p_value"))]
        passk = os.path.join(os.path.dirname(run), os.path.basename(run).replace("update-", "passk-", 1))
        for k in ("pass@1", "pass@16"):
            if os.path.isfile(os.path.join(passk, "summary.json")):
                every = summary(passk)["all"]
                row.append(f"{every['base'][k]['mean']:.3f} -> {every['updated'][k]['mean']:.3f}, "
                           + ci(every["difference"][k]["mean"], every["difference"][k]["ci"]))
            else:
                row.append("-")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    commands = {"counterfactual": counterfactual, "joint": joint, "rollout": rollout, "isolation": isolation,
                "router-update": router_update}
    if len(sys.argv) < 3 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    commands[sys.argv[1]](*sys.argv[2:])
