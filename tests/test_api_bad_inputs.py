"""The catalogue of bad input to the Python API (issue 28): every entry point of
`import routelens as rl` checks its arguments before any model loads or anything is written,
and answers a bad one with a one-line `RouteLensError` (a `SettingError` naming the
argument where the argument is Python's) that says what is expected; never an
AttributeError, TypeError, IndexError or KeyError from deep inside, never silence.

`API_CASES` holds the inputs that were mishandled before (each failed this test then);
`KEPT_CASES` the bad inputs that were already answered well, kept so that they stay so.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import write_jsonl

import routelens as rl

pytestmark = pytest.mark.quick

SettingError, RouteLensError = rl.SettingError, rl.RouteLensError
ROUTE = [[0, 1, 2, 3]]   # a good route of the demo model (top-4 of 16 experts)


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """What the cases use (built once): the demo model, a tiny model with a dense layer,
    good trajectories and items, and a folder of the user's files that no case may touch."""
    root = tmp_path_factory.mktemp("api-bad")
    lens = rl.load("demo")
    trajs = rl.trajectories_from_text(lens.tokenizer, [("Q:3+4=A:", "3+4=7#7")], answers=["7"])
    ns = SimpleNamespace(root=root, lens=lens, trajs=trajs, ids=lens.encode("Q:1+1=A:"),
                         dense=rl.load("tiny:qwen2_moe"))   # decoder layer 1 of tiny:qwen2_moe is dense
    ns.traj_file = write_jsonl(root / "traj.jsonl", [{"id": t.id, "input_ids": t.input_ids,
                                                      "completion_start": t.completion_start} for t in trajs])
    ns.notes = root / "notes.txt"
    ns.notes.write_text("the user's own file")
    ns.run = rl.counterfactual(lens, trajs, str(root / "cf-run"), layers=[-1], routes=2, show_progress=False)
    # the demo's routes of the trajectories (every MoE layer, top-4 of 16), as an .npz and as EngineRoutes
    ns.routes = rl.EngineRoutes({t.id: np.tile(np.arange(4), (len(t.input_ids), 4, 1)) for t in trajs},
                                lens.moe_layers, 4, "test")
    ns.routes_file = str(root / "routes.npz")
    np.savez(ns.routes_file, **ns.routes.experts)
    ns.mine_npz = root / "mine.npz"
    ns.mine_npz.write_bytes(b"the user's own .npz")
    return ns


# ---------------------------------------------------------------------------- helpers
def _capture(w, layers=None, ids=None, lens=None):
    lens = lens or w.lens
    with torch.no_grad(), lens.capture(layers=layers):
        lens.model(w.ids if ids is None else ids)


def _force(w, layer=-1, positions=None, experts=ROUTE, weights=None, lens=None):
    lens = lens or w.lens
    with torch.no_grad(), lens.force(layer, [(0, 1)] if positions is None else positions, experts, weights):
        lens.model(w.ids)


def _captured_routes(w, key):
    with torch.no_grad(), w.lens.capture(layers=[-1]) as routes:
        w.lens.model(w.ids)
    return routes[key]


def _graft(w, experts="3:5=3:9", **kwargs):
    kwargs = {"recipient": "demo", "donor": "demo", "out": w.out, **kwargs}
    return rl.graft(kwargs.pop("recipient"), kwargs.pop("donor"), experts, kwargs.pop("out"), **kwargs)


def _sample(w, **kwargs):
    return rl.sample_trajectories(w.lens, **{"n": 1, "samples_per_problem": 1, "max_new_tokens": 2, **kwargs})


def _cf(w, trajectories=None, **kwargs):
    return rl.counterfactual(w.lens, w.trajs if trajectories is None else trajectories,
                             **{"layers": [-1], "routes": 2, "show_progress": False, **kwargs})


def _iso(w, items="arithmetic", **kwargs):
    return rl.isolate(w.lens, items, **{"per_domain": 1, "layers": [-1], "floor_seeds": 1, "show_progress": False,
                                        **kwargs})


def _semantic(w, items="arithmetic", **kwargs):
    return rl.semantic_route(w.lens, items, **{"per_domain": 2, "layer_sets": [[3]], "floor_seeds": 1,
                                               "accuracy": False, "show_progress": False, **kwargs})


def _passk(w, problems="arithmetic", **kwargs):
    return rl.passk(w.lens, problems, **{"n": 1, "samples": 1, "k": [1], "max_new_tokens": 2, "show_progress": False,
                                        **kwargs})


def _replay(w, routes="file", **kwargs):
    routes = w.routes_file if routes == "file" else w.routes if routes == "object" else routes
    return rl.replay(w.lens, kwargs.pop("trajectories", w.trajs), routes, **{"show_progress": False, **kwargs})


def _no_run(w):
    return str(w.root / "no-such-run")


