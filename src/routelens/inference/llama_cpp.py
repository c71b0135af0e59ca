"""llama.cpp's routes and next-token log-probs on trajectories (llama-cpp-python's low-level API).

`llama_cpp_routes(lens, trajectories, gguf_type="q8_0") -> (EngineRoutes, logprobs)` (or
`run_llama_cpp`, which can also keep the engine's router logits) writes a GGUF of the lens's model
(`routelens.inference.gguf_export`; or takes one, checked against the model), decodes each
trajectory's token ids in one batch (one sequence, positions 0..T-1, no tokenizer involved),
and, through llama.cpp's graph evaluation callback (`cb_eval` of the context parameters),
reads the tensor "ffn_moe_topk-<layer>" of every MoE layer: the k expert ids llama.cpp's
router chose for each token ([k, tokens] int32, a view into the router's argsort, read
through its strides). The logits of every position are requested (the batch's output flag
on every token), and turned into log-probs with a float64 log-softmax.

Alignment, explicit: position t of a route array and of a log-prob array is token t of the
trajectory's input_ids (the prompt included); the log-prob at t is of token t + 1 (the
next token), so a trajectory of T tokens has T route rows and T - 1 target log-probs.

An f32 file runs with an f32 KV cache and without flash attention (so that f32 measures
llama.cpp's f32 arithmetic, not an f16 rounding of keys and values); the other types run as
llama.cpp runs them by default (f16 cache, flash attention auto), unless `kv_cache_type` or
`flash_attn` say otherwise. What was used is recorded in the routes' `meta`.

Examples:
    >>> import routelens as rl
    >>> from routelens.inference.llama_cpp import llama_cpp_routes
    >>> lens = rl.load("demo")
    >>> routes, logprobs = llama_cpp_routes(lens, {"t0": lens.encode("Q:12+7=A:")[0].tolist()}, gguf_type="f32")
    >>> routes.source, routes.shape("t0"), logprobs["t0"].shape
    ('llama.cpp:f32', (10, 4, 4), (9,))
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np

from routelens.data.engine_routes import ALIGNMENT, EngineRoutes
from routelens.errors import RouteLensError, SettingError
from routelens.inference.gguf_export import INSTALL, check_gguf, check_gguf_type, export_gguf

TOPK_TENSOR = "ffn_moe_topk"       # llama.cpp's build_moe_ffn: cb(selected_experts, "ffn_moe_topk", il)
LOGITS_TENSOR = "ffn_moe_logits"   # cb(logits, "ffn_moe_logits", il): the router's logits [n_expert, tokens]
KV_CACHE_TYPES = ("f32", "f16")
_GGML_TYPES = {"f32": 0, "f16": 1}
_GGML_I32, _GGML_F32 = 26, 0


def llama_cpp_module():
    """llama-cpp-python, or a one-line error saying how to install it."""
    try:
        import llama_cpp
    except (ImportError, OSError) as error:   # OSError: the package is there but its shared library is not loadable
        raise RouteLensError(f"running llama.cpp needs llama-cpp-python ({str(error).splitlines()[0]}): {INSTALL} "
                             "(built from source: needs a C++ compiler and cmake)") from None
    return llama_cpp


class _TensorHead(ctypes.Structure):
    """The first fields of ggml.h's `struct ggml_tensor` (type, buffer, ne[4], nb[4])."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4)]


def _ggml_base(llama_cpp):
    """libggml-base of llama-cpp-python (ggml_get_name, ggml_nbytes, ggml_backend_tensor_get)."""
    folder = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    names = [name for name in sorted(os.listdir(folder)) if name.startswith("libggml-base.")] if os.path.isdir(folder) else []
    if not names:
        raise RouteLensError(f"llama-cpp-python has no libggml-base in {folder}: reinstall it ({INSTALL})")
    lib = ctypes.CDLL(os.path.join(folder, names[0]))
    lib.ggml_get_name.restype, lib.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    lib.ggml_nbytes.restype, lib.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


