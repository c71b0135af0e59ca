"""Routes an inference engine chose, read from its files into `EngineRoutes`, and written
back out for a trainer (issue 30: the routing replay audit; Rollout Routing Replay, R3).

Formats (`ROUTE_FORMATS`; `ROUTE_FORMAT_HELP` says each in a line):

- "sglang": JSON Lines, one record per trajectory, as SGLang's `/generate` returns it with
  `return_routed_experts` (server flag `--enable-return-routed-experts`):
  `{"id": ..., "meta_info": {"routed_experts": "<base64>", ...}}`. The payload is the
  base64 of int32 values, flattened [tokens, layers, k]: SGLang's capturer keeps a buffer
  of `num_hidden_layers` x `num_experts_per_tok` per token, so the layer axis is every
  decoder layer (dense layers never written: 0 from the zero-filled buffer), and it returns
  the rows `[routed_experts_start_len, seqlen - 1)`: every token but the last (the last
  sampled token is never fed through the model). The record's id: `trajectory_id`, else
  `id`, else `meta_info.id` (SGLang's request id: send `rid` = the trajectory id). A
  `routed_experts_start_len` in the record or its meta_info is the absolute first row;
  `prompt_tokens` + `completion_tokens` in meta_info, where given, must be the
  trajectory's length. The OpenAI-compatible endpoints' `sgl_ext.routed_experts` and a
  top-level `routed_experts` are read too.
- "vllm": vLLM's `CompletionOutput.routed_experts` (`enable_return_routed_experts=True`): a
  numpy array [seqlen - 1, num_hidden_layers, k] (uint16, or int32 past 65535 experts;
  rows of every token but the last; dense layers 0) saved as an .npz keyed by trajectory
  id, or JSON / JSON Lines records `{"id": ..., "routed_experts": ...}` where the value is
  nested lists (the OpenAI server's `choices[i].routed_experts`; a record with one choice
  is read from there) or the base64 of an `np.save` (the disaggregated generate endpoint).
- "npy": a plain .npy [tokens, layers, k] for the one trajectory given, or an .npz of such
  arrays keyed by trajectory id.
- "parquet": rows (trajectory_id, position, layer, experts): `layer` a decoder-layer index,
  `experts` a list of k expert ids; `position` the token index (from the first completion
  token when `prompt_included` is False).
- "npz-export": what `export_routes` writes (read back to replay or to audit).

Alignment. Position t of a trajectory's routes is token t of its `input_ids` (the prompt
included): what the router chose when token t was the input. With `prompt_included` False
the file's first row is the first completion token's (`completion_start`). A file may give
every token's route, or every token's but the last (what SGLang and vLLM return): the last
token's route is then -1 (not reported), which no replay result depends on: the route at
position t changes the prediction of token t + 1 only, and the last token predicts nothing
that is scored. Positions a file does not cover (the prompt when `prompt_included` is
False) are -1 too; `meta["covered"]` says which rows were reported.

Layers. The layer axis is either every decoder layer of the model (what the engines
return) or its MoE layers only, in order; both map to the model's MoE layers. A dense
layer's column must be all -1 or all 0 (the engines' zero-filled buffer): anything else
means the layer axis is not the model's.

Every check is against the model and the trajectories, and a failed one is a one-line
`RouteLensError` that says what is wrong and how to fix it: layer count, k, expert ids in
range (or -1), an expert repeated within a route, a non-integer dtype, the number of rows
against the trajectory's tokens, unknown, missing and duplicate trajectory ids, a
malformed file.

Export. `export_routes` writes an .npz with one int16 array [tokens, MoE layers, k] per
trajectory id (-1: no route) and the header as the JSON text of a uint8 array under the
key `__header__.json` (model, layers as decoder-layer indices, k, num_experts, alignment,
source): one self-describing file that `numpy.load` opens without pickle, the per-sequence
[tokens, layers, top-k] index tensor that R3 trainers replay (Megatron-Core's
RouterReplay takes MoE layers only; verl and vLLM carry every decoder layer: the header's
`layers` and `num_hidden_layers` say how to expand).

Examples:
    >>> ROUTE_FORMATS
    ('sglang', 'vllm', 'npy', 'parquet', 'npz-export')
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from routelens.data.engine_routes import ALIGNMENT, EngineRoutes
from routelens.errors import RouteLensError

ROUTE_FORMAT_HELP = {
    "sglang": "SGLang /generate records (JSONL): meta_info.routed_experts, base64 int32 [tokens, layers, k]",
    "vllm": "vLLM routed_experts [tokens, layers, k]: .npz keyed by trajectory id, or JSON/JSONL records "
            "{id, routed_experts}",
    "npy": ".npy [tokens, layers, k] for one trajectory, or .npz of such arrays keyed by trajectory id",
    "parquet": "Parquet rows (trajectory_id, position, layer, experts: list of k ids)",
    "npz-export": "what routelens --export writes: .npz of int16 [tokens, MoE layers, k] with a __header__.json",
}
ROUTE_FORMATS = tuple(ROUTE_FORMAT_HELP)
HEADER_KEY = "__header__.json"
EXPORT_FORMAT = "routelens-engine-routes"
EXPORT_VERSION = 1
_SHOWN = 5   # ids named in a message at most


@dataclass
class _Model:
    """What the checks need of the model."""

    name: str | None
    num_layers: int
    moe_layers: list[int]
    top_ks: dict[int, int]
    num_experts: int

    @property
    def k(self) -> int:
        return max(self.top_ks.values())

    def describe_layers(self) -> str:
        return (f"{self.num_layers} decoder layers, of which {len(self.moe_layers)} are MoE "
                f"({_short(self.moe_layers)})")


def _model(lens_or_adapter) -> _Model:
    adapter = getattr(lens_or_adapter, "adapter", lens_or_adapter)
    if not hasattr(adapter, "moe_layers") or not hasattr(adapter, "top_ks"):
        raise RouteLensError(f"expected a Lens (routelens.load(...)) or its adapter, got "
                             f"{type(lens_or_adapter).__name__}")
    loaded = getattr(lens_or_adapter, "loaded", None)
    name = getattr(loaded, "spec", None) or getattr(adapter.config, "_name_or_path", None) or None
    return _Model(name=None if name is None else str(name), num_layers=int(adapter.num_layers),
                  moe_layers=list(adapter.moe_layers), top_ks=dict(adapter.top_ks),
                  num_experts=int(adapter.num_experts))


def _short(values, limit: int = 8) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def _ids(values) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:_SHOWN])
    return shown + (f" and {len(values) - _SHOWN} more" if len(values) > _SHOWN else "")


# ---------------------------------------------------------------------------- one array
def _as_int_array(value, where: str) -> np.ndarray:
    """`value` (an array, or nested lists) as an integer array; a ragged list, a float, bool
    or object dtype is a one-line error."""
    if not isinstance(value, np.ndarray):
        try:
            value = np.asarray(value)
        except ValueError:
            raise RouteLensError(f"{where}: the routes are ragged lists, not a [tokens, layers, k] array; give "
                                 "k expert ids for every token and layer") from None
    if value.dtype == object:
        raise RouteLensError(f"{where}: the routes are ragged lists or hold non-numbers, not a [tokens, layers, k] "
                             "integer array; give k integer expert ids for every token and layer")
    if value.dtype == bool or not np.issubdtype(value.dtype, np.integer):
        if value.size == 0 and value.dtype == np.float64:   # [] from JSON
            return value.astype(np.int64)
        raise RouteLensError(f"{where}: expert ids of dtype {value.dtype}, not integers; give integer expert ids "
                             "(-1 for none)")
    return value


def _layer_columns(array: np.ndarray, model: _Model, where: str) -> tuple[np.ndarray, str]:
    """The MoE layers' columns of `array` [rows, layers, k] whose layer axis is every decoder
    layer or the MoE layers only; the dense layers' columns are checked empty."""
    layers = array.shape[1]
    moe = len(model.moe_layers)
    if layers == moe:
        return array, "MoE layers" if moe != model.num_layers else "all decoder layers (every one MoE)"
    if layers == model.num_layers:
        dense = [layer for layer in range(model.num_layers) if layer not in model.moe_layers]
        for layer in dense:
            column = array[:, layer]
            if not ((column == -1).all() or (column == 0).all()):
                raise RouteLensError(
                    f"{where}: decoder layer {layer} is dense in this model but its routes name experts "
                    f"({_short(np.unique(column))}); a dense layer must be all -1 (or the engines' 0 fill): "
                    "is the file from another model?")
        return array[:, model.moe_layers], "all decoder layers"
    raise RouteLensError(
        f"{where}: the routes have {layers} layers; this model has {model.describe_layers()}: give routes for "
        "every decoder layer (dense ones -1) or for the MoE layers only, from this model")


