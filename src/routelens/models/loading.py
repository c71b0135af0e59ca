"""Loading a MoE causal LM (hub id, local folder, or a built-in tiny model) with its adapter.

Model specs:
- a local folder written by `save_pretrained` (config.json + weights [+ tokenizer]);
- a Hugging Face hub id (needs network or a populated cache);
- `tiny:<model_type>`: a random-weight tiny model of that family (tests, quick tries);
- `demo`: the embedded demo model shipped inside the package (`routelens.demo_model`).

The architecture is checked from the config before any weights are read, so an
unsupported model fails in a second. `trust_remote_code` is off unless asked for.

What users really hold:
- `device_map` ("auto", "balanced" or a JSON map of module -> device, "disk" offload
  included) spreads a model too large for one device through accelerate; the engines keep
  each tensor on the device of the layer that uses it.
- GPT-OSS checkpoints quantized in MXFP4 compute router logits inline in their quantized
  MLP, bypassing the router module; they are loaded dequantized so routing is observable.
- `experts_implementation` picks transformers' expert kernels (results do not depend on it).
- `upcast_router` makes every router compute its logits in float32 in a bf16/fp16 model
  (`upcast_routers`): near-ties of bf16 logits flip top-k choices; the rest of the model
  keeps its dtype.
- Only safetensors weights are read: pickle files can run code when loaded.
A local-looking spec that is not a folder is "no such folder", and a hub id that is not
cached fails at once when the hub cannot be reached (no minute of retries).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoTokenizer

from routelens.errors import RouteLensError, SettingError
from routelens.models.adapter import MoEAdapter
from routelens.models.families import vision_language
from routelens.models.families.refusals import refuse
from routelens.models.registry import adapter_class, adapter_for

TINY_PREFIX = "tiny:"
DEMO = "demo"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class LoadedModel:
    adapter: MoEAdapter
    tokenizer: object | None
    spec: str
    device: str
    dtype: str
    folder: str | None = None  # the local folder the weights came from, if any
    router_delta: dict | None = None  # the router delta applied on top, if any (path, sha256, layer)
    recipe: dict | None = None  # load_model's arguments, to load it again elsewhere (Ray workers); None: wrap()
    weights: bool = True        # False: the structure only, on the meta device (a Ray driver's model)
    upcast_router: bool = False  # every router computes its logits in float32 (`upcast_routers`)

    def identity(self) -> dict:
        """What identifies the model in a run's config. `upcast_router` appears only when on
        (a missing key is off), so a run folder written before the option existed still resumes."""
        identity = {"model": self.spec, "router_delta": self.router_delta and {
            k: self.router_delta[k] for k in ("path", "sha256")}}
        if self.upcast_router:
            identity["upcast_router"] = True
        if getattr(self.adapter.model, "tower_of", None):   # a multimodal checkpoint served through its text model
            identity["text_tower"] = self.adapter.model.tower_of
        return identity


def resolve_device(device: str, here: bool = True) -> str:
    """'auto' -> cuda if available else cpu; any other name must be a torch device that
    exists here (`here`), or, for a Ray driver that loads no weight (`here=False`), one that
    torch knows: its actors, not this machine, hold the device."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise SettingError(f"`device` {device!r} is not a device torch knows; use auto, cpu, cuda or cuda:N", "device") from None
    if parsed.type == "meta":
        raise SettingError("`device` meta holds no data; use auto, cpu, cuda or cuda:N", "device")
    if parsed.type != "cpu" and here:
        backend = getattr(torch, parsed.type, None)
        available = bool(backend and getattr(backend, "is_available", lambda: False)())
        if not available:
            raise SettingError(f"`device` {device} asked for but no {parsed.type} device is available here; "
                               "use `device` cpu", "device")
        count = getattr(backend, "device_count", lambda: 1)()
        if parsed.index is not None and parsed.index >= count:
            raise SettingError(f"`device` {device}: this machine has {count} {parsed.type} device(s) "
                               f"(indices 0..{count - 1})", "device")
    return device


