"""Engine routes in (SGLang, vLLM, .npy/.npz, Parquet) and out (the training export): routes
captured from Hugging Face itself written in each engine's layout read back equal, injected
flips survive exactly, and every bad input is a one-line error naming what is wrong."""

from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import routelens as rl
from routelens.data.engine_routes import EngineRoutes
from routelens.data.engine_routes_io import HEADER_KEY, ROUTE_FORMAT_HELP, ROUTE_FORMATS, export_routes, read_routes
from routelens.data.trajectories import Trajectory
from routelens.errors import RouteLensError, SettingError

PAIRS = [("Q:3+4=A:", "3+4=7#7"), ("Q:9*2=A:", "9*2=18#18"), ("Q:12-5=A:", "12-5=7#7")]


# ---------------------------------------------------------------------------- what the engines write
def sglang_records(captured, trajectories, *, all_but_last=True, layers_all=None, start=0):
    """SGLang /generate records: meta_info.routed_experts = base64 of int32 [rows, layers, k]
    flattened, rows [start, seqlen - 1) (all but the last token), the trajectory id as rid."""
    records = []
    for t in trajectories:
        rows = captured[t.id][start:len(t.input_ids) - 1 if all_but_last else None]
        if layers_all is not None:
            rows = layers_all(rows)
        meta = {"id": t.id, "routed_experts": base64.b64encode(rows.astype("<i4").tobytes()).decode("ascii"),
                "prompt_tokens": t.completion_start, "completion_tokens": len(t.input_ids) - t.completion_start}
        if start:
            meta["routed_experts_start_len"] = start
        records.append({"text": "...", "meta_info": meta})
    return records


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def write_parquet(path, arrays, positions_from=0):
    rows = [{"trajectory_id": key, "position": position - positions_from, "layer": layer, "experts": list(route)}
            for key, array in arrays.items() for position in range(positions_from, array.shape[0])
            for layer, route in enumerate(array[position].tolist())]
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def npy_b64(array) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------- the demo's own routes
@pytest.fixture(scope="module")
def demo():
    """The demo model, three trajectories and the routes its Hugging Face forward chose on
    each: [T, 4 MoE layers, k=4] per trajectory id."""
    lens = rl.load("demo")
    trajectories = rl.trajectories_from_text(lens.tokenizer, PAIRS)
    captured = {}
    for t in trajectories:
        with lens.capture() as routes, torch.no_grad():
            lens.model(torch.tensor([t.input_ids]))
        captured[t.id] = np.stack([routes[layer].experts[0].numpy() for layer in lens.moe_layers], axis=1)
    return lens, trajectories, captured


def engine_view(captured):
    """What an engine that routes every token but the last reports, as EngineRoutes holds it."""
    out = {}
    for key, array in captured.items():
        array = array.copy()
        array[-1] = -1
        out[key] = array
    return out


def test_routes_exported_from_hugging_face_read_back_equal_in_every_format(demo, tmp_path):
    lens, trajectories, captured = demo
    short = {t.id: captured[t.id][:-1] for t in trajectories}
    files = {
        "sglang": write_jsonl(tmp_path / "sglang.jsonl", sglang_records(captured, trajectories)),
        "vllm-npz": str(tmp_path / "vllm.npz"),
        "vllm-openai": write_jsonl(tmp_path / "vllm.jsonl", [
            {"id": key, "choices": [{"routed_experts": array.tolist()}]} for key, array in short.items()]),
        "vllm-b64": str(tmp_path / "vllm.json"),
        "npz": str(tmp_path / "full.npz"),
        "parquet": write_parquet(tmp_path / "routes.parquet", captured),
    }
    np.savez(files["vllm-npz"], **{key: array.astype(np.uint16) for key, array in short.items()})
    (tmp_path / "vllm.json").write_text(json.dumps([{"trajectory_id": key, "routed_experts": npy_b64(array)}
                                                    for key, array in short.items()]))
    np.savez(files["npz"], **captured)
    formats = {"sglang": "sglang", "vllm-npz": "vllm", "vllm-openai": "vllm", "vllm-b64": "vllm", "npz": "npy",
               "parquet": "parquet"}
    for name, path in files.items():
        for given in (formats[name], "auto"):
            routes = rl.read_routes(path, lens, trajectories, format=given)
            assert routes.layers == lens.moe_layers and routes.top_k == lens.top_k, name
            expected = engine_view(captured) if name.startswith(("sglang", "vllm")) else captured
            assert list(routes.experts) == [t.id for t in trajectories]
            for key in expected:
                np.testing.assert_array_equal(routes.experts[key], expected[key], err_msg=f"{name} {key}")
            # auto reads vLLM's .npz as plain arrays ("npy"): the same reading
            assert routes.meta["format"] == (formats[name] if given != "auto" or name != "vllm-npz" else "npy")
            assert routes.meta["last_token_missing"] == (len(trajectories) if expected is not captured else 0)
    # one .npy for one trajectory
    first = trajectories[0]
    np.save(tmp_path / "one.npy", captured[first.id])
    one = rl.read_routes(tmp_path / "one.npy", lens, [first], format="npy")
    np.testing.assert_array_equal(one.experts[first.id], captured[first.id])