S, R = SettingError, RouteLensError
API_CASES = {
    # ---- rl.load / rl.wrap: the model spec and the loading options
    "load_int": (lambda w: rl.load(123), S, "`model` must name a model"),
    "load_none": (lambda w: rl.load(None), S, "`model` must name a model"),
    "load_empty_string": (lambda w: rl.load(""), S, "got an empty string"),
    "load_list": (lambda w: rl.load(["demo"]), S, "`model` must name a model"),
    "load_device_int": (lambda w: rl.load("tiny:olmoe", device=0), S, "`device` must be a string"),
    "load_device_map_list": (lambda w: rl.load("tiny:olmoe", device_map=["cpu"]), S, "`device_map` must be auto"),
    "load_router_delta_int": (lambda w: rl.load("tiny:olmoe", router_delta=3), S, "`router_delta` must be a path"),
    "load_weights_not_bool": (lambda w: rl.load("tiny:olmoe", weights="no"), S, "`weights` must be True or False"),
    "load_trust_remote_code_not_bool": (lambda w: rl.load("tiny:olmoe", trust_remote_code="yes"), S,
                                        "`trust_remote_code` must be True or False"),
    "wrap_name_not_a_string": (lambda w: rl.wrap(w.lens.model, name=3), S, "`name` must be a non-empty string"),
    "encode_not_text": (lambda w: w.lens.encode(123), S, "`text` must be a string"),
    # ---- Lens.capture: layers
    "capture_layers_an_int": (lambda w: _capture(w, layers=3), S, "`layers` must be a list of layer indices"),
    "capture_layers_a_string": (lambda w: _capture(w, layers="0"), S, "`layers` must be a list of layer indices"),
    "capture_layer_ids_strings": (lambda w: _capture(w, layers=["0"]), S, "got ['0']"),
    "capture_layer_ids_floats": (lambda w: _capture(w, layers=[0.0]), S, "got [0.0]"),
    "capture_layer_ids_bools": (lambda w: _capture(w, layers=[True]), S, "got [True]"),
    "capture_layers_empty": (lambda w: _capture(w, layers=[]), S, "got []"),
    "capture_layer_twice": (lambda w: _capture(w, layers=[0, 0]), S, "names layer 0 twice"),
    "capture_layer_twice_counted_from_the_end": (lambda w: _capture(w, layers=[0, -4]), S, "[0, -4] names layer 0 twice"),
    # ---- Lens.capture: the input ids of the forward inside the block
    "capture_float_input_ids": (lambda w: _capture(w, ids=w.ids.float()), S, "must hold integer token ids"),
    "capture_input_ids_beyond_vocabulary": (lambda w: _capture(w, ids=torch.tensor([[1, 5000]])), S,
                                            "token id 5000 is outside 0..31"),
    "capture_negative_input_ids": (lambda w: _capture(w, ids=torch.tensor([[1, -3]])), S, "token id -3 is outside"),
    "capture_empty_input": (lambda w: _capture(w, ids=torch.zeros((1, 0), dtype=torch.long)), S, "`input_ids` is empty"),
    "capture_input_a_list": (lambda w: _capture(w, ids=[[1, 2, 3]]), S, "`input_ids` must be a tensor"),
    "captured_routes_layer_a_string": (lambda w: _captured_routes(w, "last"), S, "`layer` must be one layer index"),
    # ---- Lens.force: the layer, the positions, the experts, the weights
    "force_layer_a_string": (lambda w: _force(w, layer="-1"), S, "`layer` must be one layer index"),
    "force_layer_a_list": (lambda w: _force(w, layer=[-1]), S, "`layer` must be one layer index"),
    "force_float_expert_ids": (lambda w: _force(w, experts=[[0.5, 1, 2, 3]]), S, "holds float 0.5"),
    "force_string_expert_ids": (lambda w: _force(w, experts=[["a", "b", "c", "d"]]), S, "holds str 'a'"),
    "force_bool_expert_id": (lambda w: _force(w, experts=[[True, 0, 2, 3]]), S, "holds bool True"),
    "force_float_tensor_of_experts": (lambda w: _force(w, experts=torch.tensor([[0.0, 1.0, 2.0, 3.0]])), S,
                                      "must hold expert ids (integers)"),
    "force_ragged_experts": (lambda w: _force(w, positions=[(0, 1), (0, 2)], experts=[[0, 1, 2, 3], [0, 1]]), S,
                             "got [4, 2] expert(s) for 2 position(s)"),
    "force_nan_weight": (lambda w: _force(w, weights=[[math.nan, 0.0, 0.0, 1.0]]), S, "weights must be finite numbers >= 0"),
    "force_infinite_weight": (lambda w: _force(w, weights=[[math.inf, 0.0, 0.0, 0.0]]), S, "finite numbers >= 0"),
    "force_negative_weight": (lambda w: _force(w, weights=[[-1.0, 1.0, 0.0, 1.0]]), S, "finite numbers >= 0"),
    "force_weights_not_numbers": (lambda w: _force(w, weights=[[1.0, 0.0, 0.0, "x"]]), S, "finite numbers >= 0"),
    "force_negative_position": (lambda w: _force(w, positions=[(0, -1)]), S, "count from 0"),
    "force_float_position": (lambda w: _force(w, positions=[(0, 1.5)]), S, "(0, 1.5) is not a pair of integers"),
    "force_position_not_a_pair": (lambda w: _force(w, positions=[1]), S, "1 is not a pair of integers"),
    "force_position_of_three": (lambda w: _force(w, positions=[(0, 1, 2)]), S, "(0, 1, 2) is not a pair"),
    "force_position_twice": (lambda w: _force(w, positions=[(0, 1), (0, 1)], experts=ROUTE * 2), S,
                             "names (0, 1) twice"),
    "force_no_position": (lambda w: _force(w, positions=[], experts=[]), S, "`positions` must be a non-empty list"),
    # ---- rl.graft: the experts map and the other arguments, before any model loads
    "graft_experts_an_int": (lambda w: _graft(w, experts=3), S, "`experts` must be \"L:e=L2:e2,...\""),
    "graft_experts_a_dict": (lambda w: _graft(w, experts={"3:5": "3:9"}), S, "`experts` must be"),
    "graft_experts_empty": (lambda w: _graft(w, experts=[]), S, "`experts` must be"),
    "graft_experts_pairs_too_short": (lambda w: _graft(w, experts=[(3, 5)]), S, "(layer, expert, donor_layer, donor_expert)"),
    "graft_experts_float_ids": (lambda w: _graft(w, experts=[(3, 5.5, 3, 9)]), S, "`experts` must be"),
    "graft_experts_string_ids": (lambda w: _graft(w, experts=[("3", "5", "3", "9")]), S, "`experts` must be"),
    "graft_negative_expert": (lambda w: _graft(w, experts=[(3, -1, 3, 9)]), S, "expert ids count from 0"),
    "graft_out_an_int": (lambda w: _graft(w, out=5), S, "`out` must be a path"),
    "graft_recipient_an_int": (lambda w: _graft(w, recipient=3), S, "`recipient` must name a model"),
    "graft_donor_none": (lambda w: _graft(w, donor=None), S, "`donor` must name a model"),
    "graft_ray_without_evaluate": (lambda w: _graft(w, ray="local"), S, "give it with `evaluate`=True"),
    "graft_evaluate_not_bool": (lambda w: _graft(w, evaluate="yes"), S, "`evaluate` must be True or False"),
    "graft_items_an_int": (lambda w: _graft(w, evaluate=True, items=3), S, "`items` must be \"arithmetic\""),
    "graft_device_an_int": (lambda w: _graft(w, device=0), S, "`device` must be a string"),
    "graft_seed_negative": (lambda w: _graft(w, evaluate=True, seed=-1), S, "`seed` must be an integer in 0..4294967295"),
    # ---- rl.sample_trajectories
    "sample_no_problems": (lambda w: _sample(w, n=0), S, "`n` must be an integer >= 1, got 0"),
    "sample_negative_problems": (lambda w: _sample(w, n=-1), S, "`n` must be an integer >= 1, got -1"),
    "sample_nan_temperature": (lambda w: _sample(w, temperature=math.nan), S, "`temperature` must be a finite number > 0"),
    "sample_negative_temperature": (lambda w: _sample(w, temperature=-0.5), S, "`temperature` must be a finite number > 0"),
    "sample_zero_temperature": (lambda w: _sample(w, temperature=0), S, "`temperature` must be a finite number > 0"),
    "sample_zero_max_new_tokens": (lambda w: _sample(w, max_new_tokens=0), S, "`max_new_tokens` must be an integer >= 1"),
    "sample_negative_max_new_tokens": (lambda w: _sample(w, max_new_tokens=-1), S, "`max_new_tokens` must be"),
    "sample_negative_seed": (lambda w: _sample(w, seed=-1), S, "`seed` must be an integer in 0..4294967295 (2**32 - 1), got -1"),
    "sample_seed_beyond_64_bits": (lambda w: _sample(w, seed=2**64), S, "`seed` must be an integer in 0..4294967295"),
    "sample_float_seed": (lambda w: _sample(w, seed=1.5), S, "`seed` must be an integer"),
    "sample_no_samples_per_problem": (lambda w: _sample(w, samples_per_problem=0), S, "`samples_per_problem` must be"),
    "sample_zero_batch_size": (lambda w: _sample(w, batch_size=0), S, "`batch_size` must be an integer >= 1"),
    "sample_heldout_not_bool": (lambda w: _sample(w, heldout="yes"), S, "`heldout` must be True or False"),
    "sample_out_an_int": (lambda w: _sample(w, out=7), S, "`out` must be a path"),
    "sample_problems_an_int": (lambda w: _sample(w, problems=3), S, "`problems` must be a path"),
    # ---- rl.trajectories_from_ids / _from_text / read_trajectories
    "ids_negative_token": (lambda w: rl.trajectories_from_ids([[1, -2, 3]], 1), S, "token id -2: token ids must count from 0"),
    "ids_float_token": (lambda w: rl.trajectories_from_ids([[1, 2.5, 3]], 1), S, "holds float 2.5"),
    "ids_string_token": (lambda w: rl.trajectories_from_ids([["1", "2"]], 1), S, "holds str '1'"),
    "ids_no_sequence": (lambda w: rl.trajectories_from_ids([], 1), S, "`sequences` must be a non-empty list"),
    "ids_empty_sequence": (lambda w: rl.trajectories_from_ids([[]], 1), S, "(sequence 0) must be a non-empty list"),
    "ids_sequences_an_int": (lambda w: rl.trajectories_from_ids(5, 1), S, "`sequences` must be a non-empty list"),
    "ids_completion_start_a_float": (lambda w: rl.trajectories_from_ids([[1, 2, 3]], 1.5), S,
                                     "`completion_start` must be an integer"),
    "ids_verified_not_bool": (lambda w: rl.trajectories_from_ids([[1, 2, 3]], 1, verified=["yes"]), R,
                              "'verified' must be true, false or absent"),
    "ids_zero_vocab_size": (lambda w: rl.trajectories_from_ids([[1, 2, 3]], 1, vocab_size=0), S,
                            "`vocab_size` must be an integer >= 1"),
    "text_pairs_an_int": (lambda w: rl.trajectories_from_text(w.lens.tokenizer, 3), S, "`pairs` must be a non-empty list"),
    "text_pairs_not_pairs": (lambda w: rl.trajectories_from_text(w.lens.tokenizer, ["12"]), S,
                             "(prompt, completion) text pairs"),
    "text_no_pairs": (lambda w: rl.trajectories_from_text(w.lens.tokenizer, []), S, "`pairs` must be a non-empty list"),
    "text_fewer_ids_than_pairs": (lambda w: rl.trajectories_from_text(w.lens.tokenizer, [("Q:1+1=A:", "2"), ("Q:2+2=A:", "4")],
                                                                      ids=["a"]), S, "`ids` must be a list of one entry per"),
    "text_tokenizer_not_a_tokenizer": (lambda w: rl.trajectories_from_text(3, [("Q:1+1=A:", "2")]), S,
                                       "`tokenizer` must be the model's tokenizer"),
    "read_trajectories_path_an_int": (lambda w: rl.read_trajectories(3), S, "`path` must be a path"),
    "read_trajectories_lens_a_string": (lambda w: rl.read_trajectories(w.traj_file, lens="demo"), S, "`lens` must be a Lens"),
    "read_trajectories_zero_limit": (lambda w: rl.read_trajectories(w.traj_file, limit=0), S, "`limit` must be an integer >= 1"),
    "read_trajectories_negative_limit": (lambda w: rl.read_trajectories(w.traj_file, limit=-1), S, "`limit` must be"),
    "read_items_path_an_int": (lambda w: rl.read_items(3), S, "`path` must be a path"),
    "arithmetic_items_lens_a_string": (lambda w: rl.arithmetic_items("demo"), S, "`lens` must be a Lens"),
    "arithmetic_items_domains_a_string": (lambda w: rl.arithmetic_items(w.lens, 2, domains="mul"), S,
                                          "`domains` must be a non-empty list of names"),
    # ---- rl.counterfactual
    "counterfactual_trajectories_an_int": (lambda w: _cf(w, trajectories=3), S, "`trajectories` must be a file path or"),
    "counterfactual_out_an_int": (lambda w: _cf(w, out=5), S, "`out` must be a path"),
    "counterfactual_zero_max_trajectories": (lambda w: _cf(w, max_trajectories=0), S, "`max_trajectories` must be"),
    "counterfactual_only_verified_not_bool": (lambda w: _cf(w, only_verified="yes"), S, "`only_verified` must be True"),
    "counterfactual_show_progress_not_bool": (lambda w: _cf(w, show_progress="no"), S, "`show_progress` must be True"),
    "counterfactual_layer_twice": (lambda w: _cf(w, layers=[3, -1]), S, "[3, -1] names layer 3 twice"),
    "counterfactual_config_not_a_config": (lambda w: _cf(w, config="fast"), S, "`config` must be a CounterfactualConfig"),
    "counterfactual_negative_seed": (lambda w: _cf(w, seed=-1), S, "`seed` must be an integer in 0..4294967295"),
    "counterfactual_fragile_not_a_number": (lambda w: _cf(w, fragile="low"), S, "`fragile` must be a finite number"),
    # ---- rl.isolate / rl.semantic_route: items, domains, per_domain, layers
    "isolate_items_an_int": (lambda w: _iso(w, items=3), S, "`items` must be \"arithmetic\", a file path or a list"),
    "isolate_no_items_per_domain": (lambda w: _iso(w, per_domain=0), S, "`per_domain` must be an integer >= 1, got 0"),
    "isolate_domains_a_string": (lambda w: _iso(w, domains="mul"), S, "`domains` must be a non-empty list of names"),
    "isolate_out_an_int": (lambda w: _iso(w, out=5), S, "`out` must be a path"),
    "isolate_layer_twice": (lambda w: _iso(w, layers=[0, -4]), S, "names layer 0 twice"),
    "isolate_negative_seed": (lambda w: _iso(w, seed=-1), S, "`seed` must be an integer in 0..4294967295"),
    "semantic_items_an_int": (lambda w: _semantic(w, items=3), S, "`items` must be \"arithmetic\""),
    "semantic_layer_set_names_a_layer_twice": (lambda w: _semantic(w, layer_sets=[[3, -1]]), S, "names layer 3 twice"),
    "semantic_accuracy_not_bool": (lambda w: _semantic(w, accuracy="yes"), S, "`accuracy` must be True or False"),
    # ---- rl.passk / rl.router_update / rl.rollout
    "passk_problems_an_int": (lambda w: _passk(w, problems=3), S, "`problems` must be \"arithmetic\""),
    "passk_no_problems": (lambda w: _passk(w, problems=[]), S, "`problems` is empty"),
    "passk_zero_n": (lambda w: _passk(w, n=0), S, "`n` must be an integer >= 1, got 0"),
    "passk_compare_delta_an_int": (lambda w: _passk(w, compare_delta=3), S, "`compare_delta` must be a path"),
    "passk_seed_beyond_64_bits": (lambda w: _passk(w, seed=2**64), S, "`seed` must be an integer in 0..4294967295"),
    "router_update_counterfactual_none": (lambda w: rl.router_update(w.lens, None, w.out), S,
                                          "`counterfactual` must be the folder of a counterfactual run"),
    "router_update_out_none": (lambda w: rl.router_update(w.lens, _no_run(w), None), S, "`out` must be a path"),
    "router_update_bins_a_string": (lambda w: rl.router_update(w.lens, _no_run(w), w.out, bins="Fragile"), S,
                                    "`bins` must be a non-empty list of bins"),
    "router_update_margin_not_a_number": (lambda w: rl.router_update(w.lens, _no_run(w), w.out, margin="x"), S,
                                          "`margin` must be a finite number"),
    "router_update_negative_seed": (lambda w: rl.router_update(w.lens, _no_run(w), w.out, seed=-1), S, "`seed` must be"),
    "rollout_out_an_int": (lambda w: rl.rollout(w.lens, _no_run(w), 5), S, "`out` must be a path"),
    "rollout_negative_seed": (lambda w: rl.rollout(w.lens, _no_run(w), w.out, seed=-1), S, "`seed` must be"),
    "rollout_nan_temperature": (lambda w: rl.rollout(w.lens, _no_run(w), w.out, temperature=math.nan), S,
                                "`temperature` must be a finite number, got nan"),
    "rollout_counterfactual_none": (lambda w: rl.rollout(w.lens, None, w.out), S, "`counterfactual` must be the folder"),
    "report_out_an_int": (lambda w: w.run.report(out=5), S, "`out` must be a path"),
    # ---- rl.replay (issue 30): the routes, their source, the export, the settings
    "replay_routes_an_int": (lambda w: _replay(w, routes=3), S, "`routes` must be an EngineRoutes or a file path"),
    "replay_routes_a_dict": (lambda w: _replay(w, routes=dict(w.routes.experts)), S, "`routes` must be an EngineRoutes"),
    "replay_routes_empty_path": (lambda w: _replay(w, routes=""), S, "`routes` must be a path"),
    "replay_neither_routes_nor_compare_to": (lambda w: _replay(w, routes=None), S, "one of them"),
    "replay_routes_and_compare_to": (lambda w: _replay(w, compare_to="batch=2"), S, "one of them"),
    "replay_compare_to_an_int": (lambda w: _replay(w, routes=None, compare_to=2), S, "`compare_to` must be"),
    "replay_compare_to_batch_one": (lambda w: _replay(w, routes=None, compare_to="batch=1"), S,
                                    "or batch=N (N >= 2), got 'batch=1'"),
    "replay_compare_to_int8": (lambda w: _replay(w, routes=None, compare_to="dtype=int8"), S, "got 'dtype=int8'"),
    "replay_routes_format_unknown": (lambda w: _replay(w, routes_format="xml"), S, "`routes_format` must be one of"),
    "replay_routes_format_a_list": (lambda w: _replay(w, routes_format=["npy"]), S, "`routes_format` must be one of"),
    "replay_routes_format_of_engine_routes": (lambda w: _replay(w, routes="object", routes_format="npy"), S,
                                              "`routes_format` describes the routes file"),
    "replay_routes_format_not_the_files": (lambda w: _replay(w, routes_format="parquet"), S,
                                           "is not a Parquet file (an .npz (zip) file); `routes_format` parquet reads"),
    "replay_routes_file_missing": (lambda w: _replay(w, routes=str(w.root / "none.npz")), R, "does not exist"),
    "replay_engine_routes_of_another_k": (lambda w: _replay(w, routes=rl.EngineRoutes(
        {t.id: np.tile(np.arange(2), (len(t.input_ids), 4, 1)) for t in w.trajs}, w.lens.moe_layers, 2, "test")), R,
        "have k=2 experts per token, but layer 0 of this model routes 4"),
    "replay_export_an_int": (lambda w: _replay(w, export=5), S, "`export` must be a path ending in .npz, got int 5"),
    "replay_export_not_npz": (lambda w: _replay(w, export=w.out + ".txt"), S, "the export is an .npz file"),
    "replay_export_is_the_routes_file": (lambda w: _replay(w, export=w.routes_file), S, "is this command's input"),
    "replay_export_is_a_users_file": (lambda w: _replay(w, export=str(w.mine_npz), overwrite=True), R,
                                      "exists and was not written by routelens"),
    "replay_export_is_out": (lambda w: _replay(w, out=w.out, export=w.out), S, "`export` and `out` name the same path"),
    "replay_export_with_compare_to": (lambda w: _replay(w, routes=None, compare_to="batch=2", export=w.out + ".npz"), S,
                                      "with `compare_to` there is no engine"),
    "replay_margin_bins_zero": (lambda w: _replay(w, margin_bins=0), S, "`margin_bins` must be an integer >= 1, got 0"),
    "replay_margin_bins_a_float": (lambda w: _replay(w, margin_bins=2.5), S, "`margin_bins` must be an integer"),
    "replay_confidence_one": (lambda w: _replay(w, confidence=1.0), S, "`confidence` must lie strictly between 0 and 1"),
    "replay_misspelt_setting": (lambda w: _replay(w, margn_bins=3), S, "unknown setting(s) `margn_bins`"),
    "replay_zero_max_trajectories": (lambda w: _replay(w, max_trajectories=0), S, "`max_trajectories` must be"),
    "replay_config_not_a_config": (lambda w: _replay(w, config="strict"), S, "`config` must be a ReplayConfig"),
    "replay_out_an_int": (lambda w: _replay(w, out=5), S, "`out` must be a path"),
    "replay_overwrite_not_bool": (lambda w: _replay(w, overwrite="yes"), S, "`overwrite` must be True or False"),
    "replay_lens_a_string": (lambda w: rl.replay("demo", w.trajs, w.routes_file), S, "`lens` must be a Lens"),
    "replay_trajectories_an_int": (lambda w: _replay(w, trajectories=3), S, "`trajectories` must be a file path or"),
    # ---- rl.read_routes / rl.export_routes / rl.EngineRoutes
    "read_routes_path_an_int": (lambda w: rl.read_routes(3, w.lens, w.trajs), S, "`path` must be a path"),
    "read_routes_lens_a_string": (lambda w: rl.read_routes(w.routes_file, "demo", w.trajs), S, "`lens` must be a Lens"),
    "read_routes_format_unknown": (lambda w: rl.read_routes(w.routes_file, w.lens, w.trajs, format="xml"), S,
                                   "`format` must be one of"),
    "read_routes_format_not_the_files": (lambda w: rl.read_routes(w.routes_file, w.lens, w.trajs, format="sglang"), S,
                                         "is not JSON Lines text (an .npz (zip) file); `format` sglang reads"),
    "read_routes_prompt_included_not_bool": (lambda w: rl.read_routes(w.routes_file, w.lens, w.trajs,
                                                                      prompt_included="no"), S,
                                             "`prompt_included` must be True or False"),
    "read_routes_trajectories_an_int": (lambda w: rl.read_routes(w.routes_file, w.lens, 3), S,
                                        "`trajectories` must be a file path or"),
    "read_routes_a_folder": (lambda w: rl.read_routes(str(w.root), w.lens, w.trajs), R, "is a folder; give the file"),
    "export_routes_not_routes": (lambda w: rl.export_routes(dict(w.routes.experts), w.out + ".npz"), S,
                                 "`routes` must be an EngineRoutes"),
    "export_routes_path_an_int": (lambda w: rl.export_routes(w.routes, 5), S, "`path` must be a path ending in .npz"),
    "export_routes_path_none": (lambda w: rl.export_routes(w.routes, None), S, "`path` must be a path ending in .npz"),
    "export_routes_not_npz": (lambda w: rl.export_routes(w.routes, w.out + ".json"), S, "give a path ending in .npz"),
    "export_routes_to_a_folder": (lambda w: rl.export_routes(w.routes, str(w.root)), S, "is a folder; give a file path"),
    "export_routes_overwrite_not_bool": (lambda w: rl.export_routes(w.routes, w.out + ".npz", overwrite="yes"), S,
                                         "`overwrite` must be True or False"),
    "export_routes_over_a_users_file": (lambda w: rl.export_routes(w.routes, str(w.mine_npz), overwrite=True), R,
                                        "was not written by routelens"),
    "export_routes_over_an_input": (lambda w: rl.export_routes(w.routes, w.routes_file, inputs=[w.routes_file]), S,
                                    "an output never replaces an input"),
    "engine_routes_experts_a_list": (lambda w: rl.EngineRoutes([ROUTE], [0], 4, "test"), S,
                                     "`experts` must be a dict of trajectory id"),
    "engine_routes_top_k_zero": (lambda w: rl.EngineRoutes({}, [0], 0, "test"), S, "`top_k` must be an integer >= 1"),
    "engine_routes_layers_an_int": (lambda w: rl.EngineRoutes({}, 3, 4, "test"), S, "`layers` must be a list"),
    "engine_routes_ragged": (lambda w: rl.EngineRoutes({"a": [[[0, 1, 2, 3]], [[0]]]}, [0], 4, "test"), R, "ragged"),
    "engine_routes_id_an_int": (lambda w: rl.EngineRoutes({0: np.zeros((2, 1, 4), int)}, [0], 4, "test"), S,
                                "keyed by trajectory id (a string)"),
    "config_replay_margin_bins_zero": (lambda w: rl.ReplayConfig(margin_bins=0), S, "`margin_bins` must be"),
    # ---- the config classes themselves
    "config_negative_seed": (lambda w: rl.CounterfactualConfig(seed=-1), S, "`seed` must be an integer in 0..4294967295"),
    "config_confident_not_a_number": (lambda w: rl.CounterfactualConfig(confident="high"), S, "`confident` must be a finite"),
    "config_infinite_gumbel_temperature": (lambda w: rl.CounterfactualConfig(gumbel_temperature=math.inf), S,
                                           "`gumbel_temperature` must be a finite number, got inf"),
    "config_isolation_seed_a_string": (lambda w: rl.IsolationConfig(seed="0"), S, "`seed` must be an integer"),
    "config_passk_float_seed": (lambda w: rl.PassKConfig(seed=1.5), S, "`seed` must be an integer"),
    "config_router_update_no_bins": (lambda w: rl.RouterUpdateConfig(bins=[]), S, "`bins` must be a non-empty list"),
    "config_rollout_infinite_temperature": (lambda w: rl.RolloutConfig(temperature=math.inf), S,
                                            "`temperature` must be a finite number, got inf"),
    "config_semantic_seed_negative": (lambda w: rl.SemanticRouteConfig(seed=-3), S, "`seed` must be an integer"),
}

