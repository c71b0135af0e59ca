"""`load(..., upcast_router=True)` / `--upcast-router` (issue 34): every router of a bf16 model
computes its logits in float32 while the rest of the model keeps its dtype; recorded in the
run's config; off, nothing changes."""

import json
import subprocess

import pytest
import torch
import torch.nn.functional as F
from conftest import PYTHON, write_jsonl

import routelens as rl
from routelens.cli import build_parser
from routelens.data.trajectories import Trajectory
from routelens.distributed import UnitJob
from routelens.engine.checks import check_gating_rule
from routelens.errors import SettingError
from routelens.models.loading import load_model
from routelens.models.router_delta import router_parameter_names, save_router_delta
from routelens.models.routing import capture_routes
from routelens.models.tiny import build_tiny_model

# softmax top-k (qwen3_moe, olmoe, mixtral: fp32 weights), group-limited sigmoid with a choice
# bias and a router that is fp32 already (deepseek_v3), top-k then softmax with a router bias
# (gpt_oss), a bias the block passes to its router (minimax_m2), logits cast to fp32 after a
# bf16 matmul (granitemoe)
FAMILIES = ["qwen3_moe", "olmoe", "mixtral", "deepseek_v3", "gpt_oss", "minimax_m2", "granitemoe"]


def _ids(adapter, batch=2, length=24, seed=1):
    return torch.randint(0, adapter.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def _forward(adapter, ids):
    """The model's logits, each router's output and each router's input as its block passed it."""
    inputs = {}
    handles = [router.register_forward_pre_hook(lambda m, args, layer=layer: inputs.__setitem__(layer, args[0].detach()),
                                                prepend=True)   # before the upcast hook: what the block passes
               for layer, router in adapter.routers.items()]
    try:
        with capture_routes(adapter) as routes, torch.no_grad():
            logits = adapter.model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, routes, inputs


def _plain_logits(router, x):
    """fp32 router logits by plain code: the router's linear map (weight, and bias where it has one)."""
    bias = getattr(router, "bias", None)
    return F.linear(x.reshape(-1, x.shape[-1]).float(), router.weight.float(), None if bias is None else bias.float())


@pytest.mark.parametrize("family", FAMILIES)
def test_routers_compute_in_float32_and_the_rest_stays_bf16(family):
    off = rl.load(f"tiny:{family}", device="cpu", dtype="bfloat16").adapter
    on = rl.load(f"tiny:{family}", device="cpu", dtype="bfloat16", upcast_router=True).adapter
    assert on.upcast_router and not off.upcast_router
    ids = _ids(on)
    logits_off, routes_off, _ = _forward(off, ids)
    logits, routes, inputs = _forward(on, ids)
    assert logits.dtype == torch.bfloat16 == logits_off.dtype
    router_names = {f"{on.module_name(router)}." for router in on.routers.values()}
    for name, tensor in [*on.model.named_parameters(), *on.model.named_buffers()]:
        if tensor.is_floating_point() and not any(name.startswith(prefix) for prefix in router_names):
            assert tensor.dtype == torch.bfloat16, name   # only the routers were cast
    bf16_model = build_tiny_model(family, seed=0).to(torch.bfloat16)
    for layer, router in on.routers.items():
        # the router's parameters: float32, holding the bf16 checkpoint's values exactly
        reference = dict(bf16_model.named_parameters())
        for name, parameter in router_parameter_names(on, layer).items():
            assert parameter.dtype == torch.float32
            assert torch.equal(parameter.detach(), reference[name].detach().float()), name
        assert inputs[layer].dtype == torch.bfloat16     # the residual stream the block passes stays bf16
        route = routes[layer]
        expected = _plain_logits(router, inputs[layer])
        assert route.logits.dtype == torch.float32
        torch.testing.assert_close(route.logits.reshape(expected.shape), expected, rtol=1e-6, atol=1e-6)
        # the experts chosen: the top-k of the fp32 logits by the family's own selection
        chosen = on.selection_scores(expected, layer).topk(on.top_k, dim=-1).indices
        assert torch.equal(route.experts.sort(-1).values, chosen.sort(-1).values)
        # the weights: in the dtype the family's router returns them (its block expects it), by the gating rule
        assert route.weights.dtype == routes_off[layer].weights.dtype
        check_gating_rule(on, layer, route.logits, route.experts, route.weights)
        torch.testing.assert_close(route.weights.float(), on.weights_for(expected, route.experts).to(route.weights.dtype).float(),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_off_changes_nothing(family):
    plain = build_tiny_model(family, seed=0).to(torch.bfloat16).eval()
    loaded = load_model(f"tiny:{family}", device="cpu", dtype="bfloat16")
    ids = _ids(loaded.adapter)
    with torch.no_grad():
        assert torch.equal(loaded.adapter.model(ids).logits, plain(ids).logits)
    for router in loaded.adapter.routers.values():
        assert not router._forward_pre_hooks and not router._forward_hooks
        assert all(p.dtype == torch.bfloat16 for p in router.parameters())
    # no key when off: a run folder written before the option existed still resumes
    assert loaded.identity() == {"model": f"tiny:{family}", "router_delta": None}
    assert loaded.recipe["upcast_router"] is False


def test_deepseek_v3_router_computes_the_same_as_before():
    """A router that computes in fp32 already gives the same routes and the same model output."""
    off = load_model("tiny:deepseek_v3", device="cpu", dtype="bfloat16").adapter
    on = load_model("tiny:deepseek_v3", device="cpu", dtype="bfloat16", upcast_router=True).adapter
    ids = _ids(on)
    logits_off, routes_off, _ = _forward(off, ids)
    logits_on, routes_on, _ = _forward(on, ids)
    assert torch.equal(logits_on, logits_off)
    for layer in on.moe_layers:
        for field in ("logits", "weights", "experts"):
            assert torch.equal(getattr(routes_on[layer], field), getattr(routes_off[layer], field))


def test_float32_model_is_a_recorded_no_op():
    off = load_model("tiny:olmoe", device="cpu", dtype="float32")
    on = load_model("tiny:olmoe", device="cpu", dtype="float32", upcast_router=True)
    assert on.identity()["upcast_router"] is True
    assert not on.adapter.upcast_router
    assert all(not router._forward_hooks for router in on.adapter.routers.values())
    ids = _ids(on.adapter)
    with torch.no_grad():
        assert torch.equal(on.adapter.model(ids).logits, off.adapter.model(ids).logits)


def test_verify_passes_with_the_option_on_the_command_line(cli_env):
    result = subprocess.run([PYTHON, "-m", "routelens", "verify", "--model", "tiny:qwen3_moe", "--dtype", "bfloat16",
                             "--device", "cpu", "--upcast-router", "--length", "16"],
                            env=cli_env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_lens_force_and_capture_see_float32_logits():
    lens = rl.load("tiny:olmoe", device="cpu", dtype="bfloat16", upcast_router=True)
    assert lens.describe()["upcast_router"] is True
    ids = _ids(lens.adapter, batch=1, length=8)
    with lens.force(layer=-1, positions=[(0, 3)], experts=[[0, 1]]), lens.capture([-1]) as routes:
        logits = lens.model(ids).logits
    assert routes[-1].logits.dtype == torch.float32 and logits.dtype == torch.bfloat16
    assert sorted(routes[-1].experts[0, 3].tolist()) == [0, 1]
    assert routes[-1].weights.dtype == torch.bfloat16


def test_counterfactual_run_records_it_and_resume_refuses_the_other_setting(tmp_path):
    trajectories = [Trajectory(f"t{i}", list(range(3 + i, 17 + i)), completion_start=4) for i in range(2)]
    options = dict(layers=[-1], routes=4, seed=0, show_progress=False)
    on = rl.load("tiny:qwen3_moe", device="cpu", dtype="bfloat16", upcast_router=True)
    out = tmp_path / "on"
    rl.counterfactual(on, trajectories, str(out), **options)
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["upcast_router"] is True and config["dtype"] == "bfloat16"
    rl.counterfactual(on, trajectories, str(out), **options)   # the same setting resumes
    off = rl.load("tiny:qwen3_moe", device="cpu", dtype="bfloat16")
    with pytest.raises(SettingError, match="upcast_router"):
        rl.counterfactual(off, trajectories, str(out), **options)
    rl.counterfactual(off, trajectories, str(tmp_path / "off"), **options)
    assert "upcast_router" not in json.loads((tmp_path / "off" / "run.json").read_text())["config"]


def test_counterfactual_command_records_it(tmp_path):
    from routelens.cli import main

    ids = write_jsonl(tmp_path / "ids.jsonl", [{"id": "t0", "input_ids": list(range(3, 17)), "completion_start": 4}])
    out = tmp_path / "run"
    assert main(["counterfactual", "--model", "tiny:olmoe", "--dtype", "bfloat16", "--device", "cpu", "--upcast-router",
                 "--trajectories", ids, "--layers", "-1", "--routes", "4", "--no-progress", "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["config"]["upcast_router"] is True


def test_ray_actors_load_it_from_the_recipe():
    driver = load_model("tiny:olmoe", device="cpu", dtype="bfloat16", weights=False, upcast_router=True)
    assert driver.identity()["upcast_router"] is True and driver.recipe["upcast_router"] is True
    job = UnitJob()
    job.recipe = driver.recipe
    actor = job.load(None)   # what an actor does
    assert actor.adapter.upcast_router and actor.identity() == driver.identity()
    with capture_routes(actor.adapter) as routes, torch.no_grad():
        actor.adapter.model(_ids(actor.adapter))
    assert all(route.logits.dtype == torch.float32 for route in routes.values())


def test_a_bf16_router_delta_applies_exactly_to_float32_routers(tmp_path):
    """The routers are upcast before a delta is applied: its base is checked at the coarser dtype."""
    loaded = load_model("tiny:olmoe", device="cpu", dtype="bfloat16")
    adapter, layer = loaded.adapter, loaded.adapter.moe_layers[-1]
    parameters = router_parameter_names(adapter, layer)
    base = {name: p.detach().clone() for name, p in parameters.items()}
    with torch.no_grad():
        for parameter in parameters.values():
            parameter.add_(0.125)
    path = str(tmp_path / "router_delta.safetensors")
    save_router_delta(path, adapter, layer, base, "tiny:olmoe")
    updated = load_model("tiny:olmoe", device="cpu", dtype="bfloat16", router_delta=path, upcast_router=True)
    for name, parameter in router_parameter_names(updated.adapter, layer).items():
        assert parameter.dtype == torch.float32
        assert torch.equal(parameter.detach(), parameters[name].detach().float())
    assert updated.identity()["upcast_router"] is True and updated.identity()["router_delta"]["path"] == path


@pytest.mark.quick
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_bad_value_is_a_one_line_setting_error(value):
    with pytest.raises(SettingError, match="upcast_router") as caught:
        rl.load("tiny:olmoe", upcast_router=value)
    assert "\n" not in str(caught.value)


@pytest.mark.quick
def test_the_flag_is_a_model_option_of_the_commands_that_load_a_model():
    parser = build_parser()
    assert parser.parse_args(["verify", "--model", "tiny:olmoe", "--upcast-router"]).upcast_router is True
    assert parser.parse_args(["verify", "--model", "tiny:olmoe"]).upcast_router is False
    assert parser.parse_args(["counterfactual", "--trajectories", "x.jsonl", "--layers", "-1", "--out", "x",
                              "--upcast-router"]).upcast_router is True
