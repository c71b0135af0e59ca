"""The catalogue of bad input: every case, across every command, is answered with one line
that says what is wrong (exit 2, no traceback), leaves nothing that looks complete, and
never deletes what the user owns."""

import json
import os
import shutil
import signal
import subprocess
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import PYTHON, scaled, unit_parts, wait_until, write_jsonl
from safetensors import safe_open
from safetensors.torch import save_file

from routelens.cli import main
from routelens.models.tiny import build_tiny_model

GOOD = {"id": "a", "prompt": "Q:1+2=", "completion": "A:1+2=3#3"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, saved_model):
    """Files the cases point at (built once): good inputs, broken ones, odd models and runs."""
    root = tmp_path_factory.mktemp("bad")
    w = SimpleNamespace(root=root, model=saved_model)
    w.good = write_jsonl(root / "good.jsonl", [GOOD, {**GOOD, "id": "b"}])
    w.ids = write_jsonl(root / "ids.jsonl", [{"id": "a", "input_ids": [1, 5, 6, 7, 8, 9], "completion_start": 2}])
    w.items = write_jsonl(root / "items.jsonl", [{"id": "i", "domain": "d", "prompt": "Q:1+2=", "target": "3"}])
    (root / "binary.jsonl").write_bytes(b"\x00\x01\x02PK\x03\x04" * 20)
    w.binary = str(root / "binary.jsonl")
    (root / "latin1.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"id": "c", "prompt": "Qé"}'.encode("latin-1"))
    w.latin1 = str(root / "latin1.jsonl")
    w.long = write_jsonl(root / "long.jsonl", [{"id": "long", "input_ids": [5] * 300, "completion_start": 2}])
    w.unk = write_jsonl(root / "unk.jsonl", [{"id": "u", "prompt": "Q:1+2=", "completion": "A:3 ✓ Ü"}])
    w.unk_items = write_jsonl(root / "unk-items.jsonl", [{"id": "i", "domain": "d", "prompt": "Q:€", "target": "3"}])
    w.outside_vocab = write_jsonl(root / "vocab.jsonl", [{"id": "a", "input_ids": [1, 5, 999], "completion_start": 1}])
    w.problems_bad = write_jsonl(root / "problems.jsonl", [{"id": 1, "prompt": "Q:1+2="}])
    w.afile = str(root / "a-file.txt")
    open(w.afile, "w").write("not a folder")
    w.bad_run_json = root / "bad-run-json"
    w.bad_run_json.mkdir()
    (w.bad_run_json / "run.json").write_text("{not json")
    # model folders
    for name in ("truncated", "pickle", "noconfig"):
        shutil.copytree(saved_model, root / name)
    weights = root / "truncated" / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(os.path.getsize(weights) // 2)
    model = build_tiny_model("olmoe", seed=0)
    os.remove(root / "pickle" / "model.safetensors")
    torch.save(model.state_dict(), root / "pickle" / "pytorch_model.bin")
    os.remove(root / "noconfig" / "config.json")
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(root / "llama")
    build_tiny_model("qwen2_moe", mlp_only_layers=[0, 1, 2, 3]).save_pretrained(root / "dense")
    # a router delta, then the same file with one tensor altered and the old checksum kept
    from routelens.models.loading import load_model
    from routelens.models.router_delta import router_parameter_names, save_router_delta

    loaded = load_model(saved_model, device="cpu")
    layer = loaded.adapter.moe_layers[-1]
    base = {k: v.detach().clone() for k, v in router_parameter_names(loaded.adapter, layer).items()}
    w.delta = str(root / "delta.safetensors")
    save_router_delta(w.delta, loaded.adapter, layer, base, saved_model)
    with safe_open(w.delta, framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    first = sorted(k for k in tensors if not k.startswith("base."))[0]
    tensors[first] = tensors[first] + 0.01
    w.tampered = str(root / "tampered.safetensors")
    save_file(tensors, w.tampered, metadata=metadata)
    # a complete small counterfactual run, to be broken in copies
    w.run = str(root / "run")
    assert main(["counterfactual", "--model", saved_model, "--trajectories", w.good, "--layers", "0", "--routes", "2",
                 "--out", w.run, "--no-progress"]) == 0
    return w


def _copy_run(w, name, drop=None, status=None):
    target = w.root / name
    if not target.exists():
        shutil.copytree(w.run, target)
        if drop:
            os.remove(target / drop)
        if status:
            state = json.loads((target / "run.json").read_text())
            state["status"] = status
            (target / "run.json").write_text(json.dumps(state))
    return str(target)


def _cf(w, *extra, model=None, trajectories=None, out=None):
    return ["counterfactual", "--model", model or w.model, "--trajectories", trajectories or w.good, "--layers", "0",
            "--routes", "2", "--out", out or str(w.root / "out-new"), "--no-progress", *extra]


def _iso(w, *extra, items=None):
    return ["isolate", "--model", w.model, "--items", items or w.items, "--layers", "0", "--floor-seeds", "1",
            "--out", str(w.root / "iso-new"), "--no-progress", *extra]


CASES = {
    # ---- counterfactual: the trajectory file
    "malformed_json": (lambda w: _cf(w, trajectories=write_jsonl(w.root / "m.jsonl", [json.dumps(GOOD), "{oops"])),
                       "line 2: malformed JSON"),
    "binary_file": (lambda w: _cf(w, trajectories=w.binary), "a binary file, not JSONL text"),
    "not_utf8": (lambda w: _cf(w, trajectories=w.latin1), "line 2: not UTF-8 text"),
    "not_parquet": (lambda w: _cf(w, trajectories=str(shutil.copy(w.binary, w.root / "x.parquet"))), "not a readable Parquet file"),
    "missing_file": (lambda w: _cf(w, trajectories=str(w.root / "nope.jsonl")), "does not exist"),
    "missing_field": (lambda w: _cf(w, trajectories=write_jsonl(w.root / "mf.jsonl", [{"id": "a", "prompt": "Q"}])),
                      "missing field(s) 'completion'"),
    "empty_completion": (lambda w: _cf(w, trajectories=write_jsonl(w.root / "ec.jsonl", [{**GOOD, "completion": ""}])),
                         "empty completion"),
    "duplicate_id": (lambda w: _cf(w, trajectories=write_jsonl(w.root / "dup.jsonl", [GOOD, GOOD])), "duplicate trajectory id"),
    "ids_outside_vocab": (lambda w: _cf(w, trajectories=w.outside_vocab), "must lie in 0..")
    ,
    "longer_than_context": (lambda w: _cf(w, trajectories=w.long), "has 300 tokens, more than the model's context of 256"),
    "unknown_characters": (lambda w: _cf(w, trajectories=w.unk), "characters the model's tokenizer does not know ('Ü', '✓')"),
    "no_verified": (lambda w: _cf(w, "--only-verified"), "--only-verified kept no trajectory"),
    # ---- counterfactual: settings
    "dense_layer": (lambda w: _cf(w, model="tiny:qwen2_moe", trajectories=w.ids)[:6] + ["1", "--out", str(w.root / "o")],
                    "layer 1 is a dense layer; choose one of the MoE layers [0, 2, 3]"),
    "layer_out_of_range": (lambda w: _cf(w)[:6] + ["9", "--out", str(w.root / "o")], "layer 9 is out of range"),
    "abbreviated_option": (lambda w: _cf(w, "--route", "3"), "unrecognized arguments: --route 3"),
    "layers_space_separated": (lambda w: _cf(w)[:6] + ["0", "-1", "--out", str(w.root / "o")],
                               "unrecognized arguments: -1; lists are comma-separated, e.g. --layers 0,-1"),
    "layers_not_integers": (lambda w: _cf(w)[:6] + ["first", "--out", str(w.root / "o")], "expected comma-separated integers"),
    "candidates_below_k": (lambda w: _cf(w, "--candidates", "1"), "--candidates 1 is smaller than the model's top-k 2"),
    "candidates_equal_k": (lambda w: _cf(w, "--candidates", "2"), "--candidates 2 equals the model's top-k 2"),
    "candidates_above_e": (lambda w: _cf(w, "--candidates", "99"), "--candidates 99 exceeds the model's 8 experts"),
    "zero_routes": (lambda w: _cf(w, "--routes", "0"), "expected a positive integer, got 0"),
    "zero_memory_budget": (lambda w: _cf(w, "--memory-budget", "0GiB"), "a memory budget must be positive"),
    "negative_memory_budget": (lambda w: _cf(w, "--memory-budget=-1GiB"), "a memory budget must be positive"),
    "memory_budget_not_a_size": (lambda w: _cf(w, "--memory-budget", "lots"), "expected a size such as 512MiB"),
    "bins_out_of_order": (lambda w: _cf(w, "--fragile", "0.95"), "need 0 <= --fragile (0.95) <= --confident (0.9)"),
    "joint_and_layers": (lambda w: _cf(w, "--joint-layers", "0,1"), "argument --joint-layers: not allowed with argument --layers"),
    "joint_one_layer": (lambda w: _cf(w)[:5] + ["--joint-layers", "1", "--out", str(w.root / "o")],
                        "--joint-layers must list two or more distinct layers"),
    "joint_same_layer_twice": (lambda w: _cf(w)[:5] + ["--joint-layers", "1,-2", "--out", str(w.root / "o")],
                               "--joint-layers [1, -2] name 1 distinct layer of this model"),
    "unknown_engine": (lambda w: _cf(w, "--engine", "turbo"), "invalid choice: 'turbo'"),
    # ---- devices and models
    "device_unknown": (lambda w: _cf(w, "--device", "gpu0"), "--device 'gpu0' is not a device torch knows"),
    "device_unavailable": (lambda w: _cf(w, "--device", "cuda:1"), "no cuda device is available here"),
    "device_map_not_json": (lambda w: _cf(w, "--device-map", "{oops"), "--device-map '{oops' is neither auto"),
    "experts_implementation_unknown": (lambda w: _cf(w, "--experts-implementation", "fastest"), "invalid choice: 'fastest'"),
    "model_no_such_folder": (lambda w: _cf(w, model="./models/my-olmoe"), "--model ./models/my-olmoe: no such folder"),
    "model_is_a_file": (lambda w: _cf(w, model=w.afile), "is not a folder; give a folder written by save_pretrained"),
    "model_without_config": (lambda w: _cf(w, model=str(w.root / "noconfig")), "has no config.json"),
    "model_truncated_weights": (lambda w: _cf(w, model=str(w.root / "truncated")), "cannot load the weights of"),
    "model_pickle_only": (lambda w: _cf(w, model=str(w.root / "pickle")), "holds only pickle weights (pytorch_model.bin)"),
    "model_unknown_architecture": (lambda w: _cf(w, model=str(w.root / "llama")), "unsupported architecture 'llama'"),
    "model_without_moe_layers": (lambda w: ["inspect", "--model", str(w.root / "dense")], "has no MoE layers"),
    "router_delta_missing": (lambda w: _cf(w, "--router-delta", str(w.root / "none.safetensors")), "does not exist"),
    "router_delta_tampered": (lambda w: _cf(w, "--router-delta", w.tampered),
                              "tensors do not match the checksum in its metadata"),
    "router_delta_not_safetensors": (lambda w: _cf(w, "--router-delta", w.binary), "not a safetensors router delta"),
    # ---- the output folder
    "out_is_a_file": (lambda w: _cf(w, out=w.afile), "is an existing file, not a folder"),
    "out_run_json_invalid": (lambda w: _cf(w, out=str(w.bad_run_json)), "run.json is not valid JSON"),
    "out_foreign_folder_overwrite": (lambda w: _cf(w, "--overwrite", out=str(_foreign(w))),
                                     "not a routelens run, so it is neither resumed nor replaced (not even with --overwrite)"),
    "out_other_kind_overwrite": (lambda w: _cf(w, "--overwrite", out=_set_kind(w, "iso-kind")),
                                 "holds a routelens isolation run, not a counterfactual run"),
    "out_holds_the_inputs": (lambda w: _inputs_inside(w), "contains this command's input"),
    # ---- an output never replaces an input (issue 28)
    "export_out_is_the_runs_run_json": (lambda w: ["export", w.run, "--out", os.path.join(w.run, "run.json")],
                                        "lies inside this command's input"),
    "report_out_is_the_runs_summary": (lambda w: ["report", w.run, "--out", os.path.join(w.run, "summary.json")],
                                       "lies inside this command's input"),
    "trajectories_out_is_its_problems": (lambda w: ["trajectories", "--model", w.model, "--problems", w.problems_bad,
                                                    "--out", w.problems_bad], "is this command's input"),
    "rollout_out_inside_its_counterfactual_run": (lambda w: ["rollout", "--model", w.model, "--counterfactual", w.run,
                                                             "--out", os.path.join(w.run, "ro"), "--no-progress"],
                                                  "lies inside this command's input"),
    "router_update_out_inside_its_counterfactual_run": (
        lambda w: ["router-update", "--model", w.model, "--counterfactual", w.run, "--out", os.path.join(w.run, "ru"),
                   "--no-progress"], "lies inside this command's input"),
    "counterfactual_out_is_its_trajectories": (lambda w: _cf(w, trajectories=w.good, out=w.good),
                                               "is this command's input"),
    # ---- isolate
    "items_not_utf8": (lambda w: _iso(w, items=w.latin1), "not UTF-8 text"),
    "items_missing_domain": (lambda w: _iso(w, items=write_jsonl(w.root / "nd.jsonl", [{"id": "i", "prompt": "Q", "target": "3"}])),
                             "missing field 'domain'"),
    "items_unknown_characters": (lambda w: _iso(w, items=w.unk_items),
                                 "the prompt has characters the model's tokenizer does not know ('€')"),
    "items_unknown_domain": (lambda w: _iso(w, "--domains", "poetry"), "domain(s) poetry not in"),
    "isolate_alpha": (lambda w: _iso(w, "--alpha", "1.5"), "--alpha must lie strictly between 0 and 1"),
    "isolate_floor_seeds": (lambda w: _iso(w, "--floor-seeds", "-1"), "--floor-seeds must be an integer >= 0, got -1"),
    "isolate_floor_seeds_without_a_verdict": (lambda w: _iso(w, "--floor-seeds", "0"),
                                              "--floor-seeds 0 leaves the equal-compute arms without their single-expert "
                                              "floor (the verdict's baseline)"),
    "isolate_per_domain_beyond_task": (lambda w: ["isolate", "--model", "demo", "--task", "arithmetic", "--per-domain", "101",
                                                  "--out", str(w.root / "iso-demo"), "--no-progress"],
                                       "reserves 100 items per domain; ask for 1..100, not 101"),
    # ---- trajectories, evaluate, passk
    "trajectories_out_is_a_folder": (lambda w: ["trajectories", "--model", "demo", "--n", "2", "--out", str(w.root)],
                                     "is a folder; give a file path"),
    "trajectories_run_folder_is_a_file": (lambda w: ["trajectories", "--model", "demo", "--n", "2",
                                                     "--out", str(write_jsonl(w.root / "t3.jsonl.run", []))[:-4]],
                                          "(the run folder kept beside --out"),
    "trajectories_heldout_beyond_set": (lambda w: ["trajectories", "--model", "demo", "--heldout", "--n", "501",
                                                   "--out", str(w.root / "t.jsonl")],
                                        "the arithmetic held-out set has 500 problems"),
    "problems_missing_answer": (lambda w: ["trajectories", "--model", w.model, "--problems", w.problems_bad,
                                           "--out", str(w.root / "t2.jsonl")], "missing field(s) answer"),
    "evaluate_beyond_heldout": (lambda w: ["evaluate", "--model", "demo", "--n", "600"], "has 500 problems"),
    "passk_beyond_heldout": (lambda w: ["passk", "--model", "demo", "--n", "501", "--samples", "2", "--k", "1",
                                        "--out", str(w.root / "pk")], "has 500 problems"),
    "passk_k_above_samples": (lambda w: ["passk", "--model", "demo", "--samples", "4", "--k", "8",
                                         "--out", str(w.root / "pk2")], "--k 8 must lie in 1..--samples (4)"),
    "passk_compare_without_delta": (lambda w: ["passk", "--model", "demo", "--compare", "--out", str(w.root / "pk3")],
                                    "--compare needs --router-delta FILE"),
    # ---- report, verify, router-update
    "report_missing_table": (lambda w: ["report", _copy_run(w, "no-tokens", drop="tokens.parquet")],
                             "lacks tokens.parquet"),
    "report_unfinished_run": (lambda w: ["report", _copy_run(w, "unfinished", status="running")], "running counterfactual run"),
    "report_invalid_run_json": (lambda w: ["report", str(w.bad_run_json)], "run.json is not valid JSON"),
    "report_out_is_a_folder": (lambda w: ["report", w.run, "--out", str(_foreign(w))], "is a folder; give a file path"),
    "verify_json_is_a_folder": (lambda w: ["verify", "--model", w.model, "--json", str(w.root)], "is a folder; give a file path"),
    "verify_too_short": (lambda w: ["verify", "--model", w.model, "--length", "3"], "--length 3 is too short"),
    "router_update_not_a_run": (lambda w: ["router-update", "--model", w.model, "--counterfactual", str(w.root / "nope"),
                                           "--out", str(w.root / "ru")], "nope"),
    "router_update_bad_bins": (lambda w: ["router-update", "--model", w.model, "--counterfactual", w.run, "--bins", "Weird",
                                          "--out", str(w.root / "ru2")], "unknown bin(s) Weird"),
    # ---- semantic routing
    "semantic_one_domain": (lambda w: ["semantic-route", "--model", "demo", "--domains", "mul", "--per-domain", "3",
                                       "--out", str(w.root / "sr1")], "chooses between domains; the items hold 1"),
    "semantic_bad_layer_sets": (lambda w: ["semantic-route", "--model", "demo", "--layer-sets", "0;x",
                                           "--out", str(w.root / "sr2")], "expected layer sets such as '3;0,1,2,3'"),
    "semantic_dense_layer": (lambda w: ["semantic-route", "--model", "tiny:qwen2_moe", "--items", w.items,
                                        "--layer-sets", "1", "--out", str(w.root / "sr3")], "layer 1 is a dense layer"),
    "semantic_group_items_zero": (lambda w: ["semantic-route", "--model", "demo", "--group-items", "0",
                                             "--out", str(w.root / "sr4")], "argument --group-items: expected a positive integer, got 0"),
    # ---- graft
    "graft_group_items_zero": (lambda w: ["graft", "--recipient", w.model, "--donor", w.model, "--experts", "0:1=0:2",
                                          "--group-items", "0", "--out", str(w.root / "g4")],
                               "argument --group-items: expected a positive integer, got 0"),
    "graft_other_family": (lambda w: ["graft", "--recipient", w.model, "--donor", "tiny:qwen3_moe", "--experts", "0:1=0:1",
                                      "--out", str(w.root / "g1")], "grafting copies an expert between models of one family"),
    "graft_bad_map": (lambda w: ["graft", "--recipient", w.model, "--donor", w.model, "--experts", "0:1",
                                 "--out", str(w.root / "g2")], "is not LAYER:EXPERT=DONOR_LAYER:DONOR_EXPERT"),
    "graft_expert_out_of_range": (lambda w: ["graft", "--recipient", w.model, "--donor", w.model, "--experts", "0:1=0:99",
                                             "--out", str(w.root / "g3")], "donor expert 99 at layer 0 does not exist"),
    "train_demo_unknown_domain": (lambda w: ["train-demo", "--out", str(w.root / "td"), "--domains", "calculus"],
                                  "unknown domain(s) calculus; domains are addsub, mul, mixed, long"),
    # ---- rollout
    "rollout_no_answer": (lambda w: _rollout(w, "--tokens", "all"), "has no reference 'answer'; rollouts check final answers"),
    "rollout_not_a_run": (lambda w: _rollout(w, run=str(w.root / "nope")), "is not a run folder (no run.json)"),
    "rollout_unfinished_run": (lambda w: _rollout(w, run=_copy_run(w, "unfinished-ro", status="running")),
                               "rollout needs a complete counterfactual run"),
    "rollout_other_model": (lambda w: _rollout(w, model="demo"), "rollout must use the model the counterfactual run scored"),
    "rollout_negative_temperature": (lambda w: _rollout(w, "--temperature", "-1"), "--temperature must be 0 (greedy) or positive"),
    "rollout_tokens_neither": (lambda w: _rollout(w, "--tokens", "some"),
                               "--tokens must be fragile-all, random, fragile, all or a file"),
    "rollout_random_without_limit": (lambda w: _rollout(w, "--tokens", "random"),
                                     "--tokens random draws --limit tokens: give --limit (how many)"),
    "rollout_best_by_unknown": (lambda w: _rollout(w, "--best-by", "proxy"), "argument --best-by: invalid choice: 'proxy'"),
    "rollout_top_tokens_zero": (lambda w: _rollout(w, "--top-tokens", "0"),
                                "argument --top-tokens: expected a positive integer, got 0"),
    # ---- Ray (--ray without Ray installed: tests/runs/test_ray.py)
    "workers_without_ray": (lambda w: _cf(w, "--workers", "4"), "--workers needs --ray (local, auto or a cluster address)"),
    "ray_blank_address": (lambda w: _iso(w, "--ray", " "), "--ray takes local, auto or a cluster address"),
    "check_rows_zero": (lambda w: _cf(w, "--check-rows", "0"), "argument --check-rows: expected a positive integer, got 0"),
    "isolate_group_items_zero": (lambda w: _iso(w, "--group-items", "0"), "argument --group-items: expected a positive integer, got 0"),
    "ray_negative_gpus": (lambda w: _rollout(w, "--ray", "local", "--gpus-per-worker", "-1"),
                          "--gpus-per-worker must be 0 or more, got -1.0"),
    "rollout_tokens_file_unknown": (lambda w: _rollout(w, "--tokens", write_jsonl(
        w.root / "chosen.jsonl", [{"trajectory_id": "a", "position": 99, "layer": 0}])), "was not scored by the counterfactual run"),
    # ---- errors added with the one-house redesign
    "graft_ray_without_evaluate": (lambda w: ["graft", "--recipient", w.model, "--donor", w.model, "--experts", "0:1=0:2",
                                              "--out", str(w.root / "g4"), "--ray", "local"],
                                   "--ray runs the evaluation on Ray actors; give it with --evaluate"),
    "graft_alpha_out_of_range": (lambda w: ["graft", "--recipient", w.model, "--donor", w.model, "--experts", "0:1=0:2",
                                            "--out", str(w.root / "g5"), "--evaluate", "--alpha", "2"],
                                 "--alpha must lie strictly between 0 and 1, got 2.0"),
    "graft_out_holds_another_graft": (lambda w: _another_graft(w), "holds another graft (its graft.json differs"),
    "counterfactual_confidence_one": (lambda w: _cf(w, "--confidence", "1"), "--confidence must lie strictly between 0 and 1"),
    "counterfactual_weights_unknown": (lambda w: _cf(w, "--alternative-weights", "heavier"),
                                       "argument --alternative-weights: invalid choice: 'heavier'"),
    "rollout_old_option_name": (lambda w: _rollout(w, "--max-tokens", "5"), "did you mean --max-new-tokens?"),
    "router_update_ray": (lambda w: ["router-update", "--model", w.model, "--counterfactual", w.run, "--out",
                                     str(w.root / "ru3"), "--ray", "local"], "unrecognized arguments: --ray local"),
    # ---- issue 28: graft
    "graft_recipient_config_not_json": (lambda w: _graft(w, recipient=_model_with_config(w, "gc-json", b"{oops")),
                                        "gc-json/config.json is not valid JSON"),
    "graft_recipient_config_not_utf8": (lambda w: _graft(w, recipient=_model_with_config(w, "gc-latin", '{"é": 1}'.encode("latin-1"))),
                                        "gc-latin/config.json is not UTF-8 text"),
    "graft_recipient_config_not_an_object": (lambda w: _graft(w, recipient=_model_with_config(w, "gc-list", b"[1, 2]")),
                                             "gc-list/config.json holds JSON but not an object"),
    "graft_out_is_a_file": (lambda w: _graft(w, out=w.afile), "is an existing file, not a folder; the grafted model is a folder"),
    "graft_out_under_a_file": (lambda w: _graft(w, out=os.path.join(w.afile, "grafted")), "a-file.txt is a file, not a folder"),
    "graft_overwrite_a_foreign_folder": (lambda w: _graft(w, "--overwrite", out=str(_foreign(w))),
                                         "holds no graft.json: it is not a graft's folder, so nothing is written into it "
                                         "(not even with --overwrite)"),
    "graft_out_graft_json_invalid": (lambda w: _graft(w, out=_folder_with(w, "gj-bad", "graft.json", "{oops")),
                                     "graft.json is not valid JSON"),
    "graft_experts_empty": (lambda w: _graft(w, experts=""), "--experts is empty"),
    "graft_experts_stray_comma": (lambda w: _graft(w, experts="0:1=0:2,"), "--experts: an empty pair (a stray comma?)"),
    "graft_pair_changes_nothing": (lambda w: _graft(w, experts="0:1=0:1"),
                                   "recipient expert 0:1 already holds the tensors of donor expert 0:1"),
    "graft_donor_layer_out_of_range": (lambda w: _graft(w, experts="0:1=9:2"), "the donor's layer 9 is out of range"),
    "graft_items_without_evaluate": (lambda w: _graft(w, "--items", w.items),
                                     "--items chooses the items of the evaluation, which runs only with --evaluate"),
    "graft_domains_without_evaluate": (lambda w: _graft(w, "--domains", "d", "--per-domain", "2"),
                                       "--domains, --per-domain choose the items of the evaluation"),
    "graft_overwrite_an_unlisted_graft": (lambda w: _graft(w, "--overwrite", experts="0:1=0:3", out=_graft_without_files(w)),
                                          "does not list the files the graft wrote, so --overwrite cannot tell them from yours"),
    # ---- issue 28: a run folder's files, read by one reader (export, report, rollout, router-update)
    "export_run_json_truncated": (lambda w: ["export", _damaged(w, "rj-cut", "run.json", b'{"kind": "counterf')],
                                  "run.json is not valid JSON (Unterminated string starting at: line 1 column 10); "
                                  "re-run the analysis into a new folder to regenerate it"),
    "export_run_json_not_a_record": (lambda w: ["export", _damaged(w, "rj-list", "run.json", b"[1, 2]")],
                                     "is not a routelens run record (no kind, config and sessions); re-run the analysis"),
    "export_summary_json_corrupt": (lambda w: ["export", _damaged(w, "sj-bad", "summary.json", b"{oops")],
                                    "summary.json is not valid JSON"),
    "export_summary_json_missing": (lambda w: ["export", _damaged(w, "sj-gone", "summary.json")],
                                    "summary.json is missing; re-run its command with the same settings"),
    "export_summary_json_not_an_object": (lambda w: ["export", _damaged(w, "sj-list", "summary.json", b"[]")],
                                          "holds no summary (a JSON object)"),
    "export_table_corrupt": (lambda w: ["export", _damaged(w, "tokens-cut", "tokens.parquet", b"PAR1 cut short")],
                             "tokens.parquet is not a readable Parquet table"),
    "report_summary_json_corrupt": (lambda w: ["report", _damaged(w, "sj-bad", "summary.json", b"{oops")],
                                    "summary.json is not valid JSON"),
    "report_routes_parquet_corrupt": (lambda w: ["report", _damaged(w, "routes-cut", "routes.parquet", b"PAR1 cut")],
                                      "routes.parquet is not a readable Parquet table"),
    "report_tokens_parquet_empty": (lambda w: ["report", _damaged(w, "tokens-empty", "tokens.parquet", b"")],
                                    "tokens.parquet is not a readable Parquet table"),
    "report_same_run_twice": (lambda w: ["report", w.run, w.run + os.sep], "is named twice (also as"),
    "rollout_run_json_corrupt": (lambda w: _rollout(w, run=_damaged(w, "rj-cut", "run.json", b'{"kind": "counterf')),
                                 "run.json is not valid JSON"),
    "rollout_routes_parquet_missing": (lambda w: _rollout(w, run=_damaged(w, "routes-gone", "routes.parquet")),
                                       "routes.parquet is missing; re-run its command with the same settings"),
    "rollout_tokens_parquet_corrupt": (lambda w: _rollout(w, run=_damaged(w, "tokens-cut", "tokens.parquet", b"PAR1 cut short")),
                                       "tokens.parquet is not a readable Parquet table"),
    "rollout_run_json_without_its_config": (lambda w: _rollout(w, run=_without_config(w, "model", "trajectories")),
                                            "lacks model, trajectories in its config, which rollout reads"),
    "router_update_routes_parquet_corrupt": (lambda w: ["router-update", "--model", w.model, "--counterfactual",
                                                        _damaged(w, "routes-cut", "routes.parquet", b"PAR1 cut"),
                                                        "--out", str(w.root / "ru")],
                                             "routes.parquet is not a readable Parquet table"),
    "router_update_heldout_not_a_run": (lambda w: ["router-update", "--model", w.model, "--counterfactual", w.run,
                                                   "--heldout-counterfactual", w.afile, "--out", str(w.root / "ru")],
                                        "a-file.txt is not a run folder (no run.json)"),
    # ---- issue 28: rollout --tokens FILE
    "tokens_file_empty_csv": (lambda w: _rollout(w, "--tokens", _text(w, "t-empty.csv", "")), "t-empty.csv: the file is empty"),
    "tokens_file_empty_jsonl": (lambda w: _rollout(w, "--tokens", _text(w, "t-empty.jsonl", "\n")),
                                "t-empty.jsonl: the file is empty"),
    "tokens_file_not_utf8": (lambda w: _rollout(w, "--tokens", _text(w, "t-latin.csv", "trajectory_id,position,layer\né,3,0\n"
                                                                      .encode("latin-1"))), "t-latin.csv line 2: not UTF-8 text"),
    "tokens_file_malformed_csv": (lambda w: _rollout(w, "--tokens", _text(w, "t-quote.csv", 'trajectory_id,position,layer\n"a,3,0\n')),
                                  "malformed CSV (unexpected end of data)"),
    "tokens_file_short_row": (lambda w: _rollout(w, "--tokens", _text(w, "t-short.csv", "trajectory_id,position,layer\na,3\n")),
                              "t-short.csv line 2: 2 field(s) where the header"),
    "tokens_file_null_position": (lambda w: _rollout(w, "--tokens", write_jsonl(w.root / "t-null.jsonl", [
        {"trajectory_id": "a", "position": None, "layer": 0}])), "position must be an integer >= 0"),
    "tokens_file_fractional_position": (lambda w: _rollout(w, "--tokens", write_jsonl(w.root / "t-frac.jsonl", [
        {"trajectory_id": "a", "position": 6.5, "layer": 0}])), "position must be an integer >= 0 (a token's index in its "
                                                                 "trajectory), got 6.5"),
    "tokens_file_negative_position": (lambda w: _rollout(w, "--tokens", _text(w, "t-neg.csv", "trajectory_id,position,layer\na,-3,0\n")),
                                      "t-neg.csv line 2: position must be an integer >= 0"),
    "tokens_file_layer_not_a_number": (lambda w: _rollout(w, "--tokens", _text(w, "t-layer.csv",
                                                                              "trajectory_id,position,layer\na,6,first\n")),
                                       "layer must be an integer (a layer the run scored), got 'first'"),
    "tokens_file_unknown_trajectory": (lambda w: _rollout(w, "--tokens", write_jsonl(w.root / "t-zz.jsonl", [
        {"trajectory_id": "zz", "position": 6, "layer": 0}])), "trajectory 'zz' was not scored by the counterfactual run "
                                                               "(it scored 2 trajectories: 'a', 'b')"),
    "tokens_file_position_out_of_range": (lambda w: _rollout(w, "--tokens", _text(w, "t-far.csv",
                                                                                 "trajectory_id,position,layer\na,999,0\n")),
                                          "was not scored by the counterfactual run (it scored positions"),
    "tokens_file_is_a_folder": (lambda w: _rollout(w, "--tokens", str(_foreign(w))), "is a folder; give a file of"),
    # ---- issue 28: seeds (0..2**32 - 1 everywhere)
    "counterfactual_seed_negative": (lambda w: _cf(w, "--seed", "-1"), "--seed must be an integer in 0..4294967295"),
    "rollout_seed_2_64": (lambda w: _rollout(w, "--seed", str(2**64)), "--seed must be an integer in 0..4294967295"),
    "isolate_seed_negative": (lambda w: _iso(w, "--seed", "-1"), "--seed must be an integer in 0..4294967295"),
    "semantic_seed_2_64": (lambda w: ["semantic-route", "--model", w.model, "--items", w.items, "--seed", str(2**64),
                                      "--out", str(w.root / "sr4")], "--seed must be an integer in 0..4294967295"),
    "router_update_seed_negative": (lambda w: ["router-update", "--model", w.model, "--counterfactual", w.run,
                                               "--seed", "-1", "--out", str(w.root / "ru")],
                                    "--seed must be an integer in 0..4294967295"),
    "passk_seed_2_64": (lambda w: ["passk", "--model", "demo", "--n", "2", "--samples", "2", "--k", "1", "--seed",
                                   str(2**64), "--out", str(w.root / "pk")], "--seed must be an integer in 0..4294967295"),
    "trajectories_seed_negative": (lambda w: ["trajectories", "--model", "demo", "--n", "2", "--seed", "-1",
                                              "--out", str(w.root / "t-seed.jsonl")],
                                   "argument --seed: expected a seed, an integer in 0..4294967295"),
    "verify_seed_2_64": (lambda w: ["verify", "--model", w.model, "--seed", str(2**64)],
                         "argument --seed: expected a seed, an integer in 0..4294967295"),
    "evaluate_seed_negative": (lambda w: ["evaluate", "--model", "demo", "--n", "2", "--seed", "-1"],
                               "argument --seed: expected a seed, an integer in 0..4294967295"),
    "train_demo_seed_2_64": (lambda w: ["train-demo", "--out", str(w.root / "td-seed"), "--steps", "1", "--seed", str(2**64)],
                             "argument --seed: expected a seed, an integer in 0..4294967295"),
    "demo_seed_negative": (lambda w: ["demo", "--out", str(w.root / "demo-new"), "--problems", "2", "--seed", "-1"],
                           "--seed must be an integer in 0..4294967295"),
    # ---- issue 28: temperatures and other numbers (nan, inf, out of range)
    "rollout_temperature_nan": (lambda w: _rollout(w, "--temperature", "nan"), "argument --temperature: expected a finite number"),
    "rollout_temperature_inf": (lambda w: _rollout(w, "--temperature", "inf"), "argument --temperature: expected a finite number"),
    "trajectories_temperature_zero": (lambda w: ["trajectories", "--model", "demo", "--n", "2", "--temperature", "0",
                                                 "--out", str(w.root / "t-temp.jsonl")],
                                      "argument --temperature: expected a positive sampling temperature, got '0'"),
    "trajectories_temperature_negative": (lambda w: ["trajectories", "--model", "demo", "--n", "2", "--temperature=-0.5",
                                                     "--out", str(w.root / "t-temp.jsonl")],
                                          "expected a positive sampling temperature, got '-0.5'"),
    "passk_temperature_inf": (lambda w: ["passk", "--model", "demo", "--n", "2", "--samples", "2", "--k", "1",
                                         "--temperature", "inf", "--out", str(w.root / "pk")], "expected a finite number"),
    "evaluate_temperature_nan": (lambda w: ["evaluate", "--model", "demo", "--n", "2", "--temperature", "nan"],
                                 "argument --temperature: expected a finite number, got 'nan'"),
    "demo_temperature_inf": (lambda w: ["demo", "--out", str(w.root / "demo-new"), "--problems", "2", "--temperature", "inf"],
                             "argument --temperature: expected a finite number, got 'inf'"),
    "counterfactual_gumbel_temperature_inf": (lambda w: _cf(w, "--gumbel-temperature", "inf"),
                                              "argument --gumbel-temperature: expected a finite number"),
    "router_update_lr_nan": (lambda w: ["router-update", "--model", w.model, "--counterfactual", w.run, "--lr", "nan",
                                        "--out", str(w.root / "ru")], "argument --lr: expected a finite number"),
    "memory_budget_infinite": (lambda w: _cf(w, "--memory-budget", "infGiB"), "expected a size such as 512MiB or 8GiB"),
    "export_digits_negative": (lambda w: ["export", w.run, "--digits", "-1"], "expected decimals, an integer in 0..15"),
    "verify_length_beyond_context": (lambda w: ["verify", "--model", w.model, "--length", "100000"],
                                     "--length 100000 is more than the model's context of 256 tokens"),
    "verify_length_negative": (lambda w: ["verify", "--model", w.model, "--length=-5"],
                               "argument --length: expected a positive integer, got -5"),
    # ---- issue 28: semantic-route layer sets
    "semantic_layer_twice_in_a_set": (lambda w: _semantic(w, "0,0;1"), "--layer-sets set 0,0 names layer 0 twice"),
    "semantic_same_set_twice": (lambda w: _semantic(w, "0,1;1,0"), "--layer-sets names the same set of layers twice (0,1 and 1,0)"),
    "semantic_layer_twice_through_a_negative_index": (lambda w: _semantic(w, "2,-1"),
                                                      "--layer-sets [2, -1] names layer 2 twice; give each layer once"),
    "semantic_same_set_through_a_negative_index": (lambda w: _semantic(w, "2;-1"),
                                                   "--layer-sets names the same set of layers twice (2 and -1)"),
    # ---- issue 28: problem files and other files where a folder or a file is expected
    "trajectories_problems_duplicate_id": (lambda w: ["trajectories", "--model", w.model, "--problems", _duplicate_problems(w),
                                                      "--out", str(w.root / "t-dup.jsonl")], "line 2: duplicate problem id 'p'"),
    "passk_problems_duplicate_id": (lambda w: ["passk", "--model", "demo", "--problems", _duplicate_problems(w),
                                               "--out", str(w.root / "pk")], "line 2: duplicate problem id 'p'"),
    "trajectories_problems_is_a_folder": (lambda w: ["trajectories", "--model", w.model, "--problems", str(_foreign(w)),
                                                     "--out", str(w.root / "t-dir.jsonl")], "is a folder; give a JSONL file"),
    "trajectory_file_is_a_folder": (lambda w: _cf(w, trajectories=str(_foreign(w))), "is a folder; give a JSONL file"),
    "router_delta_is_a_folder": (lambda w: _cf(w, "--router-delta", str(_foreign(w))),
                                 "is a folder; give the router_delta.safetensors file"),
    "evaluate_out_is_a_folder": (lambda w: ["evaluate", "--model", "demo", "--n", "2", "--out", str(_foreign(w))],
                                 "is a folder; give a file path"),
    "evaluate_record_without_a_card": (lambda w: ["evaluate", "--model", w.model, "--n", "2", "--record"],
                                       "has none: drop --record, or use --out FILE"),
    "train_demo_out_is_a_file": (lambda w: ["train-demo", "--out", w.afile, "--steps", "1"],
                                 "is an existing file; it is never replaced: choose a new folder"),
    "train_demo_out_is_a_users_folder": (lambda w: ["train-demo", "--out", str(_foreign(w)), "--steps", "1"],
                                         "is an existing folder that is not empty; it is never replaced"),
    # ---- issue 28: Ray, refused before Ray starts
    "ray_cpus_beyond_the_machine": (lambda w: _cf(w, "--ray", "local", "--cpus-per-worker", "100000"),
                                    "--cpus-per-worker 100000 is more CPUs than this machine has"),
    "ray_zero_cpus": (lambda w: _cf(w, "--ray", "local", "--cpus-per-worker", "0"), "--cpus-per-worker must be positive"),
    "ray_cpus_nan": (lambda w: _iso(w, "--ray", "local", "--cpus-per-worker", "nan"),
                     "argument --cpus-per-worker: expected a finite number"),
    "ray_more_gpus_than_the_machine": (lambda w: _cf(w, "--ray", "local", "--gpus-per-worker", "1", "--workers", "1000"),
                                       "--gpus-per-worker 1 for 1000 worker(s) needs 1000 GPU(s), but this machine has"),
    "ray_with_device_map": (lambda w: _cf(w, "--ray", "local", "--device-map", "auto"),
                            "--device-map and --ray together: Ray gives each actor its own GPUs"),
    "ray_address_without_port": (lambda w: _cf(w, "--ray", "localhost"), "--ray 'localhost' is not local, auto or a cluster address"),
    "ray_address_misspelt": (lambda w: _rollout(w, "--ray", "locla"), "--ray 'locla' is not local, auto or a cluster address"),
    "ray_unknown_host": (lambda w: _cf(w, "--ray", "nowhere.invalid:6379"), "no host 'nowhere.invalid' is known here"),
    "ray_nothing_listening": (lambda w: _cf(w, "--ray", "127.0.0.1:1"), "127.0.0.1:1 refused the connection"),
    "gpus_per_worker_without_ray": (lambda w: _cf(w, "--gpus-per-worker", "1"),
                                    "--gpus-per-worker sizes the Ray actors: give --ray"),
    "cpus_per_worker_without_ray": (lambda w: _iso(w, "--cpus-per-worker", "2"),
                                    "--cpus-per-worker sizes the Ray actors: give --ray"),
    # ---- issue 30: replay, the routes file (checked against the model and the trajectories)
    "replay_routes_of_another_k": (lambda w: _rp(w, routes=_rp_npz(w, "k3", k=3)),
                                   "3 experts per token (k) but this model's routers choose 2"),
    "replay_routes_of_another_layer_count": (lambda w: _rp(w, routes=_rp_npz(w, "layers4", layers=4)),
                                             "the routes have 4 layers; this model has 3 decoder layers"),
    "replay_routes_expert_out_of_range": (lambda w: _rp(w, routes=_rp_npz(w, "range", at=((2, 1, 0), 8))),
                                          "expert id 8 at position 2, layer 1 is out of range: this model has 8 "
                                          "experts (ids 0..7; -1 for none)"),
    "replay_routes_negative_expert": (lambda w: _rp(w, routes=_rp_npz(w, "negative", at=((1, 0, 1), -2))),
                                      "expert id -2 at position 1, layer 0 is out of range"),
    "replay_routes_expert_twice": (lambda w: _rp(w, routes=_rp_npz(w, "twice", at=((3, 2, 1), 0))),
                                   "names an expert twice ([0, 0])"),
    "replay_routes_some_slots_empty": (lambda w: _rp(w, routes=_rp_npz(w, "partial", at=((2, 0, 0), -1))),
                                       "position 2, layer 0 has experts [-1, 1], some -1 and some not"),
    "replay_routes_not_integers": (lambda w: _rp(w, routes=_rp_npz(w, "floats", dtype="float32")),
                                   "expert ids of dtype float32, not integers"),
    "replay_routes_for_unknown_trajectory": (lambda w: _rp(w, routes=_rp_npz(w, "unknown", extra_id="zz")),
                                             "routes for trajectory id(s) 'zz' that are not among the 2 trajectories"),
    "replay_routes_missing_a_trajectory": (lambda w: _rp(w, routes=_rp_npz(w, "only-a", drop="b")),
                                           "no routes for trajectory id(s) 'b'"),
    "replay_routes_misaligned": (lambda w: _rp(w, routes=_rp_npz(w, "short", rows={"a": 3})),
                                 "3 rows of routes but trajectory 'a' has 6 tokens: expected 6 (every token) or 5"),
    "replay_routes_one_npy_for_two_trajectories": (lambda w: _rp(w, routes=_rp_npy(w)),
                                                   "one .npy holds one trajectory's routes but 2 trajectories"),
    "replay_sglang_garbage_base64": (lambda w: _rp(w, routes=write_jsonl(w.root / "rp-b64.jsonl", [
        {"id": "a", "meta_info": {"routed_experts": "not base64 at all!"}}])), "routed_experts is not valid base64"),
    "replay_sglang_base64_of_another_model": (lambda w: _rp(w, routes=_rp_sglang(w, "rp-sg-k3.jsonl", k=3)),
                                              "is the file from another model?"),
    "replay_sglang_without_routed_experts": (lambda w: _rp(w, routes=write_jsonl(w.root / "rp-none.jsonl", [
        {"id": "a", "meta_info": {"prompt_tokens": 2}}]), fmt="sglang"), "no meta_info.routed_experts"),
    "replay_routes_malformed_jsonl": (lambda w: _rp(w, routes=write_jsonl(w.root / "rp-bad.jsonl", [
        {"id": "a", "routed_experts": [[[0, 1]] * 3] * 6}, "{oops"])), "rp-bad.jsonl line 2: malformed JSON"),
    "replay_routes_file_missing": (lambda w: _rp(w, routes=str(w.root / "no-routes.npz")),
                                   "no-routes.npz' does not exist"),
    "replay_routes_file_is_a_folder": (lambda w: _rp(w, routes=str(_foreign(w))), "is a folder; give the file"),
    "replay_routes_file_empty": (lambda w: _rp(w, routes=_text(w, "rp-empty.jsonl", "\n")), "no route records"),
    "replay_routes_unknown_name": (lambda w: _rp(w, routes=_text(w, "rp-routes.bin", "x")),
                                   "cannot tell the routes format from the name; give --routes-format"),
    "replay_routes_format_parquet_for_npz": (lambda w: _rp(w, fmt="parquet"),
                                             "is not a Parquet file (an .npz (zip) file); --routes-format parquet reads"),
    "replay_routes_format_sglang_for_npz": (lambda w: _rp(w, fmt="sglang"),
                                            "is not JSON Lines text (an .npz (zip) file); --routes-format sglang reads"),
    "replay_routes_format_export_for_plain_npz": (lambda w: _rp(w, fmt="npz-export"),
                                                  "not a file written by routelens --export"),
    "replay_routes_format_npy_for_jsonl": (lambda w: _rp(w, routes=_rp_sglang(w, "rp-sg.jsonl"), fmt="npy"),
                                           "is not an .npz file or an .npy file (a text file); --routes-format npy reads"),
    "replay_routes_format_unknown": (lambda w: _rp(w, fmt="trtllm"), "argument --routes-format: invalid choice"),
    "replay_routes_format_without_routes_from": (lambda w: _rp(w, "--compare-to", "batch=2", "--routes-format", "npy",
                                                               routes=None),
                                                 "--routes-format describes --routes-from; give --routes-from FILE"),
    # ---- issue 30: replay, the source and the settings
    "replay_routes_from_and_compare_to": (lambda w: _rp(w, "--compare-to", "batch=2"),
                                          "argument --compare-to: not allowed with argument --routes-from"),
    "replay_gguf_without_engine": (lambda w: _rp(w, "--gguf", w.afile), "--gguf is the file llama.cpp runs"),
    "replay_unknown_gguf_type": (lambda w: _rp(w, "--engine", "llama.cpp", "--gguf-type", "q3_k", routes=None),
                                 "argument --gguf-type: invalid choice: 'q3_k'"),
    "replay_neither_routes_nor_compare_to": (lambda w: _rp(w, routes=None),
                                             "one of the arguments --routes-from --engine --compare-to is required"),
    "replay_compare_to_int8": (lambda w: _rp(w, "--compare-to", "dtype=int8", routes=None),
                               "--compare-to must be dtype=bfloat16|float16|float32"),
    "replay_compare_to_batch_zero": (lambda w: _rp(w, "--compare-to", "batch=0", routes=None),
                                     "or batch=N (N >= 2), got 'batch=0'"),
    "replay_compare_to_batch_not_a_number": (lambda w: _rp(w, "--compare-to", "batch=x", routes=None),
                                             "got 'batch=x'"),
    "replay_compare_to_unknown_key": (lambda w: _rp(w, "--compare-to", "engine=vllm", routes=None),
                                      "got 'engine=vllm'"),
    "replay_compare_to_without_value": (lambda w: _rp(w, "--compare-to", "bfloat16", routes=None), "got 'bfloat16'"),
    "replay_margin_bins_zero": (lambda w: _rp(w, "--margin-bins", "0"),
                                "argument --margin-bins: expected a positive integer, got 0"),
    "replay_max_trajectories_zero": (lambda w: _rp(w, "--max-trajectories", "0"),
                                     "argument --max-trajectories: expected a positive integer, got 0"),
    "replay_bins_out_of_order": (lambda w: _rp(w, "--fragile", "0.95"), "need 0 <= --fragile (0.95) <= --confident"),
    "replay_trajectory_file_malformed": (lambda w: _rp(w, trajectories=write_jsonl(w.root / "rp-m.jsonl", [
        json.dumps(GOOD), "{oops"])), "rp-m.jsonl line 2: malformed JSON"),
    "replay_trajectory_file_missing": (lambda w: _rp(w, trajectories=str(w.root / "no-traj.jsonl")), "does not exist"),
    # ---- issue 30: replay, where it writes (--out, --export)
    "replay_out_is_its_trajectories": (lambda w: _rp(w, out=_rp_files(w)["trajectories"]), "is this command's input"),
    "replay_out_is_its_routes_file": (lambda w: _rp(w, out=_rp_files(w)["routes"]), "is this command's input"),
    "replay_out_is_a_file": (lambda w: _rp(w, out=w.afile), "is an existing file, not a folder"),
    "replay_out_is_a_users_folder": (lambda w: _rp(w, "--overwrite", out=str(_foreign(w))), "not a routelens run"),
    "replay_out_holds_another_kind": (lambda w: _rp(w, "--overwrite", out=_set_kind(w, "rp-kind")),
                                      "holds a routelens isolation run, not a replay run"),
    "replay_export_not_npz": (lambda w: _rp(w, "--export", str(w.root / "rp-export.json")),
                              "rp-export.json: the export is an .npz file; give a path ending in .npz"),
    "replay_export_is_its_trajectories": (lambda w: _rp(w, "--export", _rp_files(w)["trajectories"]),
                                          "is this command's input"),
    "replay_export_is_its_routes_file": (lambda w: _rp(w, "--export", _rp_files(w)["routes"]),
                                         "is this command's input"),
    "replay_export_is_a_folder": (lambda w: _rp(w, "--export", str(_foreign(w))), "is a folder; give a file path"),
    "replay_export_is_a_users_file": (lambda w: _rp(w, "--export", _text(w, "rp-mine.npz", "mine"), "--overwrite"),
                                      "exists and was not written by routelens"),
    "replay_export_is_the_out_folder": (lambda w: _rp(w, "--export", str(w.root / "rp-new.npz"),
                                                      out=str(w.root / "rp-new.npz")),
                                        "--export and --out name the same path"),
    "replay_export_with_compare_to": (lambda w: _rp(w, "--compare-to", "batch=2", "--export",
                                                    str(w.root / "rp-export.npz"), routes=None),
                                      "--export writes an engine's routes for training; give them with --routes-from"),
    "replay_export_of_bad_routes": (lambda w: _rp(w, "--export", str(w.root / "rp-export.npz"),
                                                  routes=_rp_npz(w, "partial", at=((2, 0, 0), -1))),
                                    "some -1 and some not"),
    "replay_export_with_a_bad_out": (lambda w: _rp(w, "--export", str(w.root / "rp-export.npz"), out=w.afile),
                                     "is an existing file, not a folder"),
}


# ---- issue 30: replay's files (built when a case first needs them)
def _rp_files(w):
    """Two trajectories of token ids ('a': 6 tokens, 'b': 5) and good routes for them in an
    .npz keyed by trajectory id ([tokens, 3 layers, k=2] of the tiny OLMoE: 8 experts)."""
    if not hasattr(w, "rp"):
        import numpy as np

        trajectories = write_jsonl(w.root / "rp-traj.jsonl", [
            {"id": "a", "input_ids": [1, 5, 6, 7, 8, 9], "completion_start": 2},
            {"id": "b", "input_ids": [1, 7, 6, 5, 4], "completion_start": 2}])
        routes = str(w.root / "rp-routes.npz")
        np.savez(routes, **_rp_arrays())
        w.rp = {"trajectories": trajectories, "routes": routes}
    return w.rp


def _rp_arrays(k=2, layers=3):
    import numpy as np

    return {tid: np.tile(np.arange(k, dtype=np.int32), (tokens, layers, 1)) for tid, tokens in (("a", 6), ("b", 5))}


def _rp_npz(w, name, k=2, layers=3, at=None, dtype=None, extra_id=None, drop=None, rows=None):
    """A routes .npz like the good one with one thing changed."""
    import numpy as np

    path = w.root / f"rp-{name}.npz"
    if not path.exists():
        arrays = _rp_arrays(k, layers)
        if at is not None:
            (t, layer, slot), value = at
            arrays["a"][t, layer, slot] = value
        if dtype:
            arrays = {key: array.astype(dtype) for key, array in arrays.items()}
        if extra_id:
            arrays[extra_id] = arrays["a"]
        if drop:
            del arrays[drop]
        for key, count in (rows or {}).items():
            arrays[key] = arrays[key][:count]
        np.savez(path, **arrays)
    return str(path)


def _rp_npy(w):
    import numpy as np

    path = w.root / "rp-one.npy"
    np.save(path, _rp_arrays()["a"])
    return str(path)


def _rp_sglang(w, name, k=2):
    """SGLang records (base64 int32 of every token but the last), of a model with `k` experts per token."""
    import base64

    import numpy as np

    arrays = _rp_arrays(k)
    return write_jsonl(w.root / name, [{"id": tid, "meta_info": {"routed_experts": base64.b64encode(
        np.ascontiguousarray(array[:-1], dtype="<i4").tobytes()).decode("ascii")}} for tid, array in arrays.items()])


def _rp(w, *extra, routes="good", trajectories=None, out=None, fmt=None):
    files = _rp_files(w)
    argv = ["replay", "--model", w.model, "--trajectories", trajectories or files["trajectories"]]
    if routes is not None:
        argv += ["--routes-from", files["routes"] if routes == "good" else routes]
    if fmt:
        argv += ["--routes-format", fmt]
    return [*argv, "--out", out or str(w.root / "rp-new"), "--no-progress", "--bootstrap-resamples", "50", *extra]


def _damaged(w, name, file, content=None):
    """A copy of the complete run with `file` replaced by `content` (bytes), or removed (None)."""
    target = w.root / name
    if not target.exists():
        shutil.copytree(w.run, target)
        if content is None:
            os.remove(target / file)
        else:
            (target / file).write_bytes(content)
    return str(target)


def _without_config(w, *keys):
    """A copy of the complete run whose run.json lacks `keys` in its config."""
    target = w.root / ("no-" + "-".join(keys))
    if not target.exists():
        shutil.copytree(w.run, target)
        state = json.loads((target / "run.json").read_text())
        for key in keys:
            del state["config"][key]
        (target / "run.json").write_text(json.dumps(state))
    return str(target)


def _text(w, name, content):
    path = w.root / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def _duplicate_problems(w):
    return write_jsonl(w.root / "problems-dup.jsonl", [{"id": "p", "prompt": "Q:1+2=", "answer": "3"},
                                                       {"id": "p", "prompt": "Q:2+2=", "answer": "4"}])


def _semantic(w, layer_sets):
    items = write_jsonl(w.root / "items-2.jsonl", [{"id": f"{d}{i}", "domain": d, "prompt": "Q:1+2=", "target": "3"}
                                                   for d in ("x", "y") for i in range(4)])
    return ["semantic-route", "--model", w.model, "--items", items, "--layer-sets", layer_sets, "--no-accuracy",
            "--out", str(w.root / "sr-new")]


def _another_graft(w):
    """A grafted folder, then another graft (other experts) asked into the same --out."""
    out = str(w.root / "g-taken")
    if not os.path.exists(out):
        assert main(["graft", "--recipient", w.model, "--donor", w.model, "--experts", "0:1=0:2", "--out", out]) == 0
    return ["graft", "--recipient", w.model, "--donor", w.model, "--experts", "0:1=0:3", "--out", out]


def _graft(w, *extra, recipient=None, experts="0:1=0:2", out=None):
    return ["graft", "--recipient", recipient or w.model, "--donor", w.model, "--experts", experts,
            "--out", out or str(w.root / "g-new"), *extra]


def _model_with_config(w, name, config: bytes):
    """The saved model with its config.json replaced by `config`."""
    folder = w.root / name
    if not folder.exists():
        shutil.copytree(w.model, folder)
        (folder / "config.json").write_bytes(config)
    return str(folder)


def _folder_with(w, name, file, text):
    (w.root / name).mkdir(exist_ok=True)
    (w.root / name / file).write_text(text)
    return str(w.root / name)


def _graft_without_files(w):
    """A grafted folder whose graft.json lists no files (as an earlier routelens wrote it)."""
    out = w.root / "g-unlisted"
    if not out.exists():
        assert main(_graft(w, out=str(out))) == 0
        record = json.loads((out / "graft.json").read_text())
        del record["files"]
        (out / "graft.json").write_text(json.dumps(record))
    return str(out)


def _rollout(w, *extra, run=None, model=None):
    return ["rollout", "--model", model or w.model, "--counterfactual", run or w.run, "--out", str(w.root / "ro"),
            "--no-progress", *extra]


def _foreign(w):
    """A user's folder with files in it (no run.json)."""
    folder = w.root / "my-notes"
    folder.mkdir(exist_ok=True)
    (folder / "notes.txt").write_text("keep me")
    return folder


def _set_kind(w, name):
    folder = _copy_run(w, name)
    state = json.loads((w.root / name / "run.json").read_text())
    state["kind"] = "isolation"
    (w.root / name / "run.json").write_text(json.dumps(state))
    return folder


def _inputs_inside(w):
    """A counterfactual run folder that also holds the trajectory file the command reads,
    re-run with another config and --overwrite (the `--out .` accident)."""
    folder = w.root / "with-inputs"
    if not folder.exists():
        shutil.copytree(w.run, folder)
        shutil.copy(w.good, folder / "mine.jsonl")
    return _cf(w, "--overwrite", "--routes", "3", trajectories=str(folder / "mine.jsonl"), out=str(folder))


def test_the_catalogue_has_at_least_40_cases():
    assert len(CASES) >= 150


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2(case, world, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    build, message = CASES[case]
    argv = build(world)
    before = {p: os.path.getmtime(p) for p in _user_files(world)}
    code = None
    with _catch_exit() as caught:
        code = main(argv)
    code = caught.code if code is None else code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("routelens: error: ")
    assert message in err, err
    for path, mtime in before.items():    # the user's files are all still there, untouched
        assert os.path.exists(path) and os.path.getmtime(path) == mtime
    for out in ("out-new", "iso-new", "pk", "pk2", "pk3", "ru", "ru2", "ro", "sr-new", "sr4", "demo-new", "td-seed",
                "rp-new"):
        assert not os.path.exists(world.root / out / "summary.json")   # nothing passed off as complete
    assert not os.path.exists(world.root / "rp-export.npz")           # nor an export of routes that were refused


def _user_files(w):
    names = ["good.jsonl", "my-notes/notes.txt", "with-inputs/mine.jsonl", "a-file.txt", "bad-run-json/run.json",
             "problems.jsonl", "run/run.json", "run/summary.json", "run/routes.parquet", "run/tokens.parquet",
             "rp-traj.jsonl", "rp-routes.npz", "rp-mine.npz"]
    return [str(w.root / n) for n in names if (w.root / n).exists()]


class _catch_exit:
    code = None

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is SystemExit:   # argparse usage errors exit through SystemExit
            self.code = value.code
            return True
        return False


def test_unreachable_hub_id_fails_at_once(world, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.perf_counter()
    assert main(["inspect", "--model", "nobody/no-such-moe"]) == 2
    assert time.perf_counter() - started < scaled(8)          # no minute of retries
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "not in the local Hugging Face cache and the hub cannot be reached" in err


@pytest.mark.parametrize("file, content, message", [
    ("run.json", b"{not json", "run.json is not valid JSON"),
    ("summary.json", None, "summary.json is missing"),
    ("summary.json", b"[]", "holds no summary"),
    ("routes.parquet", b"PAR1 cut short", "routes.parquet is not a readable Parquet table"),
])
def test_read_run_names_the_damaged_file(world, file, content, message):
    """rl.read_run reads through the same reader as the commands: a damaged file is named, in one line."""
    import routelens as rl

    folder = _damaged(world, f"api-{file}-{content is None}-{len(content or b'')}", file, content)
    with pytest.raises(rl.RouteLensError, match=message) as refused:
        rl.read_run(folder)   # every file it holds is checked here, the tables too
    assert len(str(refused.value).splitlines()) == 1
    assert "re-run" in str(refused.value)


def test_read_only_out_is_refused(world, capsys, monkeypatch):
    """Root ignores permissions, so the refusal is exercised by denying write access in os.access."""
    existing, fresh = str(world.root / "read-only-run"), str(world.root / "read-only-parent" / "run")
    os.makedirs(existing, exist_ok=True)
    os.makedirs(os.path.dirname(fresh), exist_ok=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if "read-only" in str(path) and mode & os.W_OK
                        else real_access(path, mode))
    assert main(_cf(world, out=existing)) == 2
    assert f"--out {existing} is not writable" in capsys.readouterr().err
    assert main(_cf(world, out=fresh)) == 2
    assert "read-only-parent is not writable" in capsys.readouterr().err
    assert main(["trajectories", "--model", "demo", "--out", os.path.join(existing, "t.jsonl")]) == 2
    assert "is not writable; choose another path" in capsys.readouterr().err


def test_overwrite_replaces_only_routelens_outputs(world, capsys):
    """--overwrite of the same kind with another config: the run's own outputs go, the user's files stay."""
    folder = world.root / "replace-me"
    shutil.copytree(world.run, folder)
    (folder / "my-analysis.ipynb").write_text("{}")
    assert main(_cf(world, "--overwrite", "--routes", "3", out=str(folder))) == 0
    assert (folder / "my-analysis.ipynb").read_text() == "{}"
    state = json.loads((folder / "run.json").read_text())
    assert state["config"]["routes"] == 3 and state["status"] == "complete" and len(state["sessions"]) == 1


def interruptible():
    """In the child: Ctrl-C as a terminal delivers it. A test run started in the background
    by a non-interactive shell passes SIGINT on as ignored, and Python then never raises
    KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def test_ctrl_c_leaves_run_json_with_the_units_done(world, cli_env, tmp_path):
    records = [{"id": f"k{i}", "prompt": f"Q:{i}*{i}=", "completion": f"A:{i}*{i}={i * i}#{i * i}"} for i in range(30)]
    trajectories = write_jsonl(tmp_path / "many.jsonl", records)
    out = tmp_path / "interrupted"
    process = subprocess.Popen([PYTHON, "-m", "routelens", *_cf(world, "--engine", "reference", "--routes", "8",
                                                                 trajectories=trajectories, out=str(out))],
                               env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=interruptible)
    wait_until(lambda: len(unit_parts(out, "tokens-")) >= 2, 120, "2 units done")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=scaled(60))
    assert process.returncode == 130
    assert "re-run the same command to resume" in err and "Traceback" not in err
    state = json.loads((out / "run.json").read_text())
    done = len(list((out / "parts").glob("tokens-*.parquet")))
    assert state["status"] == "running" and 2 <= state["units_done"] == done < 30
    assert state["sessions"][-1]["units_done"] == done


def test_ctrl_c_in_trajectories_says_how_to_resume(cli_env, tmp_path):
    process = subprocess.Popen([PYTHON, "-m", "routelens", "trajectories", "--model", "demo", "--n", "400",
                                "--samples-per-problem", "8", "--out", str(tmp_path / "t.jsonl")],
                               env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=interruptible)
    announced = ""                               # said up front, before any sampling
    for _ in range(50):
        announced = process.stderr.readline()
        if "re-run the same command to resume" in announced or not announced:
            break
    assert f"kept as they are done in {tmp_path / 't.jsonl.run'}" in announced
    process.send_signal(signal.SIGINT)            # while it loads or samples: either way it says how to resume
    _, err = process.communicate(timeout=scaled(60))
    assert process.returncode == 130, err
    assert "re-run the same command to resume" in err and "Traceback" not in err
    assert not (tmp_path / "t.jsonl").exists()           # the file is written once every problem is done


@pytest.mark.parametrize("command, option", [("counterfactual", "--trajectories"), ("isolate", "--items"),
                                             ("semantic-route", "--items"), ("passk", "--problems"),
                                             ("replay", "--trajectories"), ("replay", "--routes-from")])
def test_a_malformed_input_file_fails_before_the_model_loads(command, option, world, tmp_path, capsys, monkeypatch):
    import importlib

    module = importlib.import_module({"counterfactual": "routelens.analyses.counterfactual.command",
                                      "isolate": "routelens.analyses.isolation.command",
                                      "semantic-route": "routelens.analyses.semantic_routing.command",
                                      "passk": "routelens.analyses.passk.command",
                                      "replay": "routelens.analyses.replay.command"}[command])

    def no_load(args):
        raise AssertionError("the model loaded before the input file was checked")

    monkeypatch.setattr(module, "load_lens", no_load)
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"id": "a"', "x"])
    extra = ["--layers", "0"] if command == "counterfactual" else []
    if command == "replay":   # the other of its two input files, a good one
        other = "--routes-from" if option == "--trajectories" else "--trajectories"
        extra = [other, _rp_files(world)["routes" if other == "--routes-from" else "trajectories"]]
    assert main([command, "--model", world.model, option, bad, *extra, "--out", str(tmp_path / "o")]) == 2
    assert "malformed JSON" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["replay_routes_format_parquet_for_npz", "replay_routes_format_sglang_for_npz",
                                  "replay_routes_format_export_for_plain_npz", "replay_sglang_garbage_base64",
                                  "replay_routes_file_is_a_folder", "replay_routes_unknown_name",
                                  "replay_export_not_npz", "replay_export_is_a_users_file", "replay_export_is_a_folder",
                                  "replay_export_with_compare_to", "replay_export_is_its_trajectories",
                                  "replay_routes_format_without_routes_from", "replay_compare_to_int8"])
def test_replay_refuses_a_bad_routes_file_or_export_before_the_model_loads(case, world, capsys, monkeypatch):
    """What can be told of the routes file and --export without the model (the file's form,
    its format, the export's path) is refused before a model of minutes loads."""
    from routelens.analyses.replay import command

    def no_load(args):
        raise AssertionError("the model loaded before the routes file and --export were checked")

    monkeypatch.setattr(command, "load_lens", no_load)
    build, message = CASES[case]
    assert main(build(world)) == 2
    assert message in capsys.readouterr().err
