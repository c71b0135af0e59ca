"""`routelens models`: the supported MoE families and their gating rules."""

from __future__ import annotations

NAME = "models"
HELP = "list the supported MoE families"
RESUMABLE = False
EPILOG = """examples:
  routelens models
"""


def parents():
    return []


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    from routelens.models.registry import FAMILIES

    rows = [(model_type, entry, entry.adapter_name) for model_type, entry in FAMILIES.items()]
    width = max(len(adapter) for *_, adapter in rows)
    mixers = max(len(entry.mixers) for _, entry, _ in rows)
    print(f"{'model type':<18} {'adapter':<{width}} {'layers':<{mixers}} gating rule")
    for model_type, entry, adapter in rows:
        print(f"{model_type:<18} {adapter:<{width}} {entry.mixers:<{mixers}} {entry.gating_rule}")
    hybrids = sum(entry.mixers != "attention" for _, entry, _ in rows)
    print(f"{len(rows)} model types ({hybrids} hybrids: the cache engine scores the layers the fast engine cannot patch)")
    return 0