def parse_device_map(text: str | None):
    """--device-map: None, "auto", "balanced", "sequential", or a JSON object module -> device."""
    if text is None or text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return text
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError:
        raise SettingError(f"`device_map` {text!r} is neither auto, balanced, sequential nor a JSON object "
                           'such as \'{"model.embed_tokens": "cpu", "model.layers": "cpu", ...}\'', "device_map") from None
    if not isinstance(mapping, dict) or not mapping:
        raise SettingError("`device_map` JSON must be a non-empty object mapping module names to devices", "device_map")
    for device in mapping.values():
        if device != "disk":
            resolve_device(f"cuda:{device}" if isinstance(device, int) else str(device))
    return mapping


def looks_local(spec: str) -> bool:
    """A spec written as a path (./x, ../x, /x, ~/x, x/ or Windows-style), not a hub id 'org/name'."""
    return (spec.startswith((".", "/", "~", os.sep)) or spec.endswith(("/", os.sep)) or spec.count("/") > 1
            or (os.altsep is not None and os.altsep in spec) or (len(spec) > 1 and spec[1] == ":"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_weight_files(folder: str) -> None:
    """A folder must hold safetensors weights; pickle-only weights are refused."""
    names = os.listdir(folder)
    if any(name.endswith(".safetensors") for name in names):
        return
    pickles = sorted(name for name in names if name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise RouteLensError(f"{folder} holds only pickle weights ({', '.join(pickles[:3])}); routelens reads "
                             "safetensors only, since unpickling can run code: in a session you trust, load it and "
                             "save_pretrained(folder) to write model.safetensors")
    raise RouteLensError(f"{folder} has a config.json but no weights (*.safetensors); "
                         "give a folder written by save_pretrained")


#: model types (as config.json names them) that routelens does not serve, with what stands in the way,
#: in one line each (scripts/moe_families.py shows the same reasons in docs/moe-families.md)
GROUPED_MM_STRIDES = "strides should be multiple of 16 bytes"


def experts_kernel_error(error: Exception) -> RouteLensError | None:
    """transformers' default grouped_mm experts fail on CPU for widths that are not 16-byte
    aligned: answer with the option that avoids it."""
    if GROUPED_MM_STRIDES in str(error):
        return SettingError("the grouped_mm experts kernel cannot run this model's expert width on this device "
                            f"({GROUPED_MM_STRIDES}); pass `experts_implementation` eager", "experts_implementation")
    return None


def _probe_forward(adapter: MoEAdapter) -> None:
    """Two tokens through the model: a kernel that cannot run fails here, in one line."""
    model = adapter.model
    try:
        with torch.no_grad():
            model(torch.tensor([[1, 2]], device=adapter.device) % model.config.vocab_size, use_cache=False,
                  logits_to_keep=1)
    except RuntimeError as error:
        translated = experts_kernel_error(error)
        if translated:
            raise translated from None
        raise


@contextmanager
def _router_weight_dtypes(adapter: MoEAdapter):
    """While open, record the dtype of the weights each router returns (layer -> dtype): what
    its MoE block is made to receive (bf16 for most families, fp32 for Mixtral, MiniMax and
    the DeepSeek-V3 style routers that compute in fp32 already)."""
    found: dict[int, torch.dtype] = {}

    def record(module, args, output, layer):
        output = adapter.route_of(output)   # a router with a layout of its own, as routelens reads it
        if isinstance(output, tuple) and len(output) == 3 and isinstance(output[1], torch.Tensor):
            found.setdefault(layer, output[1].dtype)

    handles = [router.register_forward_hook(lambda m, a, o, layer=layer: record(m, a, o, layer))
               for layer, router in adapter.routers.items()]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def _to_float32(value):
    is_float = isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32
    return value.float() if is_float else value


def upcast_routers(adapter: MoEAdapter, weight_dtypes: dict[int, torch.dtype]) -> None:
    """Make every router of a bf16/fp16 model compute in float32, the rest of the model
    keeping its dtype: the router's own parameters and buffers are cast to float32 once
    (exact: every bf16/fp16 value is a float32 value), a forward pre-hook casts its
    floating-point inputs (the hidden states, a bias its block passes) to float32, and a
    forward hook leaves its logits (now computed in float32) and casts its top-k weights back
    to the dtype the router returned before (`weight_dtypes`, layer -> dtype, as its block expects them; the model's
    dtype where unknown), so the experts and the residual stream are unchanged in dtype.
    Both hooks go first on their module (`prepend`), so every routelens hook sees the
    float32 logits. A router that already computes in float32 (DeepSeek-V3 style) computes
    the same values as before."""
    model_dtype = adapter.model.dtype

    def inputs_to_float32(module, args, kwargs):
        return tuple(_to_float32(a) for a in args), {k: _to_float32(v) for k, v in kwargs.items()}

    def weights_back(dtype: torch.dtype):
        def hook(module, args, output):
            route = adapter.route_of(output)   # a router with a layout of its own, as routelens reads it
            if not (isinstance(route, tuple) and len(route) == 3 and isinstance(route[1], torch.Tensor)):
                return None   # an unknown layout: routing.py's hooks name it
            logits, weights, experts = route
            return adapter.router_output(output, (logits, weights.to(dtype), experts))
        return hook

    for layer, router in adapter.routers.items():
        router.float()
        router.register_forward_pre_hook(inputs_to_float32, prepend=True, with_kwargs=True)
        router.register_forward_hook(weights_back(weight_dtypes.get(layer, model_dtype)), prepend=True)
    adapter.upcast_router = True


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "float32" if device == "cpu" else "bfloat16"
    if dtype not in DTYPES:
        raise SettingError(f"unknown `dtype` {dtype!r}; choose one of auto, {', '.join(DTYPES)}", "dtype")
    return dtype


def load_model(spec: str, device: str = "auto", dtype: str = "auto",
               trust_remote_code: bool = False, seed: int = 0, router_delta: str | None = None,
               device_map=None, experts_implementation: str | None = None, weights: bool = True,
               upcast_router: bool = False) -> LoadedModel:
    """Load `spec` in eval mode on `device` (or spread by `device_map`) with `dtype` and wrap
    it in its adapter; with `router_delta`, replace one router's weights by those of a
    `routelens router-update` file (checked to be made for this base model); with
    `upcast_router`, every router computes in float32 (`upcast_routers`; recorded, and a
    no-op in a float32 model), before the delta is applied so that a float32 delta stays exact.

    `weights=False` reads the config, the tokenizer and the delta's metadata but no weight:
    the model is built on the meta device, which is all a Ray driver needs (its actors load
    the weights from `recipe`), so the driver holds no copy on the GPUs the actors use."""
    if experts_implementation is not None and experts_implementation not in EXPERTS_IMPLEMENTATIONS:
        raise SettingError(f"unknown `experts_implementation` {experts_implementation!r}; "
                           f"choose one of {', '.join(EXPERTS_IMPLEMENTATIONS)}", "experts_implementation")
    device_map = parse_device_map(device_map) if isinstance(device_map, str) or device_map is None else device_map
    loaded = _load(spec, device, dtype, trust_remote_code, seed, device_map, weights)
    if experts_implementation is not None:
        loaded.adapter.model.set_experts_implementation(experts_implementation)
    upcast = upcast_router and DTYPES[loaded.dtype] in (torch.bfloat16, torch.float16)
    if loaded.weights:
        with _router_weight_dtypes(loaded.adapter) if upcast else nullcontext({}) as weight_dtypes:
            _probe_forward(loaded.adapter)
        if upcast:
            upcast_routers(loaded.adapter, weight_dtypes)
    loaded.upcast_router = upcast_router   # a Ray driver's (no weights) too: its actors upcast
    if router_delta:
        from routelens.models.router_delta import apply_router_delta

        # without weights, what can be checked is (architecture, config, layer); actors check the base too
        loaded.router_delta = apply_router_delta(loaded.adapter, os.path.abspath(router_delta),
                                                 check_base=loaded.weights)
    # the dtype as resolved here, so that a worker on another device computes what run.json says
    local = looks_local(spec) and os.path.isdir(os.path.expanduser(spec))   # a worker may start elsewhere
    loaded.recipe = dict(spec=os.path.abspath(os.path.expanduser(spec)) if local else spec, device=device,
                         dtype=loaded.dtype, trust_remote_code=trust_remote_code, seed=seed,
                         router_delta=os.path.abspath(router_delta) if router_delta else None, device_map=device_map,
                         experts_implementation=experts_implementation, upcast_router=upcast_router)
    return loaded


def _offload_folder(device_map) -> str | None:
    """A fresh folder for weights a device map sends to disk ("auto" may send some), or None.
    The weights in it are as large as the model: it is removed when the process exits
    (Ctrl-C included), as the model lives as long as the process."""
    may_offload = isinstance(device_map, str) or "disk" in device_map.values()
    if not may_offload:
        return None
    folder = tempfile.mkdtemp(prefix="routelens-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _dispatch(model, device_map, dtype: torch.dtype):
    """Spread an in-memory model over devices as accelerate does for from_pretrained."""
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        device_map = infer_auto_device_map(model, dtype=dtype)
    return dispatch_model(model, device_map=device_map, offload_dir=_offload_folder(device_map))


def _load(spec: str, device: str, dtype: str, trust_remote_code: bool, seed: int, device_map=None,
          weights: bool = True) -> LoadedModel:
    device = resolve_device(device, here=weights)
    dtype = resolve_dtype(dtype, device)
    placed = "device_map" if device_map is not None else device
    if spec.startswith(TINY_PREFIX):
        from routelens.models.tiny import TINY_CONFIGS, build_tiny_model

        model_type = spec[len(TINY_PREFIX):]
        refuse(model_type)
        adapter_class(model_type)  # unknown family -> the registry's error
        if model_type not in TINY_CONFIGS:
            raise RouteLensError(f"no tiny model for {model_type!r}; have {', '.join(TINY_CONFIGS)}")
        model = build_tiny_model(model_type, seed=seed).to(dtype=DTYPES[dtype])
        if device_map is not None:
            model = _dispatch(model, device_map, DTYPES[dtype])
        elif weights:   # a Ray driver's copy stays where it was built: its actors hold the device
            model = model.to(device)
        return LoadedModel(adapter_for(model), None, spec, placed, dtype)

    if spec == DEMO:
        from routelens.demo_model import WEIGHTS_DIR, is_available

        if not is_available():
            raise RouteLensError(f"the embedded demo model is missing from {WEIGHTS_DIR}; "
                                 "reinstall routelens or train one with `routelens train-demo`")
        loaded = _load(WEIGHTS_DIR, device, dtype, False, seed, device_map, weights)
        loaded.spec = DEMO
        return loaded

    is_folder = os.path.isdir(spec)
    if is_folder:
        spec = os.path.abspath(spec)  # the same run resumes from any working directory
    elif os.path.exists(spec):
        raise RouteLensError(f"model path {spec!r} is not a folder; give a folder written by save_pretrained or a hub id")
    elif looks_local(spec):
        raise SettingError(f"`model` {spec}: no such folder (a local model is a folder written by save_pretrained)", "model")
    if is_folder and not os.path.isfile(os.path.join(spec, "config.json")):
        raise RouteLensError(f"{spec} has no config.json; give a folder written by save_pretrained")
    local_only = not is_folder and not _in_hub_cache(spec, trust_remote_code) and not hub_reachable()
    if local_only:
        raise RouteLensError(f"cannot read the model config of {spec!r}: it is not in the local Hugging Face cache "
                             "and the hub cannot be reached (offline?); pass a local folder written by save_pretrained")
    try:
        config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        hint = "" if is_folder else " (no network here? pass a local folder written by save_pretrained)"
        raise RouteLensError(f"cannot read the model config of {spec!r}: {str(error).splitlines()[0]}{hint}") from None
    refuse(config.model_type)         # a type routelens refuses says why (issue 29), before reading weights
    family = adapter_class(config.model_type)   # fail fast, before reading weights
    family.check_config(config)
    tower = family.tower
    # a multimodal checkpoint: its full model is built, then served through its text model; a type
    # AutoModelForCausalLM does not map: the causal-LM class its family declares
    model_class = family.causal_lm_class()
    if is_folder:
        check_weight_files(spec)
    if not weights:   # the structure only: no weight is read, nothing is placed on a device
        with torch.device("meta"):
            model = from_config(model_class, config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
        if tower is not None:
            model = vision_language.text_tower(model, config.model_type, tower)
        return LoadedModel(adapter_for(model.eval()), load_tokenizer(spec, trust_remote_code), spec, placed, dtype,
                           folder=spec if is_folder else None, weights=False)
    # use_kernels=False: hub kernels replace whole MoE blocks (routes neither observable nor forceable)
    options = dict(dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_kernels=False)
    if _is_mxfp4(config):
        from transformers import Mxfp4Config

        print(f"routelens: {spec} is MXFP4-quantized; loading it dequantized to {dtype} so that its routers "
              "are observable (the quantized MLP computes router logits inline)", file=sys.stderr)
        options["quantization_config"] = Mxfp4Config(dequantize=True)
    if device_map is not None:
        options.update(device_map=device_map, offload_folder=_offload_folder(device_map))
    try:
        model = model_class.from_pretrained(spec, **options)
    except Exception as error:   # safetensors, accelerate and torch each raise their own types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RouteLensError(f"cannot load the weights of {spec!r}: {reason}") from None
    model = (model if device_map is not None else model.to(device)).eval()
    if tower is not None:
        model = vision_language.text_tower(model, config.model_type, tower)
        print(f"routelens: {spec}: serving {model.tower_notice}", file=sys.stderr)
    tokenizer = load_tokenizer(spec, trust_remote_code)
    adapter = adapter_for(model)
    described = adapter.describe()
    for key in LOAD_CAVEATS:   # what a user must know before reading a number of this family
        if described.get(key):
            print(f"routelens: {spec}: {described[key]}", file=sys.stderr)
    return LoadedModel(adapter, tokenizer, spec, placed, dtype, folder=spec if is_folder else None)


# describe() entries said on stderr at load: what is not counterfactual (LongCat-Flash's identity
# experts, Llama 4, JetMoE), and where the forward scored is not the one that generated (Unlimited-OCR)
LOAD_CAVEATS = ("counterfactual", "reference_sliding_window")


def from_config(model_class, config, **options):
    """A random-weight model of `config`: through an auto class's `from_config`, or a concrete
    model class's own `_from_config` (a family's declared `causal_lm`)."""
    if hasattr(model_class, "from_config"):
        return model_class.from_config(config, **options)
    options.pop("trust_remote_code", None)
    return model_class._from_config(config, **options)


def _is_mxfp4(config) -> bool:
    quantization = getattr(config, "quantization_config", None) or {}
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    return str(method).lower().endswith("mxfp4")


def _in_hub_cache(spec: str, trust_remote_code: bool) -> bool:
    try:
        AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code, local_files_only=True)
        return True
    except (OSError, ValueError):
        return False


def load_tokenizer(spec: str, trust_remote_code: bool = False, local_files_only: bool = False):
    """The tokenizer of a model spec, or None if it has none (token-id inputs still work);
    `demo` is the embedded model's, `tiny:` models have none."""
    if spec.startswith(TINY_PREFIX):
        return None
    if spec == DEMO:
        from routelens.demo_model import WEIGHTS_DIR

        spec = WEIGHTS_DIR
    try:
        return AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code, local_files_only=local_files_only)
    except (OSError, ValueError, TypeError):
        return None
