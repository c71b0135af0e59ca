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
    from routelens.models.registry import ADAPTERS, adapter_class

    rows = [(model_type, adapter_class(model_type)) for model_type in ADAPTERS]
    width = max(len(cls.__name__) for _, cls in rows)
    mixers = max(len(cls.layer_mixers) for _, cls in rows)
    print(f"{'model type':<18} {'adapter':<{width}} {'layers':<{mixers}} gating rule")
    for model_type, cls in rows:
        print(f"{model_type:<18} {cls.__name__:<{width}} {cls.layer_mixers:<{mixers}} {cls.gating_rule}")
    hybrids = sum(cls.layer_mixers != "attention" for _, cls in rows)
    print(f"{len(rows)} model types ({hybrids} hybrids: the cache engine scores the layers the fast engine cannot patch)")
    return 0
