"""llama.cpp as a real inference engine (issue 30): GGUF export, routes through its graph
callback, agreement with Hugging Face, quantization flips, and forcing the engine's routes in
Hugging Face. Needs the `llama` extra (scripts/setup.sh builds it)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("gguf", reason="the llama extra is not installed (pip install 'routelens[llama]')")
pytest.importorskip("llama_cpp", reason="the llama extra is not installed (pip install 'routelens[llama]')")

import routelens as rl  # noqa: E402
from routelens.errors import RouteLensError, SettingError  # noqa: E402
from routelens.inference.gguf_export import check_gguf, export_gguf  # noqa: E402
from routelens.inference.llama_cpp import llama_cpp_routes, run_llama_cpp  # noqa: E402
from routelens.models.routing import route_by_rule  # noqa: E402
from routelens.models.tiny import build_tiny_model  # noqa: E402

#: f32 GGUF with an f32 KV cache against the HF forward in fp32: the largest |difference| of a
#: next-token log-prob allowed (measured on the demo's 100 arithmetic items: 2.1e-5 max, 6e-7 mean, with
#: an f32 KV cache and without flash attention; see benchmarks/llama_cpp_flips.py)
F32_LOGPROB_TOLERANCE = 1e-4


def _hf(lens, sequences):
    """HF's own routes ([T, L, k] expert ids, sorted per row) and log-softmax [T, V] per trajectory."""
    routes, logprobs = {}, {}
    for key, ids in sequences.items():
        with torch.no_grad(), lens.capture() as captured:
            logits = lens.model(torch.tensor([ids])).logits[0]
        routes[key] = np.stack([captured[layer].experts[0].numpy() for layer in lens.moe_layers], axis=1)
        logprobs[key] = torch.log_softmax(logits.double(), -1).numpy()
    return routes, logprobs


def _agreement(ours: dict, theirs: dict) -> tuple[int, int]:
    """(decisions with the same expert set, decisions): one decision per token and MoE layer."""
    same = total = 0
    for key, routes in ours.items():
        a, b = np.sort(routes, axis=-1), np.sort(theirs[key], axis=-1)
        same += int((a == b).all(axis=-1).sum())
        total += a.shape[0] * a.shape[1]
    return same, total


@pytest.fixture(scope="module")
def demo():
    lens = rl.load("demo")
    items = rl.arithmetic_items(lens, per_domain=4)
    sequences = {item.id: list(item.input_ids) for item in items}
    hf_routes, hf_logprobs = _hf(lens, sequences)
    return lens, sequences, hf_routes, hf_logprobs


@pytest.fixture(scope="module")
def engine_runs(demo):
    lens, sequences, _, _ = demo
    return {gguf_type: llama_cpp_routes(lens, sequences, gguf_type, full_logprobs=True) for gguf_type in ("f32", "q8_0", "q4_0")}


def test_f32_llama_cpp_agrees_with_hugging_face_on_routes_and_logprobs(demo, engine_runs):
    lens, sequences, hf_routes, hf_logprobs = demo
    routes, logprobs = engine_runs["f32"]
    assert routes.source == "llama.cpp:f32" and routes.layers == lens.moe_layers and routes.top_k == lens.top_k
    assert routes.meta["kv_cache_type"] == "f32" and routes.meta["flash_attn"] == "off"
    for key, ids in sequences.items():   # position t = token t: T route rows, T log-prob rows
        assert routes.shape(key) == (len(ids), len(lens.moe_layers), lens.top_k)
        assert logprobs[key].shape == hf_logprobs[key].shape
    same, total = _agreement(routes.experts, hf_routes)
    assert total > 1000 and same / total >= 0.999, f"{total - same} of {total} routing decisions differ"
    deviation = max(float(np.abs(logprobs[key] - hf_logprobs[key]).max()) for key in sequences)
    assert deviation <= F32_LOGPROB_TOLERANCE, deviation
    # the realized next token's log-prob, the default return, is the full distribution's entry
    _, targets = llama_cpp_routes(lens, dict(list(sequences.items())[:2]), "f32")
    for key, values in targets.items():
        ids = sequences[key]
        np.testing.assert_allclose(values, logprobs[key][np.arange(len(ids) - 1), ids[1:]], atol=1e-6)


