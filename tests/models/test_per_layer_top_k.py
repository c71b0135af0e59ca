"""Issue 29: routers that choose a different number of experts per layer (HunYuan-MoE's
`moe_topk` list; transformers 5.23 validates its `num_experts` as one int, so only k varies).
Each MoE layer is read, forced and scored at its own k (`MoEAdapter.top_k_at`); what compares
layers at one k (joint routes, a semantic layer set) asks for layers of one k in one line;
isolation's selection shares are of each layer's own k slots; different expert counts per layer are refused in one line."""

import numpy as np
import pytest
from conftest import ALPHABET, write_jsonl

import routelens as rl
from routelens.data.char_tokenizer import build_char_tokenizer
from routelens.errors import RouteLensError
from routelens.models import adapter_for
from routelens.models.tiny import build_tiny_model
from routelens.verify import verify_model

TOP_KS = [2, 1, 3]


@pytest.fixture(scope="module")
def lens(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hunyuan_per_layer_k")
    tokenizer = build_char_tokenizer(ALPHABET)
    build_tiny_model("hunyuan_v1_moe", seed=0, vocab_size=len(tokenizer), moe_topk=TOP_KS).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return rl.load(str(folder))


def test_each_layer_is_read_at_its_own_k_as_the_model_routes(lens):
    assert lens.top_ks == dict(enumerate(TOP_KS))
    assert lens.adapter.describe()["top_k_per_layer"] == dict(enumerate(TOP_KS))
    ids = lens.encode("Q:12+7=A:19")
    with lens.capture() as routes:
        lens.model(ids)
    for layer, k in enumerate(TOP_KS):
        assert routes[layer].experts.shape[-1] == k == lens.model.model.layers[layer].mlp.gate.top_k


def test_verify_checks_every_layer_at_its_k_and_skips_joint_routes_with_the_reason(lens):
    table = verify_model(lens.loaded)
    assert not (table["status"] == "fail").any(), table[table["status"] == "fail"].to_string()
    for layer in range(3):   # every single-layer check ran, engines included
        ran = set(table[(table["layer"] == layer) & (table["status"] == "pass")]["check"])
        assert {"force_other", "fast_vs_reference", "cache_vs_reference", "isolation_scorer"} <= ran
    joint = table[table["check"].str.startswith("joint_")]
    assert set(joint["status"]) == {"skipped"} and joint["detail"].str.contains("one k").all()


def test_force_takes_each_layers_k_and_refuses_another(lens):
    ids = lens.encode("Q:3+4=A:7")
    with lens.force(layer=2, positions=[(0, 2)], experts=[[0, 5, 7]]), lens.capture([2]) as routes:
        lens.model(ids)
    assert sorted(routes[2].experts[0, 2].tolist()) == [0, 5, 7]
    with pytest.raises(RouteLensError, match="3 expert ids"):
        with lens.force(layer=2, positions=[(0, 2)], experts=[[0, 5]]):
            pass


def test_the_counterfactual_samples_k_experts_per_layer_and_refuses_mixed_joint_routes(lens, tmp_path):
    trajectories = write_jsonl(tmp_path / "t.jsonl", [
        {"id": f"t{i}", "prompt": f"Q:{i}+1=", "completion": f"A:{i}+1={i + 1}#{i + 1}", "answer": str(i + 1)}
        for i in range(2)])
    result = rl.counterfactual(lens, trajectories, layers=[0, 1, 2], routes=3, null_routes=1, candidates=6,
                               show_progress=False)
    routes = result.table("routes")
    for layer, k in enumerate(TOP_KS):
        sizes = routes[routes["layer"] == layer]["experts"].map(len)
        assert len(sizes) and set(sizes) == {k}
    with pytest.raises(RouteLensError, match=r"one top-k .*2 at layer 0, 1 at layer 1"):
        rl.counterfactual(lens, trajectories, layers=[0, 1], joint_layers=[0, 1], routes=2, show_progress=False)


def test_isolation_and_semantic_routing_ask_for_layers_of_one_k(lens, tmp_path):
    items = write_jsonl(tmp_path / "items.jsonl", [{"id": f"i{i}", "domain": "ab"[i % 2], "prompt": f"Q:{i}+2=",
                                                    "target": str(i + 2)} for i in range(6)])
    isolated = rl.isolate(lens, items, layers=[0, 1, 2], floor_seeds=1, show_progress=False)
    assert set(isolated.table("isolation")["layer"].dropna()) == {0, 1, 2}   # natural rows have no layer
    forced = isolated.table("isolation").dropna(subset=["layer"])
    cells = isolated.table("cells")
    for layer, k in enumerate(TOP_KS):   # each layer's selection shares are of its own k slots: they sum to 1
        shares = cells[cells["layer"] == layer].groupby("domain")["selection_share"].sum()
        assert len(shares) == 2 and np.allclose(shares, 1.0), (layer, k, shares)
    assert len(forced)
    semantic = rl.semantic_route(lens, items, accuracy=False, floor_seeds=1, show_progress=False)
    assert "0+1+2" not in semantic.summary_dict["layer_sets"]   # the default sets: each layer alone, no mixed joint set
    with pytest.raises(RouteLensError, match="layer set 0\\+1"):
        rl.semantic_route(lens, items, layer_sets=[[0, 1]], accuracy=False, show_progress=False)


def test_different_expert_counts_per_layer_are_refused_in_one_line():
    model = build_tiny_model("hunyuan_v1_moe", seed=0)
    model.model.layers[1].mlp.gate.num_experts = 4   # a model whose layers hold 8, 4, 8 experts
    with pytest.raises(RouteLensError, match="8 at layer 0, 4 at layer 1, 8 at layer 2") as error:
        adapter_for(model)
    assert "\n" not in str(error.value)