def test_injected_flips_survive_the_round_trip_exactly(demo, tmp_path):
    lens, trajectories, captured = demo
    rng = np.random.default_rng(0)
    flipped, injected = {key: array.copy() for key, array in captured.items()}, set()
    for t in trajectories:
        for _ in range(5):
            position = int(rng.integers(0, len(t.input_ids) - 1))
            layer, slot = int(rng.integers(0, 4)), int(rng.integers(0, 4))
            route = flipped[t.id][position, layer]
            outside = [e for e in range(lens.num_experts) if e not in route]
            route[slot] = int(rng.choice(outside))   # another expert: the route's set changes
            injected.add((t.id, position, layer))
    sglang = write_jsonl(tmp_path / "flips.jsonl", sglang_records(flipped, trajectories))
    np.savez(tmp_path / "flips.npz", **flipped)
    for path, given in ((sglang, "sglang"), (str(tmp_path / "flips.npz"), "npy")):
        routes = rl.read_routes(path, lens, trajectories, format=given)
        found = set()
        for t in trajectories:
            read, natural = routes.experts[t.id], captured[t.id]
            for position, layer in zip(*np.nonzero((read[:-1] != natural[:-1]).any(axis=-1))):
                found.add((t.id, int(position), int(layer)))
            np.testing.assert_array_equal(read[:-1], flipped[t.id][:-1])
        assert found == injected, given


def test_export_round_trip_header_and_path_policy(demo, tmp_path):
    lens, trajectories, captured = demo
    source = write_jsonl(tmp_path / "sglang.jsonl", sglang_records(captured, trajectories))
    routes = rl.read_routes(source, lens, trajectories, format="sglang")
    out = str(tmp_path / "out" / "routes.npz")
    assert rl.export_routes(routes, out, inputs=[source]) == out
    with np.load(out) as npz:
        header = json.loads(npz[HEADER_KEY].tobytes())
        assert sorted(npz.files) == sorted([HEADER_KEY, *routes.experts])
        for key, array in routes.experts.items():
            assert npz[key].dtype == np.int16
            np.testing.assert_array_equal(npz[key], array)
    assert header["layers"] == lens.moe_layers and header["k"] == 4 and header["num_experts"] == 16
    assert header["model"] == "demo" and header["source"] == "sglang" and header["missing"] == -1
    assert header["num_hidden_layers"] == 4 and header["prompt_included"] is True
    assert header["trajectories"] == {t.id: len(t.input_ids) for t in trajectories}
    back = rl.read_routes(out, lens, trajectories, format="npz-export")
    assert back.source == "sglang" and back.meta["format"] == "npz-export" and back.meta["header"] == header
    for key in routes.experts:
        np.testing.assert_array_equal(back.experts[key], routes.experts[key])
    assert rl.read_routes(out, lens, trajectories).meta["format"] == "npz-export"   # auto
    # path policy: never replaced without overwrite, never an input, never a file routelens did not write
    with pytest.raises(RouteLensError, match="pass --overwrite"):
        export_routes(routes, out)
    export_routes(routes, out, overwrite=True)
    with pytest.raises(SettingError, match="an output never replaces an input"):
        export_routes(routes, source.replace(".jsonl", ".npz"), inputs=[str(tmp_path)])
    foreign = tmp_path / "foreign.npz"
    foreign.write_bytes(b"mine")
    with pytest.raises(RouteLensError, match="not written by routelens"):
        export_routes(routes, str(foreign), overwrite=True)
    with pytest.raises(RouteLensError, match="ending in .npz"):
        export_routes(routes, str(tmp_path / "routes.bin"))
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_prompt_excluded_and_start_len_alignments(demo, tmp_path):
    lens, trajectories, captured = demo
    # an engine asked for the completion only: rows from the first completion token
    records = []
    for t in trajectories:
        rows = captured[t.id][t.completion_start:-1]
        records.append({"trajectory_id": t.id, "meta_info": {
            "routed_experts": base64.b64encode(rows.astype("<i4").tobytes()).decode()}})
    path = write_jsonl(tmp_path / "completion.jsonl", records)
    routes = rl.read_routes(path, lens, trajectories, format="sglang", prompt_included=False)
    for t in trajectories:
        read = routes.experts[t.id]
        assert (read[:t.completion_start] == -1).all() and (read[-1] == -1).all()
        np.testing.assert_array_equal(read[t.completion_start:-1], captured[t.id][t.completion_start:-1])
        assert routes.meta["covered"][t.id] == [t.completion_start, len(t.input_ids) - 1]
    with pytest.raises(RouteLensError, match="check prompt_included"):
        rl.read_routes(path, lens, trajectories, format="sglang", prompt_included=True)
    # SGLang's routed_experts_start_len: an absolute first row
    path = write_jsonl(tmp_path / "start.jsonl", sglang_records(captured, trajectories, start=3))
    routes = rl.read_routes(path, lens, trajectories, format="sglang")
    t = trajectories[0]
    assert (routes.experts[t.id][:3] == -1).all()
    np.testing.assert_array_equal(routes.experts[t.id][3:-1], captured[t.id][3:-1])
    # Parquet positions counted from the first completion token
    completion = {t.id: captured[t.id][t.completion_start:] for t in trajectories}
    path = write_parquet(tmp_path / "completion.parquet", completion)
    routes = rl.read_routes(path, lens, trajectories, format="parquet", prompt_included=False)
    np.testing.assert_array_equal(routes.experts[t.id][t.completion_start:], captured[t.id][t.completion_start:])


