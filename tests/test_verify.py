"""`routelens verify` passes on every supported family (windowed configurations included),
exits 1 naming the failing check when one fails, and 2 on bad input."""

import json

import pytest
from conftest import FAMILIES

from routelens.cli import main
from routelens.models import LoadedModel, adapter_for
from routelens.models.families.softmax_topk import SoftmaxTopKAdapter
from routelens.models.tiny import build_tiny_model
from routelens.verify import verify_model

CHECKS = {"router_hook", "gating_rule", "force_standard", "force_other", "fast_vs_reference", "cache_vs_reference",
          "isolation_scorer", "joint_fast_vs_reference", "joint_cache_vs_reference"}


@pytest.mark.parametrize("family", FAMILIES)
def test_verify_passes_on_every_family(tiny_adapters, family):
    adapter = tiny_adapters[family]
    table = verify_model(LoadedModel(adapter, None, f"tiny:{family}", "cpu", "float32"), length=20)
    assert set(table["check"]) == CHECKS
    assert set(table["layer"]) == set(adapter.moe_layers)
    assert (table.groupby("layer")["check"].count() >= 5).all()
    engine_layers = len({adapter.moe_layers[0], adapter.moe_layers[-1], adapter.moe_layers[len(adapter.moe_layers) // 2]})
    assert (table["check"] == "fast_vs_reference").sum() == (table["check"] == "cache_vs_reference").sum() == engine_layers
    assert (table["check"] == "joint_fast_vs_reference").sum() == (table["check"] == "joint_cache_vs_reference").sum() == 1
    skipped = table[table["status"] == "skipped"]
    assert (table["status"] != "fail").all(), table[table["status"] == "fail"].to_string()
    # only an engine the adapter declares unusable on its family is skipped, with the reason
    assert set(skipped["check"]) <= {"cache_vs_reference", "joint_cache_vs_reference"}
    assert skipped.empty or (adapter.cache_engine_defect and skipped["detail"].str.contains("not used").all())


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "qwen3_moe"])
def test_verify_passes_in_bf16_with_the_tolerance_measured_against_a_float32_shadow(family):
    import torch

    adapter = adapter_for(build_tiny_model(family, seed=0).to(torch.bfloat16))
    table = verify_model(LoadedModel(adapter, None, f"tiny:{family}", "cpu", "bfloat16"), length=20)
    assert (table["status"] != "fail").all(), table[table["status"] == "fail"].to_string()
    noise = table.attrs["dtype_noise"]
    assert noise["dtype"] == "bfloat16" and noise["method"] == "float32 shadow"
    assert noise["tolerance"] == max(0.02, 4 * noise["noise_max"]) < 0.5   # the fixed bf16 tolerance was 0.5


@pytest.mark.parametrize("family, overrides", [
    ("qwen2_moe", dict(use_sliding_window=True, sliding_window=4, max_window_layers=4)),
    ("phimoe", dict(sliding_window=4)),
])
def test_verify_passes_with_mask_only_windows(family, overrides):
    adapter = adapter_for(build_tiny_model(family, seed=0, **overrides))
    table = verify_model(LoadedModel(adapter, None, f"tiny:{family}", "cpu", "float32"), length=16)
    skipped = table[table["status"] == "skipped"]
    assert (table["status"] != "fail").all(), table[table["status"] == "fail"].to_string()
    # only an engine the adapter declares unusable on its family is skipped, with the reason
    assert set(skipped["check"]) <= {"cache_vs_reference", "joint_cache_vs_reference"}
    assert skipped.empty or (adapter.cache_engine_defect and skipped["detail"].str.contains("not used").all())


def test_verify_cli_exit_codes_and_json(tmp_path, capsys, monkeypatch):
    out = tmp_path / "verify.json"
    assert main(["verify", "--model", "demo", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "all 28 checks passed on 4 MoE layers" in printed
    stored = json.loads(out.read_text())
    assert stored["passed"] is True and len(stored["checks"]) == 28
    assert {row["check"] for row in stored["checks"]} == CHECKS
    noise = stored["dtype_noise"]   # the engine checks' tolerance, measured on the model
    assert noise["method"] == "float64 shadow" and noise["tolerance"] == max(1e-4, 4 * noise["noise_max"])
    assert f"dtype noise: float32 vs a float64 shadow over this sequence's {noise['tokens']} tokens" in printed
    assert {row["tolerance"] for row in stored["checks"] if row["check"] == "fast_vs_reference"} == {noise["tolerance"]}

    # a gating rule that no longer describes the model: the check fails, named, exit 1
    original = SoftmaxTopKAdapter.weights_for
    monkeypatch.setattr(SoftmaxTopKAdapter, "weights_for", lambda self, logits, experts: original(self, logits, experts) * 0.9)
    assert main(["verify", "--model", "tiny:olmoe", "--json", str(out), "--overwrite"]) == 1   # its own earlier file
    captured = capsys.readouterr()
    assert "gating_rule (layer 0)" in captured.err and "FAIL" in captured.out
    assert json.loads(out.read_text())["passed"] is False
    monkeypatch.undo()

    assert main(["verify", "--model", "./no/such/model"]) == 2
    assert capsys.readouterr().err.strip() == (
        "routelens: error: --model ./no/such/model: no such folder (a local model is a folder written by save_pretrained)")
    assert main(["verify", "--model", "tiny:olmoe", "--json", str(tmp_path)]) == 2


def test_verify_with_only_k_experts_runs_every_check_that_needs_no_other_route():
    """k == E (Hugging Face's own glm4_moe, dots1 and jamba tester configs): the checks of
    another route are skipped with the reason; the router, gating, forcing and isolation
    checks still run and pass."""
    model = build_tiny_model("olmoe", seed=0, num_experts=2, num_experts_per_tok=2)
    table = verify_model(LoadedModel(adapter_for(model), None, "tiny:olmoe", "cpu", "float32"), length=16)
    assert (table["status"] != "fail").all(), table.to_string()
    skipped = table[table["status"] == "skipped"]
    assert set(skipped["check"]) == {"force_other", "fast_vs_reference", "cache_vs_reference",
                                     "joint_fast_vs_reference", "joint_cache_vs_reference"}
    assert skipped["detail"].str.contains("only k experts").all()
    ran = table[table["status"] == "pass"]
    assert set(ran["check"]) == {"router_hook", "gating_rule", "force_standard", "isolation_scorer"}
    assert len(ran) == 4 * 3
