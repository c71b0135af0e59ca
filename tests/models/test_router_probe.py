"""The router probe (issue 34): what a model type's router returns, found by running a tiny
model of it, and docs/moe-families.md, written from the probe, never by hand.

The quick tests check how outputs are described, on made-up router outputs; the others
build tiny models: served types are standard, the five types the old hand-written page got
wrong return what calling their router directly returns, and the committed page is what
scripts/moe_families.py prints now."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import scaled
from torch import nn

from routelens.models import router_probe
from routelens.models.router_probe import STANDARD, _describe, _layers, probe_router, tiny_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "moe_families.py"
PAGE = ROOT / "docs" / "moe-families.md"
N, E, K = router_probe.BATCH * router_probe.SEQUENCE, 16, 2
ONCE_WRONG = ["cohere2_moe", "flint", "laguna", "kolibri1", "hy_v3"]   # the old page: "router output layout differs"


class _Router(nn.Module):
    num_experts, top_k = E, K

    def forward(self, hidden_states, bias=None):
        return hidden_states


def _described(output, *args, **kwargs):
    hidden = torch.zeros(N, 32)
    return _describe("MyRouter", [(_Router(), (hidden, *args), kwargs, output)], SimpleNamespace(hidden_size=32))


def _triple():
    logits = torch.randn(N, E)
    weights, indices = logits.softmax(-1).topk(K, -1)
    return logits, weights, indices


@pytest.mark.quick
def test_the_standard_triple_is_standard():
    described = _described(_triple())
    assert described.standard and described.verdict == STANDARD
    assert described.outputs == (("[N, E]", "float32"), ("[N, k]", "float32"), ("[N, k]", "int64"))


@pytest.mark.quick
def test_the_three_in_another_order_say_which():
    logits, weights, indices = _triple()
    described = _described((weights, indices, logits))
    assert not described.standard and described.order == ("weights", "indices", "logits")
    assert described.verdict == "standard triple in another order: (weights [N, k], indices [N, k], logits [N, E])"


@pytest.mark.quick
def test_other_layouts_are_described_precisely():
    logits, _, indices = _triple()
    assert _described(logits).verdict == "a single tensor: float [N, E] per-expert scores"
    sparse = torch.full_like(logits, float("-inf")).scatter(1, indices, logits.gather(1, indices)).sigmoid()
    assert _described((sparse, logits)).verdict == ("2 outputs: float [N, E] per-expert scores (zero outside the top k), "
                                                    "float [N, E] per-expert scores")
    assert _described((logits.view(3, 7, E), indices)).verdict == "2 outputs: float [B, S, E] per-expert scores, integer [N, k] indices"
    assert _described((torch.zeros(N, E + 1), indices, [])).verdict == \
        "3 outputs: float [N, E+1] per-expert scores, integer [N, k] indices, list"


@pytest.mark.quick
def test_what_the_router_is_called_with_besides_the_hidden_states():
    assert _described(_triple(), torch.zeros(E)).extra_inputs == ("bias",)
    assert _described(_triple(), bias=torch.zeros(E)).extra_inputs == ("bias",)
    assert _described(_triple(), None).extra_inputs == ()


@pytest.mark.quick
def test_the_layers_kept_cover_every_kind_of_layer():
    kinds = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"] * 10
    mlp = ["dense"] * 3 + ["sparse"] * 37
    out = _layers({"num_hidden_layers": 40, "layer_types": kinds, "mlp_layer_types": mlp, "mlp_only_layers": [0, 1],
                   "per_layer_config": {"05": {"head_dim": 512}}})
    kept = out["num_hidden_layers"]
    assert 2 <= kept <= router_probe.LAYERS_MAX and len(out["layer_types"]) == len(out["mlp_layer_types"]) == kept
    assert set(out["layer_types"]) == set(kinds) and set(out["mlp_layer_types"]) == {"dense", "sparse"}
    assert out["mlp_only_layers"] and max(out["mlp_only_layers"]) < kept
    assert list(out["per_layer_config"].values()) == [{"head_dim": 512}]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "mixtral", "gpt_oss"])
def test_a_served_type_is_standard(model_type):
    probe = probe_router(model_type)
    assert probe.standard and probe.verdict == STANDARD and not probe.error, probe
    assert probe.model_class.endswith("ForCausalLM") and len(probe.routers) == 1 and probe.routers[0].modules >= 1


def _call_router(model_type: str):
    """The tiny model's first router (the class the model records as router_logits), called
    directly on random hidden states, with what its MoE block passes it besides them."""
    config, model_class = tiny_config(model_type)
    torch.manual_seed(0)
    model = model_class._from_config(config, dtype=torch.float32).eval()
    router_class = model.model._can_record_outputs["router_logits"].target_class
    name, router = next((n, m) for n, m in model.named_modules() if isinstance(m, router_class))
    block = model.get_submodule(name.rsplit(".", 1)[0])
    extra = [getattr(block, p) for p in list(inspect.signature(router.forward).parameters)[1:]]
    hidden = torch.randn(5, config.hidden_size)
    with torch.no_grad():
        return router, hidden, extra, router(hidden, *extra)


@pytest.mark.parametrize("model_type", ONCE_WRONG)
def test_the_probe_says_what_the_router_returns(model_type):
    probe = probe_router(model_type)
    router, hidden, extra, output = _call_router(model_type)
    experts, top_k = router.num_experts, router.top_k
    standard = (isinstance(output, tuple) and len(output) == 3
                and output[0].shape == (5, experts) and output[0].is_floating_point()
                and output[1].shape == (5, top_k) and output[1].is_floating_point()
                and output[2].shape == (5, top_k) and not output[2].is_floating_point())
    assert probe.standard == standard, probe
    assert probe.router == type(router).__name__
    assert [dtype for _, dtype in probe.outputs] == [str(o.dtype).removeprefix("torch.") for o in output]
    assert probe.routers[0].extra_inputs == tuple(list(inspect.signature(router.forward).parameters)[1:1 + len(extra)])
    # what it returns today: the standard three (the page once said otherwise)
    assert standard and probe.verdict == STANDARD
    logits, weights, indices = output
    torch.testing.assert_close(logits, F.linear(hidden.float(), router.weight.float()))   # first: the raw logits
    assert indices.min() >= 0 and indices.max() < experts
    assert all(len(set(row.tolist())) == top_k for row in indices)                         # k distinct experts per token
    assert torch.isfinite(weights).all() and (weights > 0).all()


def test_a_model_that_cannot_be_built_is_one_line(monkeypatch):
    monkeypatch.setattr(router_probe, "MAX_PARAMETERS", 10)
    probe = probe_router("qwen3_moe")
    assert probe.error.startswith("could not build a tiny model: ValueError: ") and "parameters after shrinking" in probe.error
    assert "\n" not in probe.error and probe.verdict == probe.error and not probe.standard
    assert probe_router("nllb_moe").error == \
        "could not build a tiny model: ValueError: transformers has no causal-LM or base model class for 'nllb_moe'"


def _script():
    spec = importlib.util.spec_from_file_location("moe_families", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notes_never_speak_of_the_router_output():
    script = _script()
    unserved = {t for t, _ in script.moe_model_types() if t not in script.ADAPTERS}
    assert set(script.NOTES) <= unserved   # a served type's row is the registry's
    for model_type, note in script.NOTES.items():
        if note.startswith("refused: "):   # a refusal names what stands in the way, the router's output included
            continue
        assert not any(word in note for word in ("output", "logits", "return", "layout", "tuple", "weights")), model_type


def test_the_committed_page_is_what_the_script_prints():
    started = time.monotonic()
    printed = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert printed == PAGE.read_text(encoding="utf-8"), \
        "docs/moe-families.md is stale: run .venv/bin/python scripts/moe_families.py > docs/moe-families.md"
    assert time.monotonic() - started < scaled(120)   # every unserved type probed, in well under 2 minutes
    for model_type in ONCE_WRONG:   # since served: a standard router, as the probe said
        row = next(line for line in printed.splitlines() if line.startswith(f"| `{model_type}` |"))
        assert "| served |" in row or "returns the standard (logits, weights, indices): adapter not written yet" in row


def test_the_examples_run():
    import doctest

    result = doctest.testmod(router_probe, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted and not result.failed