def test_every_decoder_layer_or_moe_layers_only_map_to_the_moe_layers(tmp_path):
    """A model with a dense first layer (tiny DeepSeek-V3: 4 decoder layers, MoE 1..3, k=2 of 8)."""
    from routelens.models.registry import adapter_for
    from routelens.models.tiny import build_tiny_model

    adapter = adapter_for(build_tiny_model("deepseek_v3", seed=0))
    assert adapter.num_layers == 4 and adapter.moe_layers == [1, 2, 3] and adapter.top_k == 2
    [t] = rl.trajectories_from_ids([[1, 5, 6, 7, 8, 9]], completion_start=3)
    rng = np.random.default_rng(1)
    moe = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(3)]) for _ in range(6)])
    for dense_fill in (0, -1):
        every = np.full((5, 4, 2), dense_fill)
        every[:, 1:] = moe[:5]
        (tmp_path / "all.jsonl").write_text(json.dumps({"id": t.id, "meta_info": {
            "routed_experts": base64.b64encode(every.astype("<i4").tobytes()).decode()}}) + "\n")
        routes = read_routes(str(tmp_path / "all.jsonl"), adapter, [t], format="sglang")
        assert routes.layers == [1, 2, 3] and routes.meta["layer_axis"] == ["all decoder layers"]
        np.testing.assert_array_equal(routes.experts[t.id][:5], moe[:5])
    np.savez(tmp_path / "moe.npz", **{t.id: moe})
    routes = read_routes(str(tmp_path / "moe.npz"), adapter, [t], format="npy")
    assert routes.meta["layer_axis"] == ["MoE layers"]
    np.testing.assert_array_equal(routes.experts[t.id], moe)
    every = np.zeros((6, 4, 2), dtype=np.int64)
    every[:, 1:] = moe
    every[2, 0] = [3, 4]
    np.savez(tmp_path / "dense.npz", **{t.id: every})
    with pytest.raises(RouteLensError, match="decoder layer 0 is dense in this model"):
        read_routes(str(tmp_path / "dense.npz"), adapter, [t], format="npy")
    long = pd.DataFrame([{"trajectory_id": t.id, "position": p, "layer": layer, "experts": list(every[p, layer])}
                         for p in range(6) for layer in range(4)])
    long.to_parquet(tmp_path / "dense.parquet")
    with pytest.raises(RouteLensError, match="layer 0, a dense layer"):
        read_routes(str(tmp_path / "dense.parquet"), adapter, [t], format="parquet")
    long[long.layer > 0].to_parquet(tmp_path / "moe.parquet")
    routes = read_routes(str(tmp_path / "moe.parquet"), adapter, [t], format="parquet")
    np.testing.assert_array_equal(routes.experts[t.id], moe)