def _read_2d(lib, pointer, dtype) -> np.ndarray:
    """A ggml tensor [ne1 rows, ne0 values] (ne2 = ne3 = 1) as a numpy array, read through its
    strides (the top-k ids are a view into the argsort, rows n_expert apart)."""
    head = ctypes.cast(pointer, ctypes.POINTER(_TensorHead)).contents
    ne, nb = list(head.ne), list(head.nb)
    expected = {np.dtype(np.int32): _GGML_I32, np.dtype(np.float32): _GGML_F32}[np.dtype(dtype)]
    if head.type != expected:
        raise RouteLensError(f"llama.cpp's tensor {lib.ggml_get_name(pointer).decode()} has ggml type {head.type}; "
                             f"expected {expected}")
    if ne[2] != 1 or ne[3] != 1:
        raise RouteLensError(f"llama.cpp's tensor {lib.ggml_get_name(pointer).decode()} has shape {ne}; expected 2 dimensions")
    size = lib.ggml_nbytes(pointer)
    buffer = ctypes.create_string_buffer(size)
    lib.ggml_backend_tensor_get(pointer, buffer, 0, size)
    flat = np.frombuffer(buffer.raw, dtype=np.uint8)
    return np.ndarray(shape=(ne[1], ne[0]), dtype=dtype, buffer=flat, strides=(nb[1], nb[0])).copy()


def _sequences(trajectories, vocab_size: int) -> dict[str, list[int]]:
    """id -> token ids of trajectories given as Trajectory objects, a dict id -> ids, or a list
    of id lists (ids "0", "1", ...); every id checked (one-line errors)."""
    if isinstance(trajectories, dict):
        items = list(trajectories.items())
    elif isinstance(trajectories, (list, tuple)):
        items = [(t.id, t.input_ids) if hasattr(t, "input_ids") else (str(i), t) for i, t in enumerate(trajectories)]
    else:
        raise SettingError(f"`trajectories` must be a list of Trajectory, a dict id -> token ids or a list of token-id lists, "
                           f"got {type(trajectories).__name__}", "trajectories")
    if not items:
        raise SettingError("`trajectories` is empty: give at least one", "trajectories")
    sequences = {}
    for key, ids in items:
        key = str(key)
        if key in sequences:
            raise SettingError(f"trajectory id {key!r} appears twice in `trajectories`", "trajectories")
        try:
            ids = np.asarray(ids.tolist() if hasattr(ids, "tolist") else list(ids)).reshape(-1)
        except (TypeError, ValueError):
            raise SettingError(f"trajectory {key!r} must be a list of token ids, got {type(ids).__name__}", "trajectories") from None
        ids = ids if ids.size else np.zeros(0, int)
        if ids.size < 2 or not np.issubdtype(ids.dtype, np.integer):
            raise SettingError(f"trajectory {key!r} must be two or more integer token ids, got {ids.size} of {ids.dtype}",
                               "trajectories")
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise SettingError(f"trajectory {key!r} has token id {int(ids.max() if ids.max() >= vocab_size else ids.min())} "
                               f"outside the vocabulary [0, {vocab_size})", "trajectories")
        sequences[key] = [int(i) for i in ids]
    return sequences


@dataclass
class LlamaCppRun:
    """What one llama.cpp run gave: `routes` (EngineRoutes, source "llama.cpp:<type>"),
    `logprobs` per trajectory (float64 [T - 1], or [T, vocab] with full_logprobs) and, when
    asked, `router_logits` per trajectory (llama.cpp's "ffn_moe_logits-<layer>", float32
    [T, L, E]: the engine's own router scores, for margins on the engine's side)."""

    routes: EngineRoutes
    logprobs: dict[str, np.ndarray]
    router_logits: dict[str, np.ndarray] | None = None


def llama_cpp_routes(lens, trajectories, gguf_type: str = "q8_0", *, gguf: str | None = None,
                     kv_cache_type: str | None = None, flash_attn: bool | str | None = None,
                     threads: int | None = None, full_logprobs: bool = False) -> tuple[EngineRoutes, dict[str, np.ndarray]]:
    """Run llama.cpp on the trajectories: its routes at every MoE layer and its log-probs
    (what `routelens replay --engine llama.cpp --gguf-type TYPE` compares with the model's).
    The same as `run_llama_cpp(...)` without the router logits, as a pair (routes, logprobs).
    """
    run = run_llama_cpp(lens, trajectories, gguf_type, gguf=gguf, kv_cache_type=kv_cache_type, flash_attn=flash_attn,
                        threads=threads, full_logprobs=full_logprobs)
    return run.routes, run.logprobs


