"""Config fuzzing (issue 32): every registered family on generated variants of its config.

Each generated model must pass `verify` with fast == cache == reference and the forced
standard route == the plain forward within 1e-5 (fp32) at its first, a middle and its last
MoE layer, and give a default counterfactual run with every parameter requiring grad (as a
checkpoint loads); or be refused in one line (a `RouteLensError`) that names a knob it
varied. A config Hugging Face's own config class rejects is not a user's config: it is
drawn again (and counted, so a generator that only draws invalid configs fails).

Examples per type: `ROUTELENS_FUZZ_EXAMPLES` (default 3 in the full tier; the opt-in fuzz
tier, `bash scripts/fuzz.sh`, runs 20). Failing draws the fuzzer
found are the fixed cases of `REGRESSIONS`, run in the full tier.
"""

import os

import numpy as np
import pytest
import torch
from config_fuzz import fuzzed_overrides

import routelens as rl
from routelens.models.registry import FAMILIES
from routelens.models.tiny import TINY_CONFIGS, build_tiny_model, tiny_config
from routelens.verify import verify_model

EXAMPLES = int(os.environ.get("ROUTELENS_FUZZ_EXAMPLES", "3"))
EXACT = 1e-5
TYPES = sorted(t for t in TINY_CONFIGS if t in FAMILIES)

# draws that failed before their fix (issue 32's two, then what the fuzzer found):
# name -> (model type, overrides[, the seed of the weights and the test sequence])
REGRESSIONS = {
    "ernie_moe_from_layer_0": ("ernie4_5_moe", dict(moe_layer_start_index=0, moe_layer_end_index=1,
                                                    moe_num_shared_experts=1, moe_num_experts=8, moe_k=2,
                                                    num_hidden_layers=2, hidden_size=16)),
    "afmoe_window_6": ("afmoe", dict(sliding_window=6)),
    # verify's "other route" (the k lowest logits) was the standard set under LFM2's selection bias
    "lfm2_moe_4_experts_top_3": ("lfm2_moe", dict(num_experts=4, num_experts_per_tok=3, num_dense_layers=1,
                                                  norm_topk_prob=True, routed_scaling_factor=1.223), 2),
}


def _built(model_type: str, overrides: dict, seed: int):
    try:
        tiny_config(model_type, **overrides)
    except Exception:   # Hugging Face's config class rejects it: not a config a checkpoint could carry
        return None
    model = build_tiny_model(model_type, seed=seed, **overrides)
    for parameter in model.parameters():
        parameter.requires_grad_(True)   # as from_pretrained leaves every parameter
    return model


def _check(model_type: str, overrides: dict, seed: int = 0) -> str:
    """'refused' or 'passed' (asserting everything the module docstring says), or 'invalid'."""
    model = _built(model_type, overrides, seed)
    if model is None:
        return "invalid"
    try:
        lens = rl.wrap(model)
    except rl.RouteLensError as error:
        message = str(error)
        assert len(message.splitlines()) == 1, message
        assert any(knob in message for knob in overrides), f"refusal names no varied knob: {message}"
        return "refused"
    table = verify_model(lens.loaded, length=16, seed=seed, routes=2, scored_positions=2)
    failed = table[table["status"] == "fail"]
    assert failed.empty, f"{model_type} {overrides}:\n{failed.to_string()}"
    exact = table[table["check"].str.contains("vs_reference|force_standard") & (table["status"] == "pass")]
    assert (exact["difference"].fillna(0) <= EXACT).all(), f"{model_type} {overrides}:\n{exact.to_string()}"
    vocab = lens.loaded.adapter.config.get_text_config().vocab_size
    ids = [int(x) for x in np.random.default_rng(seed).integers(3, vocab, 14)]
    trajectories = rl.trajectories_from_ids([ids], 4, vocab_size=vocab)
    result = rl.counterfactual(lens, trajectories, None, layers=[lens.moe_layers[0], lens.moe_layers[-1]], routes=3,
                               null_routes=2, show_progress=False)
    assert len(result.tokens) == 2 * 10 and np.isfinite(result.tokens["p_standard"]).all()
    assert all(p.grad is None for p in model.parameters())   # scoring made no graph
    return "passed"


@pytest.mark.parametrize("case", sorted(REGRESSIONS))
def test_configs_the_fuzzer_found_are_served(case):
    model_type, overrides, *seed = REGRESSIONS[case]
    assert _check(model_type, overrides, *seed) == "passed"


