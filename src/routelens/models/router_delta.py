"""A router delta: new weights for one MoE layer's router, saved apart from the model.

The file is a small safetensors file holding, for every parameter of the router module
(weight, and bias where the family has one), the new tensor under its full parameter name
and the base model's tensor under `base.<name>`. Its metadata names the base model (spec,
architecture, model type, a hash of the config) and the layer, and holds a sha256 of the
tensors, checked on reading (a file altered or damaged after saving is refused). Applying it checks that the
model is that base: same architecture and config hash, and its router tensors equal the
stored base tensors (exactly in the same dtype; to the coarser dtype's rounding when the
model was loaded in another). Anything else is a one-line error.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from routelens.errors import RouteLensError
from routelens.models.adapter import MoEAdapter

FORMAT = "routelens-router-delta/1"
BASE_PREFIX = "base."


def config_sha256(config) -> str:
    """Hash of the model config, without paths and versions (the same model anywhere)."""
    fields = {k: v for k, v in config.to_dict().items()
              if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of names, dtypes, shapes and bytes of every tensor, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def router_parameter_names(adapter: MoEAdapter, layer: int) -> dict[str, torch.nn.Parameter]:
    """Full names (as in `model.named_parameters()`) of the router's parameters at `layer`."""
    router = adapter.routers[layer]
    prefix = adapter.module_name(router)
    return {f"{prefix}.{name}": parameter for name, parameter in router.named_parameters()}


def save_router_delta(path: str, adapter: MoEAdapter, layer: int, base: dict[str, torch.Tensor],
                      spec: str, extra: dict | None = None) -> None:
    """Write the router's current parameters at `layer` and their `base` values to `path`."""
    from safetensors.torch import save_file

    tensors = {}
    for name, parameter in router_parameter_names(adapter, layer).items():
        tensors[name] = parameter.detach().cpu().contiguous()
        tensors[BASE_PREFIX + name] = base[name].detach().cpu().contiguous()
    metadata = {"format": FORMAT, "layer": str(layer), "base_model": spec,
                "architecture": type(adapter.model).__name__, "model_type": adapter.config.model_type,
                "config_sha256": config_sha256(adapter.config), "tensors_sha256": tensors_sha256(tensors)}
    metadata.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    save_file(tensors, path + ".tmp", metadata=metadata)   # a kill leaves no half-written delta
    os.replace(path + ".tmp", path)


def read_router_delta(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if os.path.isdir(path):
        raise RouteLensError(f"router delta {path!r} is a folder; give the router_delta.safetensors file a "
                             "`routelens router-update` run wrote")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except FileNotFoundError:
        raise RouteLensError(f"router delta {path!r} does not exist") from None
    except Exception as error:  # safetensors raises its own error types for a bad header
        raise RouteLensError(f"{path}: not a safetensors router delta ({error})") from None
    if metadata.get("format") != FORMAT:
        raise RouteLensError(f"{path}: not a routelens router delta (format {metadata.get('format')!r}, "
                             f"expected {FORMAT!r}); make one with `routelens router-update`")
    stored = metadata.get("tensors_sha256")
    if stored is None:
        raise RouteLensError(f"{path}: the router delta has no tensors_sha256 in its metadata, so its tensors cannot "
                             "be checked; make it again with `routelens router-update`")
    if tensors_sha256(tensors) != stored:
        raise RouteLensError(f"{path}: the router delta's tensors do not match the checksum in its metadata "
                             "(altered or damaged after saving); make it again with `routelens router-update`")
    return tensors, metadata


def _same_base(stored: torch.Tensor, current: torch.Tensor) -> bool:
    if stored.shape != current.shape:
        return False
    if stored.dtype == current.dtype:
        return torch.equal(stored, current.cpu())
    coarse = stored.dtype if torch.finfo(stored.dtype).eps > torch.finfo(current.dtype).eps else current.dtype
    return torch.equal(stored.to(coarse), current.cpu().to(coarse))


def apply_router_delta(adapter: MoEAdapter, path: str, check_base: bool = True) -> dict:
    """Replace the router's parameters with the delta's, after checking the model is its base.
    Returns what `run.json` records: the path, the file's sha256, the layer and the base.
    `check_base=False` (a model without weights, a Ray driver's): the checks that need no
    weight only, and nothing replaced."""
    from routelens.data.trajectories import file_sha256

    tensors, metadata = read_router_delta(path)
    made_for = metadata.get("base_model", "?")
    if metadata.get("architecture") != type(adapter.model).__name__ or \
            metadata.get("config_sha256") != config_sha256(adapter.config):
        raise RouteLensError(f"router delta {path} was made for another model ({made_for}, "
                             f"{metadata.get('architecture')}); this model's architecture or config differs. "
                             "Apply it to the base model it was trained on")
    layer = int(metadata["layer"])
    if layer not in adapter.routers:
        raise RouteLensError(f"router delta {path} targets layer {layer}, which is not an MoE layer of this model")
    parameters = router_parameter_names(adapter, layer)
    new = {k: v for k, v in tensors.items() if not k.startswith(BASE_PREFIX)}
    if set(new) != set(parameters):
        raise RouteLensError(f"router delta {path} holds {sorted(new)}, but the router at layer {layer} has "
                             f"{sorted(parameters)}; it was made for another model")
    record = {"path": path, "sha256": file_sha256(path), "layer": layer, "base_model": made_for}
    if not check_base:
        return record
    for name, parameter in parameters.items():
        if not _same_base(tensors[BASE_PREFIX + name], parameter.detach()):
            raise RouteLensError(f"router delta {path} was made for another base model ({made_for}): this model's "
                                 f"{name} differs from the one the delta was trained from")
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(new[name].to(parameter.device, parameter.dtype))
    return record