def test_router_logits_read_through_the_callback_are_hugging_faces_and_trajectories_are_accepted(demo):
    lens, sequences, hf_routes, _ = demo
    few = list(sequences.items())[:3]
    trajectories = rl.trajectories_from_ids([ids for _, ids in few], completion_start=2, ids=[key for key, _ in few])
    run = run_llama_cpp(lens, trajectories, "f32", router_logits=True)
    assert sorted(run.routes.experts) == sorted(key for key, _ in few) and run.routes.meta["flash_attn"] == "off"
    for key, ids in few:
        with torch.no_grad(), lens.capture() as captured:
            lens.model(torch.tensor([ids]))
        hf_logits = np.stack([captured[layer].logits[0].numpy() for layer in lens.moe_layers], axis=1)   # [T, L, E]
        assert run.router_logits[key].shape == (len(ids), len(lens.moe_layers), lens.num_experts)
        np.testing.assert_allclose(run.router_logits[key], hf_logits, atol=1e-4)
        # the engine's top-k is the top-k of its own logits (the callback read the right tensors, in order)
        engine_top = np.sort(np.argsort(-run.router_logits[key], axis=-1)[..., :lens.top_k], axis=-1)
        assert (engine_top == np.sort(run.routes.experts[key], axis=-1)).all()


def test_quantized_files_flip_routes_and_forcing_them_in_hugging_face_reproduces_them_exactly(demo, engine_runs):
    lens, sequences, hf_routes, _ = demo
    flips = {}
    for gguf_type in ("q8_0", "q4_0"):
        routes, _ = engine_runs[gguf_type]
        assert routes.source == f"llama.cpp:{gguf_type}" and routes.meta["kv_cache_type"] == "f16"
        assert routes.meta["flash_attn"].startswith("auto")   # as llama.cpp runs them by default
        same, total = _agreement(routes.experts, hf_routes)
        flips[gguf_type] = (total - same) / total
        for experts in routes.experts.values():   # valid routes: k distinct experts in range
            assert experts.min() >= 0 and experts.max() < lens.num_experts
            assert (np.diff(np.sort(experts, axis=-1), axis=-1) > 0).all()
    assert flips["q4_0"] > 0, "q4_0 flipped no route on the demo: the forcing check below would prove nothing"
    assert flips["q8_0"] < 0.05 and flips["q4_0"] < 0.5, flips

    # every MoE layer at once, weights by the gating rule on the forced run's own router logits
    for gguf_type in ("q8_0", "q4_0"):
        routes, _ = engine_runs[gguf_type]
        for key, ids in sequences.items():
            engine = torch.as_tensor(routes.experts[key], dtype=torch.long)   # [T, L, k]
            rules = {layer: (lambda logits, hidden, i=i, engine=engine: engine[:, i].to(logits.device))
                     for i, layer in enumerate(lens.moe_layers)}
            with torch.no_grad(), route_by_rule(lens.adapter, rules), lens.capture() as captured:
                lens.model(torch.tensor([ids]))
            for i, layer in enumerate(lens.moe_layers):
                forced = captured[layer]
                assert torch.equal(forced.experts[0].sort(-1).values, engine[:, i].sort(-1).values), (gguf_type, key, layer)
                expected = lens.adapter.weights_for(forced.logits[0].float(), forced.experts[0])
                torch.testing.assert_close(forced.weights[0].float(), expected.float())