def run_llama_cpp(lens, trajectories, gguf_type: str = "q8_0", *, gguf: str | None = None,
                  kv_cache_type: str | None = None, flash_attn: bool | str | None = None,
                  threads: int | None = None, full_logprobs: bool = False, router_logits: bool = False) -> LlamaCppRun:
    """Run llama.cpp on the trajectories: its routes at every MoE layer and its log-probs.

    `trajectories`: Trajectory objects, a dict id -> token ids, or a list of token-id lists.
    `gguf_type`: f32, f16, q8_0 or q4_0, the file routelens writes of the lens's model (into
    a temporary folder, removed after); `gguf`: a GGUF file to run instead (checked against
    the model: a GGUF of another model is a one-line error; the file's own type is then
    reported and `gguf_type` is not used).
    `kv_cache_type`: f32 or f16 (default: f32 for an f32 file, f16 otherwise); `flash_attn`:
    True, False or "auto" (llama.cpp's default: on, on a CPU); None: off for an f32 file,
    "auto" otherwise (llama.cpp's CPU flash attention rounds q, k and v to f16: 8e-3 nats on
    the demo's log-probs against 2e-5 without). Returns
    a `LlamaCppRun`: `routes` (EngineRoutes, source "llama.cpp:<type>", int [T, L, k] per trajectory);
    `logprobs`:
    per trajectory float64 [T - 1], the log-prob of token t + 1 at position t, or with
    `full_logprobs` the whole log-softmax [T, vocab]. `router_logits`: also keep llama.cpp's
    router logits (`LlamaCppRun.router_logits`).
    """
    llama_cpp = llama_cpp_module()
    check_gguf_type(gguf_type)
    if kv_cache_type is not None and kv_cache_type not in KV_CACHE_TYPES:
        raise SettingError(f"`kv_cache_type` must be one of {', '.join(KV_CACHE_TYPES)}, got {kv_cache_type!r}", "kv_cache_type")
    if flash_attn is not None and not isinstance(flash_attn, bool) and flash_attn != "auto":
        raise SettingError(f"`flash_attn` must be True, False, \"auto\" (llama.cpp's default) or None (off for an f32 file, "
                           f"auto otherwise), got {flash_attn!r}", "flash_attn")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise SettingError(f"`threads` must be a positive integer, got {threads!r}", "threads")
    sequences = _sequences(trajectories, lens.adapter.config.vocab_size)
    folder = None
    try:
        if gguf is None:
            folder = tempfile.mkdtemp(prefix="routelens-gguf-")
            path = export_gguf(lens, os.path.join(folder, f"model-{gguf_type}.gguf"), gguf_type)
        else:
            path = gguf
        info = check_gguf(lens, path)
        file_type = gguf_type if gguf is None else (info["file_type"] or "unknown").replace("MOSTLY_", "").replace(
            "ALL_", "").lower()
        kv = kv_cache_type or ("f32" if file_type == "f32" else "f16")
        flash = flash_attn if flash_attn is not None else (False if file_type == "f32" else "auto")
        experts, logprobs, logits, engine = _run(llama_cpp, lens, path, sequences, kv, flash, threads, full_logprobs,
                                                 router_logits)
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    meta = {"engine": "llama.cpp", "llama_cpp_python": llama_cpp.__version__, "gguf_type": file_type,
            "gguf": gguf if gguf is not None else f"(written by routelens, {gguf_type}, removed after the run)",
            "gguf_file": {key: value for key, value in info.items() if key != "path"}, "kv_cache_type": kv, **engine,
            "logprobs": "position t: log p(token t + 1 | tokens <= t), log-softmax of llama.cpp's logits in float64"}
    routes = EngineRoutes(experts, layers=lens.moe_layers, top_k=lens.top_k, source=f"llama.cpp:{file_type}",
                          alignment=ALIGNMENT, meta=meta)
    return LlamaCppRun(routes, logprobs, logits if router_logits else None)


