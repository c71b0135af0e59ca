"""List every model type of the installed transformers whose modeling file has a routed MoE
block, and say whether routelens serves it and, if not, why.

    .venv/bin/python scripts/moe_families.py > docs/moe-families.md

Served types are read off the registry. For an unserved type with a causal-LM class, the
"why" is what `routelens.models.router_probe` finds by building a tiny random-weight model
of the type and running one forward: what its router returns (the standard (logits, weights,
indices) routelens hooks, or another layout that needs its own override), or why no tiny
model could be built or run; then what else the probe saw (an MoE switch off by default,
a multimodal causal-LM class, layers besides softmax attention), then `NOTES`, the facts a
probe cannot see. A test (tests/models/test_router_probe.py) checks that
docs/moe-families.md is what this script prints. Types without a causal-LM class are said so.
"""

from __future__ import annotations

import os
import re
import sys

import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from routelens.models.adapter import SOFTMAX_ATTENTION  # noqa: E402
from routelens.models.families.refusals import REFUSED  # noqa: E402
from routelens.models.registry import ADAPTERS, FAMILIES  # noqa: E402
from routelens.models.router_probe import BATCH, EXPERTS, HIDDEN, SEQUENCE, RouterOutputs, RouterProbe, probe_router  # noqa: E402

# what the modeling code does that a probe of the router's output cannot see (never a
# statement about the router's output: that is the probe's), appended to its finding
NOTES = {
}
# the types routelens refuses, with the reason loading gives (routelens.models.families.refusals),
# by folder name (the config's model_type where it differs)
CONFIG_TYPE = {"nllb_moe": "nllb-moe", "inkling": "inkling_mm_model"}
FOLDERS = (set(REFUSED) - set(CONFIG_TYPE.values())) | {f for f, t in CONFIG_TYPE.items() if t in REFUSED}
REFUSALS = {folder: "refused: " + REFUSED[CONFIG_TYPE.get(folder, folder)] for folder in sorted(FOLDERS)}
NOTES.update(REFUSALS)

ROUTED = re.compile(r'"router_logits"|route_tokens_to_experts|class \w+Top[Kk]Router|class \w+Router\(nn\.Module\)')


def moe_model_types() -> list[tuple[str, str]]:
    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    found = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, f"modeling_{name}.py")
        if os.path.isfile(path):
            source = open(path, encoding="utf-8").read()
            if ROUTED.search(source):
                found.append((name, source))
    return found


def _returns(router: RouterOutputs) -> str:
    called = (" (called with " + ", ".join(f"`{name}`" for name in router.extra_inputs) + " besides the hidden states)"
              if router.extra_inputs else "")
    if router.standard:
        what = "the standard (logits, weights, indices)"
    elif router.order:
        what = "the standard three in another order, (" + ", ".join(router.order) + ")"
    else:
        what = router.verdict
    return f"`{router.router}`{called} returns {what}"


def finding(probe: RouterProbe, refused: bool = False) -> str:
    """The probe's finding as the table's "why": what the router returns, then what that
    means for routelens (unless the type is `refused` for another reason), then what else
    the probe saw."""
    if probe.error or not probe.routers:
        text = probe.verdict
    else:
        routers = "router " if len(probe.routers) == 1 else "routers: "
        text = routers + "; ".join(_returns(r) for r in probe.routers)
        text += "" if refused else ": adapter not written yet" if probe.standard else ": needs its own override"
    seen = []
    if probe.switched_on:
        seen.append("the default config has no MoE layer (the probe set " +
                    ", ".join(f"`{name}=True`" for name in probe.switched_on) + ")")
    if probe.model_class and not probe.model_class.endswith("ForCausalLM"):
        seen.append(f"its causal-LM class is the multimodal `{probe.model_class}`")
    other = [kind for kind in probe.layer_kinds if kind not in SOFTMAX_ATTENTION]
    if other:
        seen.append("layer kinds besides full and sliding attention: " + ", ".join(f"`{kind}`" for kind in other))
    return "; ".join([text, *seen])


def status(model_type: str, source: str) -> tuple[str, str]:
    if model_type in ADAPTERS:
        mixers = FAMILIES[model_type].mixers
        hybrid = f"; hybrid ({mixers}): the cache engine scores layers below a recurrent one" if mixers != "attention" else ""
        return "served", "tiny model passes `routelens verify` (tests/test_verify.py)" + hybrid
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "not served", NOTES.get(model_type, "no causal-LM class for this model type (encoder-decoder or "
                                                   "multimodal wrapper)").replace("|", "\\|")
    note = NOTES.get(model_type)
    if note and note.startswith("refused: "):   # what stands in the way first, then what the probe saw
        why = note + "; probe: " + finding(probe_router(model_type), refused=True)
    else:
        why = "; ".join(filter(None, [finding(probe_router(model_type)), note]))
    return "not served", why.replace("|", "\\|")


def main() -> None:
    rows = [(t, *status(t, s)) for t, s in moe_model_types()]
    served = sum(r[1] == "served" for r in rows)
    print(f"# Routed-MoE model types in transformers {transformers.__version__}\n")
    print(f"{len(rows)} model types have a routed MoE block; routelens serves {served}. "
          "Generated by `scripts/moe_families.py`.\n")
    print("For an unserved type with a causal-LM class, the \"why\" says what its router returns, as found by "
          "`routelens.models.router_probe`: a tiny random-weight model of the type (hidden size "
          f"{HIDDEN}, E = {EXPERTS} experts, top-k k = 2 or the type's own 1), one forward on B = {BATCH} sequences "
          f"of S = {SEQUENCE} tokens, N = {BATCH * SEQUENCE} tokens in all. routelens hooks routers that return "
          "(logits [N, E], weights [N, k], indices [N, k]).\n")
    print("| model type | routelens | why |\n| --- | --- | --- |")
    for model_type, state, why in rows:
        print(f"| `{model_type}` | {state} | {why} |")


if __name__ == "__main__":
    main()