def test_a_gguf_of_another_model_is_refused_in_one_line(demo, tmp_path):
    lens, sequences, _, _ = demo
    few = dict(list(sequences.items())[:1])
    qwen = rl.wrap(build_tiny_model("qwen3_moe"))
    other_family = export_gguf(qwen, str(tmp_path / "qwen.gguf"), "f32")
    # same architecture and shapes, another router: a copy of the demo with one router retrained
    twin = rl.load("demo")
    with torch.no_grad():
        twin.adapter.routers[2].weight.add_(0.1)
    same_shapes = export_gguf(twin, str(tmp_path / "twin.gguf"), "f32")
    for path, words in ((other_family, "a GGUF of a 'qwen3moe' model"), (same_shapes, "router weights of layer 2")):
        with pytest.raises(RouteLensError) as caught:
            llama_cpp_routes(lens, few, gguf=path)
        assert words in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(RouteLensError, match="not a readable GGUF"):
        (tmp_path / "junk.gguf").write_bytes(b"GGUF but not really")
        check_gguf(lens, str(tmp_path / "junk.gguf"))
    # a file of this very model is accepted, and reports its own type
    own = export_gguf(lens, str(tmp_path / "demo-f16.gguf"), "f16")
    routes, _ = llama_cpp_routes(lens, few, gguf=own)
    assert routes.source == "llama.cpp:f16" and routes.meta["gguf"] == own


def test_bad_inputs_are_one_line_errors(demo, tmp_path):
    lens, sequences, _, _ = demo
    cases = [
        (lambda: llama_cpp_routes(lens, {"a": [1, 2, 99]}, "f32"), SettingError, "outside the vocabulary"),
        (lambda: llama_cpp_routes(lens, {"a": [1]}, "f32"), SettingError, "two or more"),
        (lambda: llama_cpp_routes(lens, {"a": None}, "f32"), SettingError, "must be a list of token ids"),
        (lambda: llama_cpp_routes(lens, {"a": [1.0, 2.0]}, "f32"), SettingError, "integer token ids"),
        (lambda: llama_cpp_routes(lens, "abc", "f32"), SettingError, "`trajectories` must be"),
        (lambda: llama_cpp_routes(lens, {}, "f32"), SettingError, "is empty"),
        (lambda: llama_cpp_routes(lens, {"a": [1, 2]}, "q5_k"), SettingError, "`gguf_type` must be one of"),
        (lambda: llama_cpp_routes(lens, {"a": [1, 2]}, "f32", kv_cache_type="q8_0"), SettingError, "kv_cache_type"),
        (lambda: llama_cpp_routes(lens, {"a": [1, 2]}, "f32", flash_attn="yes"), SettingError, "`flash_attn` must be"),
        (lambda: llama_cpp_routes(lens, {"a": [1, 2]}, gguf=str(tmp_path / "none.gguf")), SettingError, "no such file"),
        (lambda: export_gguf(rl.wrap(build_tiny_model("qwen3_moe")), str(tmp_path / "q.gguf"), "q8_0"), RouteLensError,
         "has rows of 24"),
        (lambda: export_gguf(rl.wrap(build_tiny_model("mixtral")), str(tmp_path / "m.gguf"), "f32"), RouteLensError,
         "llama.cpp export supports olmoe, qwen3_moe; this model is 'mixtral'"),
        (lambda: export_gguf(rl.wrap(build_tiny_model("olmoe")), str(tmp_path / "o.gguf"), "f32"), RouteLensError,
         "norms k over all 4 heads"),
    ]
    for call, error, words in cases:
        with pytest.raises(error) as caught:
            call()
        assert words in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
    assert not [name for name in os.listdir(tmp_path) if name.endswith((".gguf", ".partial"))], "a refused export left a file"


def test_qwen3_moe_tiny_round_trip_at_f32(tmp_path):
    lens = rl.wrap(build_tiny_model("qwen3_moe"), name="tiny:qwen3_moe")
    rng = np.random.default_rng(0)
    sequences = {f"r{i}": [int(t) for t in rng.integers(3, lens.adapter.config.vocab_size, 40)] for i in range(6)}
    path = export_gguf(lens, str(tmp_path / "qwen3.gguf"), "f32")
    assert check_gguf(lens, path)["architecture"] == "qwen3moe"
    routes, logprobs = llama_cpp_routes(lens, sequences, gguf=path, full_logprobs=True)
    hf_routes, hf_logprobs = _hf(lens, sequences)
    same, total = _agreement(routes.experts, hf_routes)
    assert routes.top_k == 3 and same / total >= 0.999, f"{total - same} of {total} routing decisions differ"
    assert max(float(np.abs(logprobs[key] - hf_logprobs[key]).max()) for key in sequences) <= F32_LOGPROB_TOLERANCE