def _run(llama_cpp, lens, path, sequences, kv, flash_attn, threads, full_logprobs, router_logits):
    """Load the file in llama.cpp, decode every sequence with the callback reading the routes."""
    lib = _ggml_base(llama_cpp)
    layers = lens.moe_layers
    k = lens.top_k
    wanted = {f"{TOPK_TENSOR}-{layer}": (layer, "topk") for layer in layers}
    if router_logits:
        wanted.update({f"{LOGITS_TENSOR}-{layer}": (layer, "logits") for layer in layers})
    seen: dict[tuple[int, str], list[np.ndarray]] = {}
    errors: list[str] = []
    log: list[str] = []

    @llama_cpp.ggml_backend_sched_eval_callback
    def observe(tensor, ask, user_data):
        try:
            name = lib.ggml_get_name(tensor).decode(errors="replace")
            if ask:
                return name in wanted
            if name in wanted:
                layer, kind = wanted[name]
                seen.setdefault((layer, kind), []).append(_read_2d(lib, tensor, np.int32 if kind == "topk" else np.float32))
        except Exception as error:   # never raise through C; reported after the decode
            errors.append(f"{type(error).__name__}: {error}")
        return True

    @llama_cpp.llama_log_callback
    def keep_log(level, text, user_data):
        if level in (2, 3):   # warnings and errors, quoted when loading fails
            log.append(text.decode(errors="replace").strip())

    llama_cpp.llama_log_set(keep_log, ctypes.c_void_p(0))
    model = context = batch = None
    try:
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        model = llama_cpp.llama_model_load_from_file(path.encode(), model_params)
        if not model:
            raise RouteLensError(f"llama.cpp could not load {path}: {next((line for line in reversed(log) if line), 'no reason given')}")
        vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        longest = max(len(ids) for ids in sequences.values())
        n_threads = threads or max(1, min(os.cpu_count() or 1, _torch_threads()))
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = longest
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = n_threads
        params.type_k = params.type_v = _GGML_TYPES[kv]
        params.cb_eval = observe
        params.cb_eval_user_data = None
        params.no_perf = True
        params.flash_attn_type = {"auto": -1, False: 0, True: 1}[flash_attn]   # LLAMA_FLASH_ATTN_TYPE_AUTO / DISABLED / ENABLED
        context = llama_cpp.llama_init_from_model(model, params)
        if not context:
            raise RouteLensError(f"llama.cpp could not make a context for {path}: "
                                 f"{next((line for line in reversed(log) if line), 'no reason given')}")
        batch = llama_cpp.llama_batch_init(longest, 0, 1)
        experts, logprobs, logits = {}, {}, {}
        for key, ids in sequences.items():
            seen.clear()
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(context), True)
            batch.n_tokens = len(ids)
            for position, token in enumerate(ids):
                batch.token[position] = token
                batch.pos[position] = position
                batch.n_seq_id[position] = 1
                batch.seq_id[position][0] = 0
                batch.logits[position] = 1
            status = llama_cpp.llama_decode(context, batch)
            if status != 0:
                raise RouteLensError(f"llama.cpp's llama_decode returned {status} on trajectory {key!r} "
                                     f"({len(ids)} tokens): {next((line for line in reversed(log) if line), 'no reason given')}")
            if errors:
                raise RouteLensError(f"reading llama.cpp's routes failed on trajectory {key!r}: {errors[0]}")
            experts[key] = _stack(seen, layers, "topk", len(ids), k, key)
            if router_logits:
                logits[key] = _stack(seen, layers, "logits", len(ids), lens.num_experts, key).astype(np.float32)
            raw = np.ctypeslib.as_array(llama_cpp.llama_get_logits(context), shape=(len(ids), vocab)).astype(np.float64)
            full = raw - raw.max(axis=1, keepdims=True)
            full = full - np.log(np.exp(full).sum(axis=1, keepdims=True))
            logprobs[key] = full if full_logprobs else full[np.arange(len(ids) - 1), ids[1:]]
        engine = {"threads": n_threads, "n_ctx": longest,
                  "flash_attn": {"auto": "auto (llama.cpp's default)", False: "off", True: "on"}[flash_attn],
                  "routes_tensor": f"{TOPK_TENSOR}-<layer>", "vocab": vocab}
        return experts, logprobs, logits, engine
    finally:
        if batch is not None:
            llama_cpp.llama_batch_free(batch)
        if context:
            llama_cpp.llama_free(context)
        if model:
            llama_cpp.llama_model_free(model)
        _restore_log(llama_cpp)


def _stack(seen, layers, kind, tokens, width, key) -> np.ndarray:
    """[tokens, layers, width] from the per-layer pieces the callback read (one per ubatch)."""
    out = []
    for layer in layers:
        pieces = seen.get((layer, kind))
        if not pieces:
            raise RouteLensError(f"llama.cpp never evaluated {TOPK_TENSOR if kind == 'topk' else LOGITS_TENSOR}-{layer} on "
                                 f"trajectory {key!r}: its graph for this model names no routes at layer {layer}")
        rows = np.concatenate(pieces, axis=0)
        if rows.shape != (tokens, width):
            raise RouteLensError(f"llama.cpp's {kind} at layer {layer} on trajectory {key!r} has shape {list(rows.shape)}; "
                                 f"expected [{tokens} tokens, {width}]")
        out.append(rows)
    return np.stack(out, axis=1)


def _torch_threads() -> int:
    try:
        import torch

        return torch.get_num_threads()
    except Exception:   # torch is a dependency; this is only a default
        return 1


def _restore_log(llama_cpp) -> None:
    """Give llama-cpp-python's own log callback back."""
    try:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    except Exception:   # an older layout of the package: leave logging as it is
        pass