# bad input that was answered well before issue 28's API half: kept so
KEPT_CASES = {
    "load_plain_file": (lambda w: rl.load(str(w.notes)), R, "is not a folder; give a folder written by save_pretrained"),
    "load_unknown_device": (lambda w: rl.load("tiny:olmoe", device="tpu9"), S, "`device` 'tpu9' is not a device torch knows"),
    "load_unknown_dtype": (lambda w: rl.load("tiny:olmoe", dtype="int8"), S, "unknown `dtype` 'int8'"),
    "load_unknown_family": (lambda w: rl.load("tiny:no_such_family"), R, "unsupported architecture 'no_such_family'"),
    "wrap_not_a_model": (lambda w: rl.wrap(object()), R, "Hugging Face model"),
    "capture_layer_out_of_range": (lambda w: _capture(w, layers=[9]), R, "layer 9 is out of range"),
    "capture_dense_layer": (lambda w: _capture(w, layers=[1], ids=torch.tensor([[1, 2]]), lens=w.dense), R,
                            "layer 1 is a dense layer; choose one of the MoE layers [0, 2, 3]"),
    "force_dense_layer": (lambda w: _force(w, layer=1, lens=w.dense), R, "layer 1 is a dense layer"),
    "force_expert_out_of_range": (lambda w: _force(w, experts=[[0, 1, 2, 99]]), R, "expert ids must lie in 0..15"),
    "force_negative_expert": (lambda w: _force(w, experts=[[-1, 1, 2, 3]]), R, "expert ids must lie in 0..15"),
    "force_repeated_expert": (lambda w: _force(w, experts=[[0, 0, 1, 2]]), R, "distinct"),
    "force_wrong_k": (lambda w: _force(w, experts=[[0, 1]]), R, "one list of 4 expert ids"),
    "force_experts_an_int": (lambda w: _force(w, experts=3), R, "one list of 4 expert ids"),
    "force_weights_of_another_shape": (lambda w: _force(w, weights=[[1.0, 0.0]]), R, "must have the shape of"),
    "force_position_beyond_the_sequence": (lambda w: _force(w, positions=[(0, 99)]), R, "outside this forward"),
    "graft_malformed_pair": (lambda w: _graft(w, experts="0:1"), S, "is not LAYER:EXPERT=DONOR_LAYER:DONOR_EXPERT"),
    "graft_not_numbers": (lambda w: _graft(w, experts="a:b=c:d"), S, "is not LAYER:EXPERT=DONOR_LAYER:DONOR_EXPERT"),
    "graft_expert_out_of_range": (lambda w: _graft(w, experts="0:99=0:1"), R, "recipient expert 99 at layer 0 does not exist"),
    "graft_layer_out_of_range": (lambda w: _graft(w, experts="9:1=0:1"), R, "layer 9 is out of range"),
    "graft_slot_twice": (lambda w: _graft(w, experts="0:1=0:2,0:1=0:3"), R, "is grafted twice"),
    "graft_unknown_dtype": (lambda w: _graft(w, dtype="int8"), S, "`dtype`"),
    "sample_lens_an_int": (lambda w: rl.sample_trajectories(3, n=1), R, "Lens"),
    "ids_completion_start_out_of_range": (lambda w: rl.trajectories_from_ids([[1, 2, 3, 4]], 5), R,
                                          "completion_start 5 must lie in 1..3"),
    "ids_beyond_vocabulary": (lambda w: rl.trajectories_from_ids([[1, 20]], 1, vocab_size=10), R, "0..9"),
    "ids_repeated": (lambda w: rl.trajectories_from_ids([[1, 2], [1, 2]], 1, ids=["x", "x"]), R, "unique"),
    "ids_starts_of_another_length": (lambda w: rl.trajectories_from_ids([[1, 2, 3]], [1, 1]), R, "one"),
    "text_without_tokenizer": (lambda w: rl.trajectories_from_text(None, [("Q:1+1=A:", "2")]), R, "tokenizer"),
    "counterfactual_lens_a_string": (lambda w: rl.counterfactual("demo", w.trajs, layers=[-1]), R, "Lens"),
    "counterfactual_trajectories_a_dict": (lambda w: _cf(w, trajectories={"a": w.trajs[0]}), R, "list of Trajectory"),
    "counterfactual_no_trajectories": (lambda w: _cf(w, trajectories=[]), R, "give at least one"),
    "counterfactual_misspelt_setting": (lambda w: _cf(w, rotues=3), S, "unknown setting(s) `rotues`"),
    "counterfactual_layers_a_string": (lambda w: _cf(w, layers="0"), S, "`layers` must be a non-empty list"),
    "counterfactual_layers_an_int": (lambda w: _cf(w, layers=0), S, "`layers` must be a non-empty list"),
    "counterfactual_dense_layer": (lambda w: rl.counterfactual(w.dense, [rl.Trajectory("a", [1, 2, 3, 4], 2)], layers=[1],
                                                               routes=2, show_progress=False), R, "layer 1 is a dense layer"),
    "isolate_layers_a_string": (lambda w: _iso(w, layers="0"), S, "`layers` must be None"),
    "isolate_no_items": (lambda w: _iso(w, items=[]), R, "item"),
    "passk_misspelt_setting": (lambda w: _passk(w, smaples=2), S, "unknown setting(s) `smaples`"),
    "router_update_counterfactual_an_int": (lambda w: rl.router_update(w.lens, 3, w.out), R, "counterfactual"),
    "router_update_lens_a_string": (lambda w: rl.router_update("demo", _no_run(w), w.out), R, "Lens"),
    "router_update_not_a_run": (lambda w: rl.router_update(w.lens, _no_run(w), w.out), R, "is not a run folder"),
    "rollout_counterfactual_a_list": (lambda w: rl.rollout(w.lens, w.trajs, w.out), R, "counterfactual"),
    "semantic_layer_sets_a_string": (lambda w: _semantic(w, layer_sets="0"), S, "`layer_sets` must be"),
}