def test_the_modules_examples_run():
    import doctest

    from routelens.inference import gguf_export
    from routelens.inference import llama_cpp as llama_cpp_module

    for module in (gguf_export, llama_cpp_module):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_replay_runs_llama_cpp_itself_and_audits_exactly_the_routes_it_chose(demo, engine_runs, tmp_path):
    """`rl.replay(..., engine="llama.cpp", gguf_type="q4_0")` (`routelens replay --engine
    llama.cpp --gguf-type q4_0`): the flips it reports are the (token, layer) decisions where
    llama.cpp's q4_0 routes differ from Hugging Face's at scored positions, and --export
    writes llama.cpp's routes."""
    from routelens.data.engine_routes_io import read_routes

    lens, _, hf_routes, _ = demo
    trajectories = rl.trajectories_from_text(lens.tokenizer, [("Q:12+7=A:", "12+7=19#19"), ("Q:8*9=A:", "8*9=72#72"),
                                                              ("Q:50-17=A:", "50-17=33#33")])
    export = str(tmp_path / "q4.npz")
    result = rl.replay(lens, trajectories, engine="llama.cpp", gguf_type="q4_0", export=export,
                       bootstrap_resamples=50, show_progress=False)
    assert result.summary_dict["route_source"]["source"] == "llama.cpp:q4_0"
    engine, _ = llama_cpp_routes(lens, trajectories, "q4_0")
    expected = set()
    for t in trajectories:
        hf, _ = _hf(lens, {t.id: t.input_ids})
        ours, theirs = np.sort(engine.experts[t.id], -1), np.sort(hf[t.id], -1)
        for position in t.scored_positions:
            for column, layer in enumerate(lens.moe_layers):
                if (ours[position, column] != theirs[position, column]).any():
                    expected.add((t.id, int(position), layer))
    flipped = result.routes[result.routes["flipped"] & result.routes["scored"]]   # the table also holds the prompt
    assert expected and set(zip(flipped["trajectory_id"], flipped["position"].astype(int),
                                flipped["layer"].astype(int))) == expected
    # the engine's own log p (what it sampled with) against the model's, natural and replayed, from plain code
    _, engine_lp = llama_cpp_routes(lens, trajectories, "q4_0")
    tokens = result.tokens
    expected_lp = np.concatenate([engine_lp[t.id][np.asarray(t.scored_positions)] for t in trajectories])
    np.testing.assert_allclose(tokens["logprob_engine"].to_numpy(), expected_lp, rtol=0, atol=1e-12)
    gap = result.summary_dict["engine_logprobs"]["All"]
    natural = np.abs(expected_lp - tokens["logprob_natural"].to_numpy()).mean()
    replayed = np.abs(expected_lp - tokens["logprob_replayed"].to_numpy()).mean()
    assert gap["abs_engine_minus_natural"] == pytest.approx(natural) and gap["abs_engine_minus_replayed"] == \
        pytest.approx(replayed)
    assert gap["share_of_gap_closed_by_replay"] == pytest.approx(1 - replayed / natural)
    written = read_routes(export, lens, trajectories, format="npz-export")
    for t in trajectories:
        np.testing.assert_array_equal(np.sort(written.experts[t.id], -1), np.sort(engine.experts[t.id], -1))
    with pytest.raises(SettingError, match="one of them"):
        rl.replay(lens, trajectories, engine="llama.cpp", compare_to="batch=2", show_progress=False)
    with pytest.raises(SettingError, match="gguf_type"):
        rl.replay(lens, trajectories, engine="llama.cpp", gguf_type="q3_k", show_progress=False)
