"""GGUF files of a served model, for llama.cpp, written with the `gguf` package.

Supported: OLMoE (llama.cpp architecture "olmoe": the demo model's family) and Qwen3-MoE
("qwen3moe"). The tensor names and metadata are those of llama.cpp's own converter
(convert_hf_to_gguf.py, `OlmoeModel` and `Qwen3MoeModel`, read from the `gguf` package's
`TENSOR_NAMES`); the experts' fused HF tensors are split as that converter does (gate_up_proj
[E, 2F, H] -> ffn_gate_exps [E, F, H] (first half) and ffn_up_exps (second half); down_proj
[E, H, F] -> ffn_down_exps). llama.cpp applies RoPE to both families in NEOX order (HF's
rotate_half), so q and k are written unpermuted.

Types (`gguf_type`): f32, f16, q8_0, q4_0, with the converter's rule for what stays f32:
one-dimensional tensors, norms and the routers (ffn_gate_inp) are f32 in every type; every
other matrix (embeddings and LM head included) takes the type. q8_0 and q4_0 quantize rows in
blocks of 32 values: a model with a row size not divisible by 32 is refused for them (one
line), rather than silently written with some tensors in another type.

The vocabulary is written as llama.cpp's "none" tokenizer with `<arch>.vocab_size` tokens:
routelens feeds token ids to llama_decode and never tokenizes with llama.cpp.

What llama.cpp's graph hard-codes is checked against the model's config before writing
(one-line refusals): OLMoE without top-k renormalisation and with q/k norms over all heads
(no GQA), Qwen3-MoE with renormalisation and every layer MoE, default RoPE, no attention bias.

Examples:
    >>> import os, tempfile
    >>> import routelens as rl
    >>> from routelens.inference.gguf_export import export_gguf, check_gguf
    >>> lens = rl.load("demo")
    >>> path = export_gguf(lens, os.path.join(tempfile.mkdtemp(), "demo-q8_0.gguf"), "q8_0")
    >>> check_gguf(lens, path)["tensor_types"]
    {'F32': 21, 'Q8_0': 30}
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from routelens.errors import RouteLensError, SettingError

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
#: HF model type -> llama.cpp architecture
ARCHITECTURES = {"olmoe": "olmoe", "qwen3_moe": "qwen3moe"}
INSTALL = "pip install 'routelens[llama]'"


def gguf_module():
    """The `gguf` package, or a one-line error saying how to install it."""
    try:
        import gguf
    except ImportError as error:
        raise RouteLensError(f"writing or reading a GGUF needs the `gguf` package ({error}): {INSTALL}") from None
    return gguf


def check_gguf_type(gguf_type) -> str:
    if gguf_type not in GGUF_TYPES:
        raise SettingError(f"`gguf_type` must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}", "gguf_type")
    return gguf_type


@dataclass
class _Plan:
    """What a GGUF of the model holds: architecture, metadata (writer method -> value) and
    tensors (GGUF name -> the model's tensor or a view of it, in PyTorch's dimension order;
    copied to float32 one at a time, when written or compared)."""

    architecture: str
    metadata: list[tuple[str, object]]
    tensors: dict[str, torch.Tensor]


def architecture_of(lens) -> str:
    """llama.cpp's architecture name for the lens's model, or a one-line refusal."""
    family = lens.family
    if family not in ARCHITECTURES:
        raise RouteLensError(f"llama.cpp export supports {', '.join(sorted(ARCHITECTURES))}; this model is {family!r}")
    return ARCHITECTURES[family]


def _refuse_unsupported(lens, architecture: str) -> None:
    """What llama.cpp's graph for the architecture hard-codes, checked against the config."""
    config = lens.adapter.config
    where = f"llama.cpp's {architecture} graph"
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise RouteLensError(f"{where} is exported with plain RoPE only; this model has rope parameters {rope}")
    if getattr(config, "attention_bias", False):
        raise RouteLensError(f"{where} as exported has no attention bias; this model has attention_bias=True")
    if architecture == "olmoe":
        if config.norm_topk_prob:
            raise RouteLensError(f"{where} does not renormalise the top-k weights; this model has norm_topk_prob=True")
        if getattr(config, "clip_qkv", None) is not None:
            raise RouteLensError(f"{where} does not clip q/k/v; this model has clip_qkv={config.clip_qkv}")
        if config.num_key_value_heads != config.num_attention_heads:
            raise RouteLensError(f"{where} norms k over all {config.num_attention_heads} heads; this model has "
                                 f"{config.num_key_value_heads} key-value heads")
    else:
        if not config.norm_topk_prob:
            raise RouteLensError(f"{where} renormalises the top-k weights; this model has norm_topk_prob=False")
        if list(getattr(config, "mlp_only_layers", []) or []) or getattr(config, "decoder_sparse_step", 1) != 1:
            raise RouteLensError(f"{where} as exported has an MoE block in every layer; this model has dense layers "
                                 f"(mlp_only_layers={config.mlp_only_layers}, decoder_sparse_step={config.decoder_sparse_step})")
        if getattr(config, "use_sliding_window", False):
            raise RouteLensError(f"{where} has no sliding window; this model has use_sliding_window=True")
    if lens.moe_layers != list(range(config.num_hidden_layers)):
        raise RouteLensError(f"{where} needs an MoE block in every layer; MoE layers here: {lens.moe_layers}")


