"""Loading a MoE causal LM (hub id, local folder, or a built-in tiny model) with its adapter.

Model specs:
- a local folder written by `save_pretrained` (config.json + weights [+ tokenizer]);
- a Hugging Face hub id (needs network or a populated cache);
- `tiny:<model_type>`: a random-weight tiny model of that family (tests, quick tries);
- `demo`: the embedded demo model shipped inside the package (`routelens.demo_model`).

The architecture is checked from the config before any weights are read, so an
unsupported model fails in a second. `trust_remote_code` is off unless asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from routelens.errors import RouteLensError
from routelens.models.adapter import MoEAdapter
from routelens.models.registry import adapter_class, adapter_for

TINY_PREFIX = "tiny:"
DEMO = "demo"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    adapter: MoEAdapter
    tokenizer: object | None
    spec: str
    device: str
    dtype: str
    folder: str | None = None  # the local folder the weights came from, if any
    router_delta: dict | None = None  # the router delta applied on top, if any (path, sha256, layer)

    def identity(self) -> dict:
        """What identifies the model in a run's config."""
        return {"model": self.spec, "router_delta": self.router_delta and {
            k: self.router_delta[k] for k in ("path", "sha256")}}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RouteLensError(f"--device {device} asked for but no CUDA device is available; use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "float32" if device == "cpu" else "bfloat16"
    if dtype not in DTYPES:
        raise RouteLensError(f"unknown --dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return dtype


def load_model(spec: str, device: str = "auto", dtype: str = "auto",
               trust_remote_code: bool = False, seed: int = 0, router_delta: str | None = None) -> LoadedModel:
    """Load `spec` in eval mode on `device` with `dtype` and wrap it in its adapter; with
    `router_delta`, replace one router's weights by those of a `routelens router-update`
    file (checked to be made for this base model)."""
    loaded = _load(spec, device, dtype, trust_remote_code, seed)
    if router_delta:
        from routelens.models.router_delta import apply_router_delta

        loaded.router_delta = apply_router_delta(loaded.adapter, os.path.abspath(router_delta))
    return loaded


def _load(spec: str, device: str, dtype: str, trust_remote_code: bool, seed: int) -> LoadedModel:
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if spec.startswith(TINY_PREFIX):
        from routelens.models.tiny import TINY_CONFIGS, build_tiny_model

        model_type = spec[len(TINY_PREFIX):]
        adapter_class(model_type)  # unknown family -> the registry's error
        if model_type not in TINY_CONFIGS:
            raise RouteLensError(f"no tiny model for {model_type!r}; have {', '.join(TINY_CONFIGS)}")
        model = build_tiny_model(model_type, seed=seed).to(device=device, dtype=DTYPES[dtype])
        return LoadedModel(adapter_for(model), None, spec, device, dtype)

    if spec == DEMO:
        from routelens.demo_model import WEIGHTS_DIR, is_available

        if not is_available():
            raise RouteLensError(f"the embedded demo model is missing from {WEIGHTS_DIR}; "
                                 "reinstall routelens or train one with `routelens train-demo`")
        loaded = _load(WEIGHTS_DIR, device, dtype, False, seed)
        loaded.spec = DEMO
        return loaded

    is_folder = os.path.isdir(spec)
    if is_folder:
        spec = os.path.abspath(spec)  # the same run resumes from any working directory
    if os.path.exists(spec) and not is_folder:
        raise RouteLensError(f"model path {spec!r} is not a folder; give a folder written by save_pretrained or a hub id")
    try:
        config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        hint = "" if is_folder else " (no network here? pass a local folder written by save_pretrained)"
        raise RouteLensError(f"cannot read the model config of {spec!r}: {str(error).splitlines()[0]}{hint}") from None
    adapter_class(config.model_type)  # fail fast, before reading weights
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise RouteLensError(f"cannot load the weights of {spec!r}: {str(error).splitlines()[0]}") from None
    model = model.to(device).eval()
    tokenizer = load_tokenizer(spec, trust_remote_code)
    return LoadedModel(adapter_for(model), tokenizer, spec, device, dtype, folder=spec if is_folder else None)


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