def _check_values(array: np.ndarray, model: _Model, where: str, offset: int) -> None:
    """Expert ids in range or -1, none repeated within a route, slots beyond a layer's own k
    empty. `array` [rows, MoE layers, k]; row r is position offset + r."""
    bad = (array < -1) | (array >= model.num_experts)
    if bad.any():
        row, column, slot = (int(i) for i in np.argwhere(bad)[0])
        raise RouteLensError(
            f"{where}: expert id {int(array[row, column, slot])} at position {offset + row}, layer "
            f"{model.moe_layers[column]} is out of range: this model has {model.num_experts} experts (ids 0.."
            f"{model.num_experts - 1}; -1 for none); is the file from another model?")
    ordered = np.sort(array, axis=-1)
    repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    if repeated.any():
        row, column, _ = (int(i) for i in np.argwhere(repeated)[0])
        raise RouteLensError(
            f"{where}: the route at position {offset + row}, layer {model.moe_layers[column]} names an expert twice "
            f"({array[row, column].tolist()}); a route is k distinct experts (-1 for an empty slot): a zero-filled "
            "row means the engine did not record this token")
    for column, layer in enumerate(model.moe_layers):
        k = model.top_ks[layer]
        if k < array.shape[2] and (array[:, column, k:] != -1).any():
            raise RouteLensError(f"{where}: layer {layer} chooses {k} experts per token but the routes fill slots "
                                 f"beyond {k}; leave them -1")


def _place(array, trajectory, model: _Model, offset: int, where: str, notes: dict) -> np.ndarray:
    """`array` [rows, layers, k] (rows from position `offset`) checked against the model and
    the trajectory, as the trajectory's [T, MoE layers, k] (-1 where not reported)."""
    array = _as_int_array(array, where)
    if array.ndim != 3:
        raise RouteLensError(f"{where}: routes of shape {tuple(array.shape)}, not [tokens, layers, k]; give one "
                             "[tokens, layers, k] array per trajectory")
    if array.shape[2] != model.k:
        raise RouteLensError(f"{where}: {array.shape[2]} experts per token (k) but this model's routers choose "
                             f"{model.k}; give the top-{model.k} routes of this model")
    array, layer_axis = _layer_columns(array, model, where)
    tokens, rows = len(trajectory.input_ids), array.shape[0]
    if offset + rows not in (tokens, tokens - 1):
        start = "" if offset == 0 else f" from position {offset}"
        raise RouteLensError(
            f"{where}: {rows} rows of routes{start} but trajectory {trajectory.id!r} has {tokens} tokens: expected "
            f"{tokens - offset} (every token) or {tokens - offset - 1} (all but the last, as SGLang and vLLM return); "
            "check prompt_included and that the file and the trajectories are of the same sequences")
    _check_values(array, model, where, offset)
    out = np.full((tokens, len(model.moe_layers), model.k), -1, dtype=np.int64)
    out[offset:offset + rows] = array
    notes["layer_axis"].add(layer_axis)
    notes["covered"][trajectory.id] = [offset, offset + rows]
    if offset + rows == tokens - 1:
        notes["last_token_missing"] += 1
    return out