@pytest.mark.fuzz
@pytest.mark.parametrize("model_type", TYPES)
def test_generated_configs_are_served_exactly_or_refused_in_one_line(model_type):
    outcomes, draw = [], 0
    while len(outcomes) < EXAMPLES:
        overrides = fuzzed_overrides(model_type, draw)
        outcome = _check(model_type, overrides, seed=draw)
        draw += 1
        if outcome != "invalid":
            outcomes.append(outcome)
        assert draw <= 4 * EXAMPLES + 4, f"{model_type}: the generator draws configs its config class rejects"
    assert outcomes.count("passed") >= 1 or EXAMPLES < 3, outcomes


def test_the_generator_varies_the_knobs_a_family_exposes():
    """Across 20 draws each knob of DeepSeek-V3 and Qwen2-MoE takes more than one value, and
    group limits stay consistent (k within the admitted groups' experts)."""
    for model_type, knobs in {"deepseek_v3": ("n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
                                              "first_k_dense_replace", "norm_topk_prob", "tie_word_embeddings",
                                              "n_shared_experts", "routed_scaling_factor"),
                              "qwen2_moe": ("num_experts", "sliding_window", "mlp_only_layers", "norm_topk_prob")}.items():
        draws = [fuzzed_overrides(model_type, seed) for seed in range(20)]
        for knob in knobs:
            assert len({repr(d[knob]) for d in draws}) > 1, knob
        for d in draws:
            if "n_group" in d:
                experts = d.get("n_routed_experts")
                assert d["num_experts_per_tok"] < d["topk_group"] * experts // d["n_group"] + 1
    assert torch.is_grad_enabled()


def test_every_analysis_makes_no_graph_on_parameters_that_require_grad(tmp_path):
    """Issue 32's defect class: a checkpoint loads every parameter requiring grad (ERNIE's
    correction bias is one the selection scores read). Each analysis runs on such a model,
    loaded from a folder, and leaves no gradient; router-update's training still trains."""
    from conftest import ALPHABET, write_jsonl

    from routelens.data.char_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer(ALPHABET)
    model = build_tiny_model("ernie4_5_moe", seed=0, vocab_size=len(tokenizer), moe_layer_start_index=0,
                             moe_layer_end_index=3)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    lens = rl.load(str(tmp_path / "model"))
    assert all(p.requires_grad for p in lens.model.parameters())
    last = lens.moe_layers[-1]
    trajectories = write_jsonl(tmp_path / "t.jsonl", [
        {"id": f"t{i}", "prompt": f"Q:{i}+1=", "completion": f"A:{i}+1={i + 1}#{i + 1}", "answer": str(i + 1)}
        for i in range(3)])
    items = write_jsonl(tmp_path / "items.jsonl", [{"id": f"i{i}", "domain": "ab"[i % 2], "prompt": f"Q:{i}+2=",
                                                    "target": str(i + 2)} for i in range(8)])
    cf = rl.counterfactual(lens, trajectories, str(tmp_path / "cf"), layers=[lens.moe_layers[0], last], routes=3,
                           null_routes=2, show_progress=False)
    rl.rollout(lens, cf, str(tmp_path / "ro"), tokens="all", limit=2, samples=1, max_new_tokens=3, show_progress=False)
    rl.isolate(lens, items, str(tmp_path / "iso"), layers=[last], floor_seeds=1, show_progress=False)
    rl.semantic_route(lens, items, str(tmp_path / "sem"), accuracy=False, show_progress=False)
    update = rl.router_update(lens, cf, str(tmp_path / "ru"), steps=3, margin=0.0, lr=1e-2)
    assert len(update.summary_dict["parameters_changed"]) >= 1       # the training made its graph, on the router only
    assert all(p.grad is None for p in lens.model.parameters())


def test_the_families_page_names_every_knob_the_fuzzer_varies():
    import config_fuzz

    page = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "families.md"), encoding="utf-8").read()
    knobs = [*config_fuzz.EXPERTS, *config_fuzz.TOP_K, *config_fuzz.SHARED, *config_fuzz.GROUPS, *config_fuzz.DENSE_FIRST,
             *config_fuzz.RENORMALISE, *config_fuzz.SCALE, *config_fuzz.BOOLEANS, "topk_group", "mlp_layer_types",
             "mlp_only_layers", "decoder_sparse_step", "sliding_window", "topk_method", "expert_layer_period",
             "shared_expert_intermediate_size"]
    missing = [knob for knob in knobs if f"`{knob}`" not in page]
    assert not missing, missing