# ---------------------------------------------------------------------------- bad inputs (no model: quick)
# the demo's router structure (checked against rl.load("demo") in test_fake_adapter_is_the_demos)
DEMO_SHAPE = SimpleNamespace(num_layers=4, moe_layers=[0, 1, 2, 3], top_ks={0: 4, 1: 4, 2: 4, 3: 4}, num_experts=16,
                             config=SimpleNamespace(_name_or_path="demo"))
TRAJS = [Trajectory("a", list(range(1, 9)), completion_start=4), Trajectory("b", list(range(1, 7)), completion_start=3)]


def good(tokens: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([np.stack([rng.choice(16, 4, replace=False) for _ in range(4)]) for _ in range(tokens)])


def test_fake_adapter_is_the_demos(demo):
    lens = demo[0]
    assert (lens.adapter.num_layers, lens.moe_layers, lens.top_ks, lens.num_experts) == (
        DEMO_SHAPE.num_layers, DEMO_SHAPE.moe_layers, DEMO_SHAPE.top_ks, DEMO_SHAPE.num_experts)


def _sglang(tmp_path, payloads, extra=None):
    records = [{"id": key, "meta_info": {"routed_experts": payload, **(extra or {})}} for key, payload in payloads]
    return write_jsonl(tmp_path / "bad.jsonl", records)


def _b64(array) -> str:
    return base64.b64encode(np.asarray(array).astype("<i4").tobytes()).decode()


def _npz(tmp_path, arrays):
    np.savez(tmp_path / "bad.npz", **arrays)
    return str(tmp_path / "bad.npz")


def _parquet(tmp_path, rows, **types):
    pd.DataFrame(rows).astype(types).to_parquet(tmp_path / "bad.parquet") if types else \
        pd.DataFrame(rows).to_parquet(tmp_path / "bad.parquet")
    return str(tmp_path / "bad.parquet")


def _rows(array, key="a"):
    return [{"trajectory_id": key, "position": p, "layer": layer, "experts": [int(e) for e in array[p, layer]]}
            for p in range(array.shape[0]) for layer in range(array.shape[1])]


def _with(array, index, value):
    array = array.copy()
    array[index] = value
    return array


BAD = {
    "wrong shape": (lambda p: _npz(p, {"a": good(8)[:, 0], "b": good(6)}), "npy", r"shape \(8, 4\), not \[tokens"),
    "wrong k": (lambda p: _npz(p, {"a": good(8)[..., :3], "b": good(6)}), "npy", r"3 experts per token \(k\)"),
    "out-of-range id": (lambda p: _npz(p, {"a": _with(good(8), (2, 1, 0), 16), "b": good(6)}), "npy",
                        "expert id 16 at position 2, layer 1 is out of range"),
    "id below -1": (lambda p: _npz(p, {"a": _with(good(8), (0, 0, 0), -2), "b": good(6)}), "npy",
                    "expert id -2 .* out of range"),
    "expert twice": (lambda p: _npz(p, {"a": _with(good(8), (3, 2, 1), good(8)[3, 2, 0]), "b": good(6)}), "npy",
                     "position 3, layer 2 names an expert twice"),
    "misaligned length": (lambda p: _npz(p, {"a": good(5), "b": good(6)}), "npy",
                          "5 rows of routes but trajectory 'a' has 8 tokens: expected 8 .* or 7"),
    "too long": (lambda p: _npz(p, {"a": good(9), "b": good(6)}), "npy", "9 rows of routes"),
    "unknown id": (lambda p: _npz(p, {"a": good(8), "b": good(6), "zz": good(3)}), "npy",
                   "'zz' that are not among the 2 trajectories"),
    "missing id": (lambda p: _npz(p, {"a": good(8)}), "npy", "no routes for trajectory id\\(s\\) 'b'"),
    "wrong layer count": (lambda p: _npz(p, {"a": good(8)[:, :3], "b": good(6)}), "npy",
                          "3 layers; this model has 4 decoder layers, of which 4 are MoE"),
    "float dtype": (lambda p: _npz(p, {"a": good(8).astype(float), "b": good(6)}), "npy",
                    "dtype float64, not integers"),
    "bool dtype": (lambda p: _npz(p, {"a": good(8) > 3, "b": good(6)}), "npy", "dtype bool, not integers"),
    "object array": (lambda p: (np.savez(p / "o.npz", a=np.array([1, "x"], dtype=object)), str(p / "o.npz"))[1],
                     "npy", "object arrays"),
    "not an npz": (lambda p: (p.joinpath("x.npz").write_bytes(b"garbage"), str(p / "x.npz"))[1], "npy",
                   "not an .npz file"),
    "npy for two": (lambda p: (np.save(p / "one.npy", good(8)), str(p / "one.npy"))[1], "npy",
                    "one .npy holds one trajectory's routes but 2"),
    "garbage base64": (lambda p: _sglang(p, [("a", "not*base64!"), ("b", _b64(good(5)))]), "sglang",
                       "not valid base64"),
    "base64 of odd bytes": (lambda p: _sglang(p, [("a", base64.b64encode(b"abc").decode()), ("b", _b64(good(5)))]),
                            "sglang", "decodes to 3 bytes, not whole int32"),
    "sglang length": (lambda p: _sglang(p, [("a", _b64(good(4))), ("b", _b64(good(5)))]), "sglang",
                      "holds 64 ids .* but trajectory 'a' has 8 tokens"),
    "sglang not a multiple": (lambda p: _sglang(p, [("a", _b64(np.arange(10))), ("b", _b64(good(5)))]), "sglang",
                              "holds 10 ids, not a whole number"),
    "sglang no routes": (lambda p: write_jsonl(p / "bad.jsonl", [{"id": "a", "meta_info": {}}]), "sglang",
                         "no meta_info.routed_experts; launch SGLang with --enable-return-routed-experts"),
    "sglang no id": (lambda p: write_jsonl(p / "bad.jsonl", [{"meta_info": {"routed_experts": _b64(good(7))}}]),
                     "sglang", "no trajectory id"),
    "duplicate record": (lambda p: _sglang(p, [("a", _b64(good(7))), ("a", _b64(good(7))), ("b", _b64(good(5)))]),
                         "sglang", "trajectory 'a' again"),
    "token counts": (lambda p: _sglang(p, [("a", _b64(good(7))), ("b", _b64(good(5)))],
                                       {"prompt_tokens": 3, "completion_tokens": 3}), "sglang",
                     "engine's request had 3 prompt \\+ 3 completion tokens but trajectory 'a' has 8"),
    "start len outside": (lambda p: _sglang(p, [("a", _b64(good(7))), ("b", _b64(good(5)))],
                                            {"routed_experts_start_len": 99}), "sglang",
                          "routed_experts_start_len 99 is not a position"),
    "malformed jsonl": (lambda p: (p.joinpath("m.jsonl").write_text('{"id": "a", "meta_info": \n'),
                                   str(p / "m.jsonl"))[1], "sglang", "line 1: malformed JSON"),
    "ragged lists": (lambda p: write_jsonl(p / "r.jsonl", [{"id": "a", "routed_experts": [[[1, 2, 3, 4]], [[1]]]},
                                                            {"id": "b", "routed_experts": good(5).tolist()}]),
                     "vllm", "ragged"),
    "vllm no routes": (lambda p: write_jsonl(p / "r.jsonl", [{"id": "a", "choices": [{"text": "x"}]}]), "vllm",
                       "no routed_experts; run vLLM with enable_return_routed_experts"),
    "vllm two choices": (lambda p: write_jsonl(p / "r.jsonl", [{"id": "a", "choices": [{}, {}]}]), "vllm",
                         "2 choices in one record"),
    "vllm bad npy base64": (lambda p: write_jsonl(p / "r.jsonl", [{"id": "a", "routed_experts": "AAAA"}]), "vllm",
                            "not of a saved numpy array"),
    "parquet columns": (lambda p: _parquet(p, [{"trajectory_id": "a", "position": 0, "layer": 0}]), "parquet",
                        "no column\\(s\\) experts"),
    "parquet k": (lambda p: _parquet(p, [{"trajectory_id": "a", "position": 0, "layer": 0, "experts": [1, 2]}]),
                  "parquet", "a row has 2 experts \\(k\\)"),
    "parquet float experts": (lambda p: _parquet(p, [{"trajectory_id": "a", "position": 0, "layer": 0,
                                                      "experts": [1.0, 2.0, 3.0, 4.0]}]), "parquet",
                              "not lists of integer expert ids"),
    "parquet duplicate row": (lambda p: _parquet(p, _rows(good(8)) + _rows(good(8))[:1] + _rows(good(6), "b")),
                              "parquet", "more than one row for position 0, layer 0"),
    "parquet missing row": (lambda p: _parquet(p, _rows(good(8))[1:] + _rows(good(6), "b")), "parquet",
                            "no row for position 0, layer 0"),
    "parquet null experts": (lambda p: _parquet(p, [{"trajectory_id": "a", "position": 0, "layer": 0, "experts": None},
                                                    {"trajectory_id": "a", "position": 1, "layer": 0,
                                                     "experts": [1, 2, 3, 4]}]), "parquet",
                             "column 'experts' has empty \\(null\\) values"),
    "parquet null position": (lambda p: _parquet(p, [{"trajectory_id": "a", "position": None, "layer": 0,
                                                      "experts": [1, 2, 3, 4]}], position="Int64"), "parquet",
                              "column 'position' has empty"),
    "parquet layer": (lambda p: _parquet(p, [{"trajectory_id": "a", "position": 0, "layer": 7,
                                              "experts": [1, 2, 3, 4]}]), "parquet", "layer 7 is not a decoder layer"),
    "export of another model": (lambda p: _foreign_export(p), "npz-export", "exported for layers \\[1, 2\\]"),
    "npz without header": (lambda p: _npz(p, {"a": good(8), "b": good(6)}), "npz-export",
                           "no __header__.json entry"),
    "missing file": (lambda p: str(p / "nothing.jsonl"), "sglang", "does not exist"),
}


def _foreign_export(tmp_path):
    routes = EngineRoutes({"a": good(8)[:, :2], "b": good(6)[:, :2]}, layers=[1, 2], top_k=4, source="npy")
    return export_routes(routes, str(tmp_path / "foreign.npz"))


@pytest.mark.quick
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_one_line_error(case, tmp_path):
    make, given, message = BAD[case]
    path = make(tmp_path)
    with pytest.raises(RouteLensError, match=message) as caught:
        read_routes(path, DEMO_SHAPE, TRAJS, format=given)
    assert "\n" not in str(caught.value)


@pytest.mark.quick
def test_good_input_of_the_catalogue_reads(tmp_path):
    """The catalogue's good arrays pass (the errors above come from the one bad part)."""
    a, b = good(8), good(6)
    routes = read_routes(_npz(tmp_path, {"a": a, "b": b}), DEMO_SHAPE, TRAJS, format="npy")
    np.testing.assert_array_equal(routes.experts["a"], a)
    routes = read_routes(_sglang(tmp_path, [("a", _b64(a[:-1])), ("b", _b64(b[:-1]))]), DEMO_SHAPE, TRAJS,
                         format="sglang")
    assert routes.meta["last_token_missing"] == 2 and (routes.experts["b"][-1] == -1).all()
    partial = _with(a, (1, 1, 3), -1)   # an empty slot is allowed
    routes = read_routes(_parquet(tmp_path, _rows(partial) + _rows(b, "b")), DEMO_SHAPE, TRAJS, format="parquet")
    np.testing.assert_array_equal(routes.experts["a"], partial)


@pytest.mark.quick
def test_formats_are_listed_with_help():
    assert ROUTE_FORMATS == ("sglang", "vllm", "npy", "parquet", "npz-export")
    assert all(ROUTE_FORMAT_HELP[name] for name in ROUTE_FORMATS)
    with pytest.raises(RouteLensError, match="unknown routes format 'trt'"):
        read_routes("x.jsonl", DEMO_SHAPE, TRAJS, format="trt")


def test_api_arguments_are_checked(demo, tmp_path):
    lens, trajectories, captured = demo
    with pytest.raises(SettingError, match="`format` must be one of"):
        rl.read_routes(str(tmp_path / "x.npz"), lens, trajectories, format="trt")
    with pytest.raises(SettingError, match="`lens` must be a Lens"):
        rl.read_routes(str(tmp_path / "x.npz"), "demo", trajectories)
    with pytest.raises(SettingError, match="`prompt_included` must be"):
        rl.read_routes(str(tmp_path / "x.npz"), lens, trajectories, prompt_included="yes")
    # trajectories from a file
    file = tmp_path / "t.jsonl"
    file.write_text("".join(json.dumps({"id": t.id, "input_ids": t.input_ids, "completion_start": t.completion_start})
                            + "\n" for t in trajectories))
    np.savez(tmp_path / "r.npz", **captured)
    routes = rl.read_routes(tmp_path / "r.npz", lens, str(file))
    assert routes.meta["format"] == "npy" and set(routes.experts) == set(captured)