# ---------------------------------------------------------------------------- files
def _exists(path: str) -> None:
    if os.path.isdir(path):
        raise RouteLensError(f"routes file {path!r} is a folder; give the file")
    if not os.path.isfile(path):
        raise RouteLensError(f"routes file {path!r} does not exist")


def _json_records(path: str) -> list[dict]:
    """Records of a JSON file (a list of objects, or one object) or a JSON Lines file."""
    from routelens.data.trajectories import read_jsonl, read_utf8_text

    _exists(path)
    if path.endswith(".json"):
        text = read_utf8_text(path, "JSON", "a JSON or JSONL file of route records")
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as error:
            raise RouteLensError(f"{path}: malformed JSON ({error.msg} at line {error.lineno}); give a JSON list "
                                 "of route records or a JSONL file") from None
        loaded = loaded if isinstance(loaded, list) else [loaded]
        records = []
        for number, record in enumerate(loaded, start=1):
            if not isinstance(record, dict):
                raise RouteLensError(f"{path} record {number}: expected a JSON object, got {type(record).__name__}")
            records.append({**record, "_where": f"{path} record {number}"})
    else:
        records = read_jsonl(path, "routes file")
    if not records:
        raise RouteLensError(f"{path}: no route records in the file")
    return records


def _record_id(record: dict, where: str) -> str:
    meta = record.get("meta_info") if isinstance(record.get("meta_info"), dict) else {}
    for value in (record.get("trajectory_id"), record.get("id"), meta.get("id")):
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
    raise RouteLensError(f"{where}: no trajectory id; give each record a \"trajectory_id\" (or \"id\") naming its "
                         "trajectory")


def _offset(record: dict, trajectory, prompt_included: bool, where: str) -> int:
    meta = record.get("meta_info") if isinstance(record.get("meta_info"), dict) else {}
    start = meta.get("routed_experts_start_len", record.get("routed_experts_start_len"))
    if start is None:
        return 0 if prompt_included else trajectory.completion_start
    if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start < len(trajectory.input_ids):
        raise RouteLensError(f"{where}: routed_experts_start_len {start!r} is not a position of trajectory "
                             f"{trajectory.id!r} ({len(trajectory.input_ids)} tokens)")
    return start


def _check_token_counts(record: dict, trajectory, where: str) -> None:
    meta = record.get("meta_info") if isinstance(record.get("meta_info"), dict) else {}
    prompt, completion = meta.get("prompt_tokens"), meta.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int) and prompt + completion != len(trajectory.input_ids):
        raise RouteLensError(
            f"{where}: the engine's request had {prompt} prompt + {completion} completion tokens but trajectory "
            f"{trajectory.id!r} has {len(trajectory.input_ids)}: the trajectory must be the engine's own token "
            "ids (prompt and completion, as sent and sampled)")


def _b64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise RouteLensError(f"{where}: routed_experts is not valid base64; give the string the engine returned, "
                             "unchanged") from None


def _sglang_payload(record: dict, where: str):
    meta = record.get("meta_info") if isinstance(record.get("meta_info"), dict) else {}
    ext = record.get("sgl_ext") if isinstance(record.get("sgl_ext"), dict) else {}
    for value in (meta.get("routed_experts"), ext.get("routed_experts"), record.get("routed_experts")):
        if value is not None:
            return value
    raise RouteLensError(f"{where}: no meta_info.routed_experts; launch SGLang with --enable-return-routed-experts "
                         "and send return_routed_experts=true, and keep meta_info in each record")


def _sglang_flat(payload: str, where: str) -> np.ndarray:
    """SGLang's base64 payload as its flat int32 values."""
    raw = _b64(payload, where)
    if len(raw) % 4:
        raise RouteLensError(f"{where}: routed_experts decodes to {len(raw)} bytes, not whole int32 values; give "
                             "the base64 of SGLang's int32 routes, unchanged")
    return np.frombuffer(raw, dtype="<i4")


def _sglang_rows(payload, trajectory, model: _Model, offset: int, where: str):
    """SGLang's flat int32 values as [rows, layers, k], the layer count (every decoder layer
    or the MoE layers) chosen by which one fits the trajectory's length."""
    if isinstance(payload, np.ndarray) and payload.dtype == np.dtype("<i4") and payload.ndim == 1:
        flat = payload
    else:
        flat = _as_int_array(payload, where)
        if flat.ndim == 3:
            return flat
        if flat.ndim != 1:
            raise RouteLensError(f"{where}: routed_experts of shape {tuple(flat.shape)}; give SGLang's flat "
                                 "base64 int32 routes or a [tokens, layers, k] list")
    tokens = len(trajectory.input_ids)
    shapes = []
    for layers in dict.fromkeys((model.num_layers, len(model.moe_layers))):
        per_row = layers * model.k
        if flat.size % per_row == 0:
            rows = flat.size // per_row
            shapes.append((rows, layers))
            if offset + rows in (tokens, tokens - 1):
                return flat.reshape(rows, layers, model.k)
    if shapes:
        found = " or ".join(f"{rows} tokens x {layers} layers" for rows, layers in shapes)
        raise RouteLensError(
            f"{where}: routed_experts holds {flat.size} ids ({found} x k={model.k}) but trajectory {trajectory.id!r} "
            f"has {tokens} tokens{'' if offset == 0 else f' from position {offset}'}: expected {tokens - offset} or "
            f"{tokens - offset - 1} rows; check prompt_included and that the record is of this trajectory")
    raise RouteLensError(
        f"{where}: routed_experts holds {flat.size} ids, not a whole number of tokens x layers x k for this model "
        f"({model.describe_layers()}, k={model.k}); is the file from another model?")