def test_the_api_catalogue_has_at_least_60_cases():
    assert len(API_CASES) >= 60
    assert not set(API_CASES) & set(KEPT_CASES)


@pytest.fixture
def case_w(w, tmp_path):
    """`w` with `out`: a path of this case's own that no case may create."""
    return SimpleNamespace(**{**vars(w), "out": str(tmp_path / "out")})


@pytest.mark.parametrize("case", sorted(API_CASES) + sorted(KEPT_CASES))
def test_bad_api_input_is_one_line_and_writes_nothing(case, case_w):
    call, kind, fragment = API_CASES.get(case) or KEPT_CASES[case]
    w = case_w
    before = _files(w.root)
    with pytest.raises(Exception) as caught:
        call(w)
    error = caught.value
    assert isinstance(error, kind), f"{type(error).__name__}: {error}"
    assert not isinstance(error, (AttributeError, TypeError, IndexError, KeyError, ValueError)), type(error).__mro__
    message = str(error)
    assert message and len(message.splitlines()) == 1, message
    assert fragment in message, message
    assert "Traceback" not in message and "site-packages" not in message
    assert not os.path.exists(w.out), f"{w.out} was written"
    assert _files(w.root) == before, "files in the user's folder were added, removed or changed"


def test_routes_not_captured_is_a_one_line_error_and_a_key_error(w):
    """`routes[layer]` of a layer the block did not capture: a RouteLensError that is a
    KeyError too (a dict's missing key), printed as its message, not as a repr."""
    with torch.no_grad(), w.lens.capture(layers=[-1]) as routes:
        w.lens.model(w.ids)
    with pytest.raises(KeyError) as caught:
        routes[0]
    assert isinstance(caught.value, rl.RouteLensError)
    assert str(caught.value).startswith("no routes captured at layer 0: run a forward inside the `capture` block")


def test_good_input_in_other_forms_is_taken(w):
    """What the checks must not refuse: tensors and NumPy integers for ids and routes, a
    path object for a model folder, a torch dtype."""
    import numpy as np

    trajs = rl.trajectories_from_ids(torch.tensor([[1, 5, 6, 7]]), np.int64(2))
    assert trajs[0].input_ids == [1, 5, 6, 7] and isinstance(trajs[0].input_ids[0], int)
    with torch.no_grad(), w.lens.force(np.int64(-1), [(0, np.int64(1))], torch.tensor(ROUTE)), \
            w.lens.capture([-1]) as routes:
        w.lens.model(w.ids)
    assert sorted(routes[-1].experts[0, 1].tolist()) == ROUTE[0]
    assert rl.load(Path(w.lens.loaded.folder), dtype=torch.float32).loaded.dtype == "float32"


def _files(root) -> dict[str, float]:
    return {os.path.join(folder, name): os.path.getmtime(os.path.join(folder, name))
            for folder, _, names in os.walk(root) for name in names}