def _plan(lens) -> _Plan:
    gguf = gguf_module()
    architecture = architecture_of(lens)
    _refuse_unsupported(lens, architecture)
    config = lens.adapter.config
    state = {name: tensor.detach() for name, tensor in lens.model.state_dict().items()}

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise RouteLensError(f"the model has no tensor {name!r}: not the {lens.family} layout that llama.cpp's converter "
                                 "reads (transformers 5's fused experts)")
        return state[name]

    def gguf_name(tensor, layer: int | None = None) -> str:
        return gguf.TENSOR_NAMES[tensor].format(bid=layer) + ".weight"

    T = gguf.MODEL_TENSOR
    tensors = {gguf_name(T.TOKEN_EMBD): take("model.embed_tokens.weight"),
               gguf_name(T.OUTPUT_NORM): take("model.norm.weight"),
               gguf_name(T.OUTPUT): take("lm_head.weight" if "lm_head.weight" in state else "model.embed_tokens.weight")}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        gate_up = take(prefix + "mlp.experts.gate_up_proj")
        ff = gate_up.shape[1] // 2
        for tensor, name in ((T.ATTN_NORM, "input_layernorm"), (T.ATTN_Q, "self_attn.q_proj"), (T.ATTN_K, "self_attn.k_proj"),
                             (T.ATTN_V, "self_attn.v_proj"), (T.ATTN_OUT, "self_attn.o_proj"), (T.ATTN_Q_NORM, "self_attn.q_norm"),
                             (T.ATTN_K_NORM, "self_attn.k_norm"), (T.FFN_NORM, "post_attention_layernorm"),
                             (T.FFN_GATE_INP, "mlp.gate")):
            tensors[gguf_name(tensor, layer)] = take(prefix + name + ".weight")
        tensors[gguf_name(T.FFN_GATE_EXP, layer)] = gate_up[:, :ff]
        tensors[gguf_name(T.FFN_UP_EXP, layer)] = gate_up[:, ff:]
        tensors[gguf_name(T.FFN_DOWN_EXP, layer)] = take(prefix + "mlp.experts.down_proj")

    rope = dict(getattr(config, "rope_parameters", None) or {})
    metadata = [("add_name", str(lens.loaded.spec)), ("add_block_count", config.num_hidden_layers),
                ("add_context_length", config.max_position_embeddings), ("add_embedding_length", config.hidden_size),
                ("add_feed_forward_length", config.intermediate_size), ("add_head_count", config.num_attention_heads),
                ("add_head_count_kv", config.num_key_value_heads), ("add_rope_freq_base", float(rope.get("rope_theta", 10000.0))),
                ("add_layer_norm_rms_eps", float(config.rms_norm_eps)), ("add_expert_count", lens.num_experts),
                ("add_expert_used_count", lens.top_k), ("add_vocab_size", config.vocab_size), ("add_tokenizer_model", "none")]
    if architecture == "qwen3moe":
        metadata += [("add_expert_feed_forward_length", config.moe_intermediate_size),
                     ("add_key_length", config.head_dim), ("add_value_length", config.head_dim)]
    return _Plan(architecture, metadata, tensors)


def _float32(tensor: torch.Tensor) -> np.ndarray:
    return tensor.to("cpu", torch.float32).contiguous().numpy()


