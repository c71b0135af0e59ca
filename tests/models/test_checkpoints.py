"""The checkpoints users hold: device maps (disk offload included), expert kernels,
MXFP4-quantized GPT-OSS, and routers a block bypasses."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file, save_file

from routelens.analyses.counterfactual.analysis import CounterfactualConfig, build_routes
from routelens.cli import main
from routelens.data.trajectories import Trajectory
from routelens.engine import FastEngine, ScoreItem
from routelens.engine.whole_sequence import WholeSequenceScorer
from routelens.errors import RouterBypassed
from routelens.models.loading import load_model
from routelens.models.routing import capture_routes
from routelens.models.tiny import build_tiny_model
from routelens.verify import verify_model

DISK_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
            "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


def _scores(adapter, layer, ids):
    trajectory = Trajectory("t", ids, completion_start=3)
    routes = build_routes(adapter, trajectory, [layer], CounterfactualConfig(routes=4, seed=0))[layer]
    item = ScoreItem(torch.tensor(ids), routes.positions, torch.as_tensor(routes.experts), routes.weights)
    engine = FastEngine(adapter)
    scored = engine.score_batch(layer, [item])[0]
    assert engine.fallback_reason is None
    scorer = WholeSequenceScorer(adapter)
    natural = scorer.natural(torch.tensor(ids), [layer], np.arange(3, len(ids) - 1))
    forced = scorer.score(natural, layer, natural.routes[layer].experts[None].cpu() * 0 + 1,
                          torch.ones(1, len(ids), adapter.top_k) / adapter.top_k)
    return scored, forced


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2-moe")
    build_tiny_model("qwen2_moe", seed=0).save_pretrained(folder)
    return str(folder)


def test_device_map_with_disk_offload_gives_the_same_numbers(qwen_folder):
    plain = load_model(qwen_folder, device="cpu")
    mapped = load_model(qwen_folder, device="cpu", device_map=json.dumps(DISK_MAP))
    assert mapped.device == "device_map"
    offloaded = dict(mapped.adapter.model.named_parameters())["model.layers.3.mlp.gate.weight"]
    assert offloaded.device.type == "meta"      # really on disk until its layer runs
    ids = list(range(3, 17))
    for layer in (0, 3):                        # 3: the MoE layer itself offloaded
        for a, b in zip(_scores(plain.adapter, layer, ids), _scores(mapped.adapter, layer, ids)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    table = verify_model(mapped, length=12)
    assert (table["status"] == "pass").all(), table[table["status"] != "pass"].to_string()


def test_device_map_through_the_command_line(qwen_folder, tmp_path, capsys):
    ids = write_jsonl(tmp_path / "ids.jsonl", [{"id": f"t{i}", "input_ids": list(range(3 + i, 15 + i)),
                                                "completion_start": 4} for i in range(3)])
    common = ["counterfactual", "--model", qwen_folder, "--trajectories", ids, "--layers", "0,-1", "--routes", "4",
              "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "plain")]) == 0
    assert main(common + ["--out", str(tmp_path / "mapped"), "--device-map", json.dumps(DISK_MAP)]) == 0
    assert main(common + ["--out", str(tmp_path / "auto"), "--device-map", "auto"]) == 0
    plain = pd.read_parquet(tmp_path / "plain" / "routes.parquet")
    for other in ("mapped", "auto"):
        np.testing.assert_allclose(pd.read_parquet(tmp_path / other / "routes.parquet")["logprob"], plain["logprob"],
                                   atol=1e-6, rtol=0)
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "x"), "--device-map", "{oops"]) == 2
    assert "--device-map '{oops' is neither auto" in capsys.readouterr().err
    assert main(common + ["--out", str(tmp_path / "x"), "--device-map", '{"model": "cuda:7"}']) == 2
    assert "no cuda device is available" in capsys.readouterr().err


def test_results_do_not_depend_on_the_experts_implementation(tmp_path):
    folder = tmp_path / "olmoe"
    build_tiny_model("olmoe", seed=0).save_pretrained(folder)
    ids = list(range(5, 19))
    results = {}
    for implementation in ("eager", "grouped_mm", "batched_mm"):
        loaded = load_model(str(folder), device="cpu", experts_implementation=implementation)
        assert loaded.adapter.describe()["experts_implementation"] == implementation
        results[implementation] = [_scores(loaded.adapter, layer, ids) for layer in (0, 2)]
    for implementation in ("grouped_mm", "batched_mm"):
        for (fast_a, forced_a), (fast_b, forced_b) in zip(results["eager"], results[implementation]):
            np.testing.assert_allclose(fast_a, fast_b, atol=1e-5, rtol=0)
            np.testing.assert_allclose(forced_a, forced_b, atol=1e-5, rtol=0)


def test_grouped_mm_stride_error_is_one_line_naming_the_option(tmp_path, capsys):
    folder = tmp_path / "odd-width"
    build_tiny_model("olmoe", seed=0, intermediate_size=30).save_pretrained(folder)   # 120-byte rows
    assert main(["inspect", "--model", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "strides should be multiple of 16 bytes" in err
    assert "--experts-implementation eager" in err
    assert main(["inspect", "--model", str(folder), "--experts-implementation", "eager"]) == 0


def _mxfp4_checkpoint(folder):
    """A tiny GPT-OSS saved as MXFP4 checkpoints are: experts as packed fp4 blocks and scales."""
    build_tiny_model("gpt_oss", seed=0, intermediate_size=32).save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    packed = {}
    for name in list(state):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, inputs, outputs = state.pop(name).shape
            state[name + "_blocks"] = torch.randint(0, 256, (experts, outputs, inputs // 32, 16), generator=generator,
                                                    dtype=torch.uint8)
            state[name + "_scales"] = torch.randint(122, 128, (experts, outputs, inputs // 32), generator=generator,
                                                    dtype=torch.uint8)
            packed[name] = (state[name + "_blocks"], state[name + "_scales"])
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))
    return packed


def test_mxfp4_gpt_oss_loads_dequantized_with_observable_routers(tmp_path, capsys):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    folder = tmp_path / "gpt-oss-mxfp4"
    packed = _mxfp4_checkpoint(folder)
    loaded = load_model(str(folder), device="cpu", dtype="float32")
    assert "MXFP4-quantized; loading it dequantized" in capsys.readouterr().err
    parameters = dict(loaded.adapter.model.named_parameters())
    for name, (blocks, scales) in packed.items():     # transformers' own dequantisation, as the model holds it
        expected = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        torch.testing.assert_close(parameters[name], expected, rtol=0, atol=0)
    table = verify_model(loaded, length=12)
    assert (table["status"] == "pass").all(), table[table["status"] != "pass"].to_string()


def test_a_bypassed_router_is_a_one_line_error_naming_the_module(tmp_path, capsys, monkeypatch):
    """As the quantized MXFP4 MLP does: router logits computed inline, router module never called."""
    from transformers.models.olmoe import modeling_olmoe

    def inline_forward(self, hidden_states):
        batch, length, hidden = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden)
        logits = torch.nn.functional.linear(flat, self.gate.weight)
        weights, experts = torch.topk(torch.softmax(logits, -1), self.gate.top_k, dim=-1)
        return self.experts(flat, experts, weights.to(flat.dtype)).reshape(batch, length, hidden)

    monkeypatch.setattr(modeling_olmoe.OlmoeSparseMoeBlock, "forward", inline_forward)
    model = build_tiny_model("olmoe", seed=0)
    from routelens.models import adapter_for

    adapter = adapter_for(model)
    with pytest.raises(RouterBypassed, match=r"the router model.layers.0.mlp.gate \(OlmoeTopKRouter\) never ran"):
        with capture_routes(adapter):
            model(torch.tensor([[3, 4, 5]]))
    ids = write_jsonl(tmp_path / "ids.jsonl", [{"id": "a", "input_ids": list(range(3, 12)), "completion_start": 3}])
    code = main(["counterfactual", "--model", "tiny:olmoe", "--trajectories", ids, "--layers", "0", "--routes", "2",
                 "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "never ran in the forward" in err and "KeyError" not in err