def _vllm_payload(record: dict, where: str):
    value = record.get("routed_experts")
    if value is None:
        choices = record.get("choices")
        if isinstance(choices, list) and len(choices) == 1 and isinstance(choices[0], dict):
            value = choices[0].get("routed_experts")
        elif isinstance(choices, list) and len(choices) > 1:
            raise RouteLensError(f"{where}: {len(choices)} choices in one record; give one record per trajectory "
                                 "(one choice each), with its own trajectory id")
    if value is None:
        raise RouteLensError(f"{where}: no routed_experts; run vLLM with enable_return_routed_experts=True and "
                             "keep each output's routed_experts in its record")
    if isinstance(value, str):   # the disaggregated generate endpoint: base64 of np.save
        try:
            return np.load(io.BytesIO(_b64(value, where)), allow_pickle=False)
        except (ValueError, OSError, EOFError):
            raise RouteLensError(f"{where}: routed_experts is base64 but not of a saved numpy array (np.save); "
                                 "give the engine's string unchanged, or nested lists") from None
    return value


def _npz_arrays(path: str, where: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as error:
        if "pickle" in str(error):
            raise RouteLensError(f"{where}: holds object arrays; give integer arrays [tokens, layers, k]") from None
        raise RouteLensError(f"{where}: not a readable .npz ({error}); give an .npz of integer arrays keyed by "
                             "trajectory id") from None
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise RouteLensError(f"{where}: not a readable .npz ({error}); give an .npz of integer arrays keyed by "
                             "trajectory id") from None


def _npy_array(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as error:
        if "pickle" in str(error):
            raise RouteLensError(f"{path}: holds an object array; give an integer array [tokens, layers, k]") from None
        raise RouteLensError(f"{path}: not a readable .npy ({error})") from None
    except (OSError, EOFError) as error:
        raise RouteLensError(f"{path}: not a readable .npy ({error})") from None


def _parquet_table(path: str):
    """The rows of a Parquet routes file, their columns checked (model-free)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for a bad file
        raise RouteLensError(f"{path}: not a readable Parquet file ({_one_line(error)})") from None
    needed = ["trajectory_id", "position", "layer", "experts"]
    missing = [name for name in needed if name not in table.column_names]
    if missing:
        raise RouteLensError(f"{path}: no column(s) {', '.join(missing)}; give rows (trajectory_id, position, layer, "
                             "experts: a list of k expert ids)")
    for name in ("position", "layer"):
        if not pa.types.is_integer(table.schema.field(name).type):
            raise RouteLensError(f"{path}: column {name!r} is {table.schema.field(name).type}, not integers")
    experts_type = table.schema.field("experts").type
    if not (pa.types.is_list(experts_type) or pa.types.is_large_list(experts_type)
            or pa.types.is_fixed_size_list(experts_type)) or not pa.types.is_integer(experts_type.value_type):
        raise RouteLensError(f"{path}: column 'experts' is {experts_type}, not lists of integer expert ids")
    if table.num_rows == 0:
        raise RouteLensError(f"{path}: no route rows in the file")
    for name in needed:
        if table.column(name).null_count:
            raise RouteLensError(f"{path}: column {name!r} has empty (null) values; give every row all four fields")
    return table


def _read_parquet(table, path: str, model: _Model, by_id: dict, prompt_included: bool) -> dict[str, tuple]:
    """trajectory id -> ([rows, MoE layers, k] array, offset, where) from long-format rows."""
    import pyarrow.compute as pc

    ids = np.asarray([str(v) for v in table.column("trajectory_id").to_pylist()], dtype=object)
    positions = table.column("position").to_numpy().astype(np.int64)
    layers = table.column("layer").to_numpy().astype(np.int64)
    column = table.column("experts").combine_chunks()
    lengths = np.unique(pc.list_value_length(column).to_numpy(zero_copy_only=False))
    if lengths.tolist() != [model.k]:
        bad = next(int(length) for length in lengths if length != model.k)
        raise RouteLensError(f"{path}: a row has {bad} experts (k) but this model's routers choose {model.k}; give "
                             f"k={model.k} expert ids per row (-1 for none)")
    values = pc.list_flatten(column)
    if values.null_count:
        raise RouteLensError(f"{path}: an expert id is empty (null); give -1 for a slot without an expert")
    experts = values.to_numpy(zero_copy_only=False).astype(np.int64).reshape(-1, model.k)
    if (positions < 0).any():
        raise RouteLensError(f"{path}: negative position {int(positions[positions < 0][0])}; positions count tokens "
                             "from 0")
    outside = (layers < 0) | (layers >= model.num_layers)
    if outside.any():
        raise RouteLensError(f"{path}: layer {int(layers[outside][0])} is not a decoder layer of this model "
                             f"({model.describe_layers()}); `layer` is a decoder-layer index")
    dense = ~np.isin(layers, model.moe_layers)
    if dense.any():
        named = dense & ~((experts == -1).all(axis=1) | (experts == 0).all(axis=1))
        if named.any():
            raise RouteLensError(f"{path}: rows at layer {int(layers[named][0])}, a dense layer of this model, name "
                                 f"experts; the MoE layers are {_short(model.moe_layers)}: is the file from another "
                                 "model?")
    column_of = np.full(model.num_layers, -1, dtype=np.int64)
    column_of[model.moe_layers] = np.arange(len(model.moe_layers))
    kept = np.flatnonzero(~dense)
    names, first, inverse = np.unique(ids[kept], return_index=True, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(names) + 1))
    grouped = {str(names[g]): kept[order[bounds[g]:bounds[g + 1]]] for g in np.argsort(first)}   # in file order
    out = {}
    for trajectory_id, rows in grouped.items():
        where = f"{path} trajectory {trajectory_id!r}"
        count = int(positions[rows].max()) + 1
        filled = np.zeros((count, len(model.moe_layers)), dtype=np.int64)
        array = np.full((count, len(model.moe_layers), model.k), -1, dtype=np.int64)
        columns = column_of[layers[rows]]
        np.add.at(filled, (positions[rows], columns), 1)
        if (filled > 1).any():
            position, column = (int(i) for i in np.argwhere(filled > 1)[0])
            raise RouteLensError(f"{where}: more than one row for position {position}, layer "
                                 f"{model.moe_layers[column]}; give one row per (trajectory, position, layer)")
        if (filled == 0).any():
            position, column = (int(i) for i in np.argwhere(filled == 0)[0])
            raise RouteLensError(f"{where}: no row for position {position}, layer {model.moe_layers[column]}; give "
                                 "every MoE layer's route at every position from 0 (experts -1 where none)")
        array[positions[rows], columns] = experts[rows]
        trajectory = by_id.get(trajectory_id)
        offset = 0 if prompt_included or trajectory is None else trajectory.completion_start
        out[trajectory_id] = (array, offset, where)
    return out


def _parse_export_header(arrays: dict, path: str) -> dict:
    raw = arrays.pop(HEADER_KEY, None)
    if raw is None:
        raise RouteLensError(f"{path}: no {HEADER_KEY} entry: not a file written by routelens --export; read it "
                             "with format 'npy' (arrays keyed by trajectory id)")
    try:
        header = json.loads(np.asarray(raw, dtype=np.uint8).tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise RouteLensError(f"{path}: {HEADER_KEY} is not JSON text; the file is damaged: export it again") from None
    if not isinstance(header, dict) or header.get("format") != EXPORT_FORMAT:
        raise RouteLensError(f"{path}: {HEADER_KEY} is not a routelens route export's header")
    if header.get("version") != EXPORT_VERSION:
        raise RouteLensError(f"{path}: route export version {header.get('version')!r}; this routelens reads version "
                             f"{EXPORT_VERSION}: export it again with this version")
    return header


def _check_export_header(header: dict, path: str, model: _Model) -> dict:
    if header.get("layers") != model.moe_layers or header.get("k") != model.k or \
            header.get("num_experts") not in (None, model.num_experts):
        raise RouteLensError(
            f"{path}: exported for layers {header.get('layers')}, k={header.get('k')}, {header.get('num_experts')} "
            f"experts (model {header.get('model')!r}); this model's MoE layers are {_short(model.moe_layers)}, "
            f"k={model.k}, {model.num_experts} experts: read it with the model it was exported from")
    return header


# ---------------------------------------------------------------------------- reading
_MAGIC = {b"PAR1": "parquet", b"\x93NUMPY": "npy", b"PK\x03\x04": "zip", b"PK\x05\x06": "zip"}
_KIND_NAMES = {"parquet": "a Parquet file", "npy": "an .npy file", "zip": "an .npz (zip) file",
               "binary": "a binary file", "empty": "an empty file", "text": "a text file"}


def _one_line(error) -> str:
    return " ".join(str(error).split())


def _sniff(path: str) -> str:
    """What the file is by its first bytes: parquet, npy, zip, empty, text or binary."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 12)
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    if not head.strip():
        return "empty"
    return "binary" if b"\x00" in head else "text"


def _wrong_format(path: str, kind: str, chosen: str, expected: str, option: str):
    from routelens.errors import SettingError

    return SettingError(f"{path} is not {expected} ({_KIND_NAMES[kind]}); `{option}` {chosen} reads "
                        f"{ROUTE_FORMAT_HELP[chosen]}: give the file's own format, or auto", option)


@dataclass
class _Loaded:
    """A routes file read without the model: its format, and per record (trajectory id or
    None for a lone .npy, the routes, a given offset or None, where, the JSON record or None)."""

    format: str
    entries: list
    header: dict | None = None
    table: object = None   # the Parquet rows


_CACHE: dict = {}   # the last file read: (path, size, mtime, format) -> _Loaded (the command line reads it twice)


def _load(path: str, format: str, option: str) -> _Loaded:
    """The routes file `path` read and checked as far as it can be without the model: it
    exists, is of `format` (or, with "auto", of a format told from its content and name),
    parses (JSON records, base64, .npz/.npy arrays, Parquet columns, an export's header)."""
    from routelens.errors import SettingError

    _exists(path)
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, format)
    if key in _CACHE:
        return _CACHE[key]
    kind = _sniff(path)
    chosen, records = format, None
    if format == "auto":
        if kind == "parquet":
            chosen = "parquet"
        elif kind == "npy":
            chosen = "npy"
        elif kind == "zip":
            try:
                with zipfile.ZipFile(path) as archive:
                    chosen = "npz-export" if f"{HEADER_KEY}.npy" in archive.namelist() else "npy"
            except (zipfile.BadZipFile, OSError):
                raise RouteLensError(f"{path}: not a readable .npz file") from None
        elif kind == "empty":
            raise RouteLensError(f"{path}: no route records in the file (it is empty)")
        elif path.endswith((".jsonl", ".json")) and kind == "text":
            records = _json_records(path)
            first = records[0]
            chosen = "sglang" if isinstance(first.get("meta_info"), dict) or isinstance(first.get("sgl_ext"), dict) \
                else "vllm"
        else:
            raise SettingError(f"{path}: cannot tell the routes format from the name; give `{option}` one of "
                               f"{', '.join(ROUTE_FORMATS)}", option)
    loaded = _Loaded(chosen, [])
    if chosen == "parquet":
        if kind != "parquet":
            raise _wrong_format(path, kind, chosen, "a Parquet file", option)
        loaded.table = _parquet_table(path)
    elif chosen == "sglang" or (chosen == "vllm" and kind not in ("zip", "npy")):
        if kind not in ("text", "empty"):
            raise _wrong_format(path, kind, chosen, "JSON Lines text", option)
        for record in records if records is not None else _json_records(path):
            where = record.pop("_where")
            trajectory_id = _record_id(record, where)
            payload = _sglang_payload(record, where) if chosen == "sglang" else _vllm_payload(record, where)
            if chosen == "sglang" and isinstance(payload, str):
                payload = _sglang_flat(payload, where)
            loaded.entries.append((trajectory_id, payload, None, where, record))
    elif kind == "npy" and chosen != "npz-export":
        loaded.entries.append((None, _npy_array(path), None, path, None))
    elif kind == "zip":
        arrays = _npz_arrays(path, path)
        if chosen == "npz-export":
            loaded.header = _parse_export_header(arrays, path)
        elif HEADER_KEY in arrays:
            arrays.pop(HEADER_KEY)   # an export read as plain arrays
        if not arrays:
            raise RouteLensError(f"{path}: no arrays in the file")
        loaded.entries = [(key, array, 0 if chosen == "npz-export" else None, f"{path} [{key!r}]", None)
                          for key, array in arrays.items()]
    else:
        expected = "an .npz file written by routelens --export" if chosen == "npz-export" else "an .npz file or an .npy file"
        raise _wrong_format(path, kind, chosen, expected, option)
    _CACHE.clear()
    _CACHE[key] = loaded
    return loaded


def detect_format(path: str) -> str:
    """The format of a routes file from its content (and, for JSON, its name and first record)."""
    return _load(os.fspath(path), "auto", "format").format


def check_routes_file(path: str, format: str = "auto", option: str = "format") -> str:
    """The routes file checked as far as it can be without the model (before one loads):
    it exists, is of `format` (one of `ROUTE_FORMATS`, or "auto"), and parses; returns the
    format. `read_routes` of the same unchanged file then does not read it again. `option`
    names the format's argument in messages (`format`; `routes_format` in `replay`)."""
    if format not in (*ROUTE_FORMATS, "auto"):
        raise RouteLensError(f"unknown routes format {format!r}; the formats are {', '.join(ROUTE_FORMATS)} "
                             "(or auto)")
    return _load(os.fspath(path), format, option).format


def read_routes(path: str, lens_or_adapter, trajectories, format: str = "auto",
                prompt_included: bool = True, option: str = "format") -> EngineRoutes:
    """The routes an engine chose, from `path` in `format` (`ROUTE_FORMATS`, or "auto": from
    the file's content and name), checked against the model (`lens_or_adapter`: a Lens or
    its adapter) and `trajectories` (a list of `Trajectory`; every one needs routes, and
    every route a trajectory). `prompt_included`: the file's first row of a trajectory is
    its first token (True) or its first completion token (False). See the module's text
    for the formats, the alignment and the checks.

    Examples:
        >>> import numpy as np, routelens as rl
        >>> lens = rl.load("demo")
        >>> [t] = rl.trajectories_from_ids([[1, 5, 6, 7]], completion_start=2)
        >>> np.save(tmp / "one.npy", np.tile(np.arange(4), (3, 4, 1)))   # every token but the last
        >>> routes = read_routes(tmp / "one.npy", lens, [t], format="npy")
        >>> routes.experts[t.id][:, 0].tolist(), routes.meta["last_token_missing"]
        ([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [-1, -1, -1, -1]], 1)
    """
    from routelens.results.paths import file_sha256

    path = os.fspath(path)
    if format not in (*ROUTE_FORMATS, "auto"):
        raise RouteLensError(f"unknown routes format {format!r}; the formats are {', '.join(ROUTE_FORMATS)} "
                             "(or auto)")
    model = _model(lens_or_adapter)
    trajectories = list(trajectories)
    if not trajectories:
        raise RouteLensError("no trajectories given; routes are read against the trajectories they route")
    by_id = {t.id: t for t in trajectories}
    if len(by_id) != len(trajectories):
        raise RouteLensError("the trajectories repeat an id; ids must be unique")
    loaded = _load(path, format, option)
    _CACHE.clear()   # kept only between the command line's early check and this read
    chosen, header = loaded.format, loaded.header
    if header is not None:
        _check_export_header(header, path, model)
    if chosen == "parquet":
        entries = [(key, array, offset, where, None)
                   for key, (array, offset, where) in _read_parquet(loaded.table, path, model, by_id,
                                                                    prompt_included).items()]
    elif loaded.entries and loaded.entries[0][0] is None:   # one .npy: one trajectory's routes
        if len(trajectories) != 1:
            raise RouteLensError(f"{path}: one .npy holds one trajectory's routes but {len(trajectories)} "
                                 "trajectories were given; give one trajectory, or an .npz keyed by trajectory id")
        entries = [(trajectories[0].id, *loaded.entries[0][1:])]
    else:
        entries = loaded.entries

    seen: dict[str, str] = {}
    for trajectory_id, _, _, where, _ in entries:
        if trajectory_id in seen:
            raise RouteLensError(f"{where}: trajectory {trajectory_id!r} again (first at {seen[trajectory_id]}); give "
                                 "each trajectory's routes once")
        seen[trajectory_id] = where
    unknown = [key for key in seen if key not in by_id]
    if unknown:
        raise RouteLensError(f"{path}: routes for trajectory id(s) {_ids(unknown)} that are not among the "
                             f"{len(by_id)} trajectories given; give the trajectories the engine generated")
    missing = [key for key in by_id if key not in seen]
    if missing:
        raise RouteLensError(f"{path}: no routes for trajectory id(s) {_ids(missing)}; give routes for every "
                             "trajectory, or pass only the trajectories the file covers")

    notes = {"layer_axis": set(), "covered": {}, "last_token_missing": 0}
    placed = {}
    for trajectory_id, payload, offset, where, record in entries:
        trajectory = by_id[trajectory_id]
        if record is not None:
            _check_token_counts(record, trajectory, where)
            offset = _offset(record, trajectory, prompt_included, where)
        elif offset is None:
            offset = 0 if prompt_included else trajectory.completion_start
        if chosen == "sglang":
            payload = _sglang_rows(payload, trajectory, model, offset, where)
        placed[trajectory_id] = _place(payload, trajectory, model, offset, where, notes)
    experts = {t.id: placed[t.id] for t in trajectories}
    meta = {"file": path, "sha256": file_sha256(path), "format": chosen, "model": model.name,
            "num_experts": model.num_experts, "num_hidden_layers": model.num_layers,
            "prompt_included": bool(prompt_included), "layer_axis": sorted(notes["layer_axis"]),
            "covered": notes["covered"], "last_token_missing": notes["last_token_missing"],
            "last_token": "a route for every token but the last (-1: not reported; no scored prediction depends "
                          "on it)" if notes["last_token_missing"] else "every token",
            **({"header": header} if header is not None else {})}
    source = header.get("source", "npz-export") if header is not None else chosen
    return EngineRoutes(experts, layers=list(model.moe_layers), top_k=model.k, source=source, alignment=ALIGNMENT,
                        meta=meta)


# ---------------------------------------------------------------------------- export
def _json_safe(value):
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return str(value)


def export_routes(routes: EngineRoutes, path: str, *, overwrite: bool = False, inputs=(),
                  command: str = "export-routes", model: str | None = None) -> str:
    """Write `routes` for a trainer: an .npz with one int16 array [tokens, MoE layers, k] per
    trajectory id (-1: no route) and a JSON header under `__header__.json` (a uint8 array:
    `json.loads(npz["__header__.json"].tobytes())`). The path policy of
    `routelens.results.paths`: never one of `inputs`, an existing file replaced only with
    `overwrite` and only when routelens wrote it; written atomically and recorded in the
    folder's ledger. Returns `path`. `read_routes(path, ..., format="npz-export")` reads it back.

    Examples:
        >>> import json, numpy as np, routelens as rl
        >>> from routelens.data.engine_routes import EngineRoutes
        >>> routes = EngineRoutes({"t0": np.array([[[0, 1]], [[2, -1]]])}, layers=[1], top_k=2, source="npy")
        >>> path = rl.export_routes(routes, str(tmp / "routes-export.npz"))
        >>> with np.load(path) as npz:
        ...     npz["t0"].dtype.name, json.loads(npz["__header__.json"].tobytes())["layers"]
        ('int16', [1])
    """
    from routelens import validate
    from routelens.errors import SettingError

    if not isinstance(routes, EngineRoutes):
        raise SettingError(f"`routes` must be an EngineRoutes (routelens.read_routes(...)) to export, got "
                           f"{type(routes).__name__} {validate.shown(routes)}", "routes")
    validate.flag(overwrite, "overwrite")
    target = check_export(path, inputs=inputs, overwrite=overwrite, option="path")
    data = export_bytes(routes, model)
    write_export(target, data, command)
    return target.path


@dataclass
class ExportTarget:
    """Where an export goes: `path`, and `name` (relative to the run folder) when it lies
    inside the run folder `out` of the run that writes it (then listed among the run's files)."""

    path: str
    name: str | None = None


def check_export(path, out: str | None = None, inputs=(), overwrite: bool = False,
                 option: str = "export") -> ExportTarget:
    """The export's path, checked before any work: a path ending in .npz, never an input (nor
    inside one), not the run folder `out` nor around it, and not a folder. Inside `out`:
    written as one of the run's files (listed in its run.json, replaced by the run resumed,
    removed by its `overwrite`), so a file there that the run does not list is refused. Elsewhere:
    the file-output policy of `routelens.results.paths` (replaced only with `overwrite` and
    only when routelens wrote it), except that the run in `out` that wrote it (its run.json's
    `export`) rewrites it when resumed. `option` names the argument in messages."""
    from routelens import validate
    from routelens.errors import SettingError
    from routelens.results.paths import LEDGER, check_apart_from_inputs, check_out_file, inside, written_by_routelens

    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise SettingError(f"`{option}` must be a path ending in .npz, got {type(path).__name__} "
                           f"{validate.shown(path)}", option)
    path = os.fspath(path)
    check_apart_from_inputs(path, inputs, option)
    if os.path.isdir(path):
        raise SettingError(f"`{option}` {path} is a folder; give a file path such as {os.path.join(path, 'routes.npz')}",
                           option)
    if out is not None and os.path.realpath(path) == os.path.realpath(out):
        raise SettingError(f"`{option}` and `out` name the same path {path}: the export is a file, `out` the run "
                           f"folder; give the export another name (e.g. {os.path.join(out, 'routes.npz')})",
                           option, "out")
    if not path.endswith(".npz"):
        raise SettingError(f"`{option}` {path}: the export is an .npz file; give a path ending in .npz", option)
    if out is not None:
        if inside(out, path):
            raise SettingError(f"`out` {out} lies inside `{option}` {path}; give the export another path", option, "out")
        if inside(path, out):
            return _export_in_run(path, out, option, LEDGER)
    stored = _stored_run(out)
    recorded = stored.get("export") if isinstance(stored, dict) and stored.get("kind") == "replay" else None
    own = (isinstance(recorded, dict) and recorded.get("path") == os.path.abspath(path)
           and written_by_routelens(path) == "replay")
    check_out_file(path, _shown_option(option), (), overwrite=overwrite or own)
    return ExportTarget(path)


def _shown_option(option: str) -> str:
    """How a message names the argument: --export on the command line and in `replay`, `path` in `export_routes`."""
    return "`path`" if option == "path" else "--" + option.replace("_", "-")


def _stored_run(out: str | None) -> dict | None:
    from routelens.results.run_folder import RUN_JSON, read_json

    if out is None or not os.path.isfile(os.path.join(out, RUN_JSON)):
        return None
    try:
        return read_json(os.path.join(out, RUN_JSON))
    except (ValueError, OSError):   # not a run: the run folder refuses it itself
        return None


def _export_in_run(path: str, out: str, option: str, ledger: str) -> ExportTarget:
    from routelens.errors import SettingError
    from routelens.results.run_folder import PARTS, RUN_JSON

    name = os.path.relpath(os.path.realpath(path), os.path.realpath(out))
    if name.split(os.sep)[0] in (RUN_JSON, PARTS, ledger) or os.path.basename(name) == ledger:
        raise SettingError(f"`{option}` {path}: {name} is the run folder's own; give the export another name", option)
    stored = _stored_run(out)
    listed = stored.get("files") if isinstance(stored, dict) else None
    if os.path.lexists(path) and not (isinstance(listed, list) and name in listed):
        raise RouteLensError(f"{_shown_option(option)} {path} exists in the run folder {out} and its run.json does "
                             "not list it: it was not written by routelens, so it is never replaced; choose another "
                             "path or move the file away")
    return ExportTarget(path, name)


def export_bytes(routes: EngineRoutes, model: str | None = None) -> bytes:
    """The .npz of `export_routes`, as bytes."""
    if HEADER_KEY in routes.experts:
        raise RouteLensError(f"a trajectory is named {HEADER_KEY!r}, the export's header key; rename it")
    if not routes.experts:
        raise RouteLensError("no trajectories' routes to export")
    arrays = {}
    for trajectory_id, array in routes.experts.items():
        array = np.asarray(array)
        if not np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
            raise RouteLensError(f"routes of trajectory {trajectory_id!r} are {array.dtype}, not integer expert ids")
        if array.size and (array.min() < -1 or array.max() > np.iinfo(np.int16).max):
            raise RouteLensError(f"routes of trajectory {trajectory_id!r} hold expert id {int(array.min())}.."
                                 f"{int(array.max())}, outside -1..32767 (int16)")
        arrays[str(trajectory_id)] = array.astype(np.int16)
    meta = routes.meta or {}
    header = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model": model or meta.get("model"),
              "layers": [int(layer) for layer in routes.layers], "num_hidden_layers": meta.get("num_hidden_layers"),
              "k": int(routes.top_k), "num_experts": meta.get("num_experts"), "dtype": "int16", "missing": -1,
              "shape": "[tokens, layers, k] per trajectory id; layers are the decoder-layer indices in `layers`",
              "alignment": routes.alignment, "prompt_included": True, "source": routes.source,
              "trajectories": {key: int(array.shape[0]) for key, array in arrays.items()},
              "meta": _json_safe({key: value for key, value in meta.items() if key not in ("covered", "header")})}
    arrays[HEADER_KEY] = np.frombuffer(json.dumps(header, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:   # np.savez's layout, any key
        for key, array in arrays.items():
            with archive.open(f"{key}.npy", "w") as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return buffer.getvalue()


def write_export(target: ExportTarget, data: bytes, command: str, folder=None) -> None:
    """Write the export `data` to `target` (checked by `check_export` beforehand) atomically (a
    kill leaves the old file or none, never half of one): inside the run `folder` as one of
    its listed files; elsewhere recorded in its folder's ledger, refusing a file that
    appeared there meanwhile that routelens did not write."""
    from routelens.results.paths import record_output, write_bytes_atomic, written_by_routelens

    if target.name is not None and folder is not None and getattr(folder, "path", None) is not None:
        folder.write_file(target.name, data)   # listed in run.json before it is written
        return
    if os.path.lexists(target.path) and written_by_routelens(target.path) is None:
        raise RouteLensError(f"{target.path} appeared while routelens worked and was not written by it: it is never "
                             "replaced; move it away and re-run")
    write_bytes_atomic(target.path, data)
    record_output(target.path, command)