def _quantization(name: str, array, gguf_type: str):
    """The GGML type of one tensor in a file of `gguf_type` (llama.cpp's converter's rule)."""
    gguf = gguf_module()
    Q = gguf.GGMLQuantizationType
    if array.ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name or gguf_type == "f32":
        return Q.F32
    return {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[gguf_type]


def export_gguf(lens, path: str, gguf_type: str = "f32") -> str:
    """Write the lens's model as a GGUF of `gguf_type` at `path` (written whole, then moved in
    place: a failed export leaves no file). Returns `path`."""
    gguf = gguf_module()
    check_gguf_type(gguf_type)
    if not isinstance(path, str) or not path:
        raise SettingError(f"`path` must be a file path, got {path!r}", "path")
    plan = _plan(lens)
    Q = gguf.GGMLQuantizationType
    types = {name: _quantization(name, array, gguf_type) for name, array in plan.tensors.items()}
    for name, qtype in types.items():   # refused before anything is written
        if qtype in (Q.Q8_0, Q.Q4_0) and plan.tensors[name].shape[-1] % 32:
            raise RouteLensError(f"{gguf_type} quantizes rows in blocks of 32 values; tensor {name} has rows of "
                                 f"{plan.tensors[name].shape[-1]} (write f32 or f16)")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[gguf_type]
    partial = path + ".partial"
    writer = gguf.GGUFWriter(partial, plan.architecture)
    try:
        for method, value in plan.metadata:
            getattr(writer, method)(value)
        writer.add_file_type(int(file_type))
        writer.add_string("routelens.model", str(lens.loaded.spec))
        writer.add_string("routelens.family", lens.family)
        for name, tensor in plan.tensors.items():
            qtype, array = types[name], _float32(tensor)
            data = array.astype(np.float16) if qtype == Q.F16 else (
                array if qtype == Q.F32 else gguf.quants.quantize(array, qtype))
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(partial, path)
    return path


def _field(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def check_gguf(lens, path: str) -> dict:
    """Check that the GGUF at `path` is a llama.cpp file of the lens's model, or refuse in one
    line: its architecture, layer, expert, head and vocabulary counts, every tensor's shape,
    and the routers' weights (f32 in files of every type, as llama.cpp's converter writes
    them) must be the model's. Returns what the file is: path, architecture, file type, the
    count of tensors per GGML type, the model it says it was written from."""
    gguf = gguf_module()
    if not isinstance(path, str) or not os.path.isfile(path):
        raise SettingError(f"`gguf` must be a GGUF file, got {path!r} (no such file)", "gguf")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:   # not a GGUF at all: the package says why
        raise RouteLensError(f"{path} is not a readable GGUF file: {str(error).splitlines()[0] if str(error) else error!r}") from None
    plan = _plan(lens)
    architecture = _field(reader, "general.architecture")
    if architecture != plan.architecture:
        raise RouteLensError(f"{path} is a GGUF of a {architecture!r} model; this model ({lens.family}) is llama.cpp's "
                             f"{plan.architecture!r}: a GGUF of another model")
    config = lens.adapter.config
    expected = {"block_count": config.num_hidden_layers, "embedding_length": config.hidden_size,
                "expert_count": lens.num_experts, "expert_used_count": lens.top_k,
                "attention.head_count": config.num_attention_heads, "attention.head_count_kv": config.num_key_value_heads}
    for key, value in expected.items():
        found = _field(reader, f"{architecture}.{key}")
        if found != value:
            raise RouteLensError(f"{path} does not match the model: {architecture}.{key} is {found} in the file, {value} in "
                                 "the model (a GGUF of another model)")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    for name, tensor in plan.tensors.items():
        if name not in tensors:
            raise RouteLensError(f"{path} has no tensor {name}: not a GGUF of this model")
        shape = tuple(int(n) for n in reversed(tensors[name].shape.tolist()))   # GGUF lists ne (fastest first)
        array = tensor
        if shape != tuple(array.shape):
            raise RouteLensError(f"{path} does not match the model: tensor {name} is {list(shape)} in the file, "
                                 f"{list(array.shape)} in the model (a GGUF of another model)")
    for layer in range(config.num_hidden_layers):   # the routers' weights: the model's own, not another's
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_GATE_INP].format(bid=layer) + ".weight"
        tensor = tensors[name]
        stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(plan.tensors[name].shape)
        own = _float32(plan.tensors[name])
        exact = tensor.tensor_type == gguf.GGMLQuantizationType.F32
        tolerance = (1e-6 if exact else 0.02) * float(np.abs(own).max() or 1.0)
        deviation = float(np.abs(stored.astype(np.float32) - own).max())
        if deviation > tolerance:
            raise RouteLensError(f"{path} does not match the model: the router weights of layer {layer} differ by up to "
                                 f"{deviation:.3g} (a GGUF of another model)")
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    file_type = _field(reader, "general.file_type")
    return {"path": path, "architecture": architecture,
            "file_type": gguf.LlamaFileType(file_type).name if file_type is not None else None,
            "tensor_types": dict(sorted(counts.items())), "written_from": _field(reader, "routelens.model")}
