"""Expert grafting: a donor model's expert FFN put into a recipient's expert slot.

`--experts "L:e=L2:e2,..."` copies, for each pair, the tensors of the donor's expert e2 at
layer L2 into the recipient's expert e at layer L (the adapter says which tensors are one
expert's: `expert_tensors`). Both models must be of one family, and each pair's tensors
of one shape; every other tensor, the routers included, stays the recipient's. The result
is a normal Hugging Face folder (safetensors, the recipient's tokenizer) with `graft.json`
recording the donor, the map, the sha256 of every tensor copied and replaced and the files
written; it is written whole or not at all (`routelens.analyses.graft.folder`).

The graft is applied in place and undone on exit (`graft_applied`), so the recipient can
be evaluated with and without it in one process.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from routelens.analyses.graft.folder import FORMAT, GRAFT_JSON, save_graft
from routelens.errors import RouteLensError, SettingError

__all__ = ["GRAFT_JSON", "GraftPair", "checkpoint_dtype", "graft_applied", "graft_record", "parse_expert_map",
           "plan_graft", "read_model_config", "save_grafted", "tensor_sha256", "write_grafted"]
_PAIR = re.compile(r"^\s*(-?\d+)\s*:\s*(\d+)\s*=\s*(-?\d+)\s*:\s*(\d+)\s*$")


@dataclass
class GraftPair:
    """Recipient (layer, expert) <- donor (layer, expert), and the donor's tensors to copy
    (recipient parameter name -> donor tensor, in the recipient's dtype)."""

    layer: int
    expert: int
    donor_layer: int
    donor_expert: int
    tensors: dict[str, torch.Tensor]

    @property
    def label(self) -> str:
        return f"{self.layer}:{self.expert}={self.donor_layer}:{self.donor_expert}"


def parse_expert_map(experts) -> list[tuple[int, int, int, int]]:
    """'L:e=L2:e2,...' (or [(L, e, L2, e2), ...]) -> [(L, e, L2, e2), ...]; a malformed pair
    is a one-line error."""
    if not isinstance(experts, str):
        try:
            pairs = [tuple(operator.index(value) for value in pair) for pair in experts]
        except TypeError:   # not a list of integer sequences (operator.index refuses floats and strings)
            pairs = []
        if not pairs or any(len(pair) != 4 for pair in pairs):
            raise SettingError(f"`experts` must be \"L:e=L2:e2,...\" or a non-empty list of (L, e, L2, e2) integer "
                               f"tuples, got {experts!r}", "experts")
        return pairs
    if not experts.strip():
        raise SettingError("`experts` is empty; give LAYER:EXPERT=DONOR_LAYER:DONOR_EXPERT pairs, e.g. 3:5=3:9", "experts")
    pairs = []
    for part in experts.split(","):
        match = _PAIR.match(part)
        if not match:
            what = "an empty pair (a stray comma?)" if not part.strip() else repr(part.strip())
            raise SettingError(f"`experts`: {what} is not LAYER:EXPERT=DONOR_LAYER:DONOR_EXPERT "
                               "(e.g. 3:5=3:9; pairs comma-separated)", "experts")
        pairs.append(tuple(int(group) for group in match.groups()))
    return pairs


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (contiguous, on CPU), with its dtype and shape."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def plan_graft(recipient, donor, mapping: list[tuple[int, int, int, int]]) -> list[GraftPair]:
    """Check the map against both models and collect the donor's tensors for each pair."""
    r, d = recipient.adapter, donor.adapter
    if r.config.model_type != d.config.model_type:
        raise RouteLensError(f"the donor is a {d.config.model_type} model and the recipient a {r.config.model_type} "
                             "model; grafting copies an expert between models of one family")
    targets = set()
    plan = []
    for layer, expert, donor_layer, donor_expert in mapping:
        layer, donor_layer = _layer(r, layer, "recipient"), _layer(d, donor_layer, "donor")
        for model, at, slot, which in ((r, layer, expert, "recipient"), (d, donor_layer, donor_expert, "donor")):
            if not 0 <= slot < model.num_experts:
                raise RouteLensError(f"{which} expert {slot} at layer {at} does not exist: the {which} has "
                                     f"{model.num_experts} experts (0..{model.num_experts - 1})")
        if (layer, expert) in targets:
            raise RouteLensError(f"recipient expert {layer}:{expert} is grafted twice; give each slot one donor")
        targets.add((layer, expert))
        into, source = r.expert_tensors(layer, expert), d.expert_tensors(donor_layer, donor_expert)
        tensors = {}
        for (name, slot_tensor), (donor_name, donor_tensor) in zip(into.items(), source.items(), strict=True):
            if slot_tensor.shape != donor_tensor.shape:
                raise RouteLensError(f"{name} of recipient expert {layer}:{expert} is {tuple(slot_tensor.shape)} but "
                                     f"{donor_name} of donor expert {donor_layer}:{donor_expert} is "
                                     f"{tuple(donor_tensor.shape)}: only experts of one shape can be grafted")
            tensors[name] = donor_tensor.detach().to(slot_tensor.dtype).clone()
        if all(torch.equal(tensors[name], slot.detach().to(tensors[name].device)) for name, slot in into.items()):
            raise RouteLensError(f"recipient expert {layer}:{expert} already holds the tensors of donor expert "
                                 f"{donor_layer}:{donor_expert} (the same model and slot?): the pair changes nothing; "
                                 "map the slot to another expert")
        plan.append(GraftPair(layer, expert, donor_layer, donor_expert, tensors))
    return plan


def _layer(adapter, layer: int, role: str) -> int:
    """`layer` of the recipient's or the donor's (negative from the end); an error names which."""
    try:
        (resolved,) = adapter.resolve_layers([layer])
    except RouteLensError as error:
        raise RouteLensError(f"the {role}'s {error}") from None
    return resolved


@contextmanager
def graft_applied(adapter, plan: list[GraftPair]):
    """The recipient with the plan's tensors copied in; its own tensors put back on exit."""
    saved = []
    try:
        with torch.no_grad():
            for pair in plan:
                for name, slot in adapter.expert_tensors(pair.layer, pair.expert).items():
                    saved.append((slot, slot.detach().clone()))
                    slot.copy_(pair.tensors[name].to(slot.device))
        yield adapter
    finally:
        with torch.no_grad():
            for slot, original in reversed(saved):
                slot.copy_(original)


def graft_record(recipient, donor, plan: list[GraftPair]) -> dict:
    """What graft.json records: both models, and per pair the sha256 of every tensor copied
    in (the donor's) and of the recipient's tensor it replaced."""
    pairs = []
    for pair in plan:
        slots = recipient.adapter.expert_tensors(pair.layer, pair.expert)
        pairs.append({"pair": pair.label, "layer": pair.layer, "expert": pair.expert, "donor_layer": pair.donor_layer,
                      "donor_expert": pair.donor_expert,
                      "tensors": {name: {"shape": list(tensor.shape), "donor_sha256": tensor_sha256(tensor),
                                         "replaced_sha256": tensor_sha256(slots[name])}
                                  for name, tensor in pair.tensors.items()}})
    return {"format": FORMAT, "recipient": recipient.spec, "donor": donor.spec,
            "family": recipient.adapter.config.model_type, "dtype": recipient.dtype, "pairs": pairs}


def write_grafted(out: str, recipient, donor, plan: list[GraftPair], overwrite: bool = False) -> dict:
    """Save the grafted recipient as a Hugging Face folder with graft.json, whole or not at
    all (`routelens.analyses.graft.folder`); `out` holding this very graft is kept. Returns
    graft.json's record."""
    return save_grafted(out, recipient, donor, plan, overwrite)[0]


def save_grafted(out: str, recipient, donor, plan: list[GraftPair], overwrite: bool = False) -> tuple[dict, bool]:
    """`write_grafted`, and whether `out` already held this graft (kept, not written again)."""
    return save_graft(out, graft_record(recipient, donor, plan), lambda folder: save_model(folder, recipient, plan),
                      overwrite)


def save_model(folder: str, recipient, plan: list[GraftPair]) -> None:
    """The recipient with the plan applied, saved with its tokenizer into `folder`."""
    with graft_applied(recipient.adapter, plan):
        recipient.adapter.model.save_pretrained(folder)
    if recipient.tokenizer is not None:
        recipient.tokenizer.save_pretrained(folder)


def checkpoint_dtype(spec: str) -> str:
    """The dtype a checkpoint was saved in (config.json's `dtype`), so the grafted folder
    keeps it; float32 when it says none (and for tiny random models)."""
    from routelens.models.loading import DEMO, DTYPES, TINY_PREFIX

    if spec.startswith(TINY_PREFIX):
        return "float32"
    if spec == DEMO:
        from routelens.demo_model import WEIGHTS_DIR as spec
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "config.json")):
        config = read_model_config(os.path.join(spec, "config.json"))
        name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
        return name if name in DTYPES else "float32"
    from transformers import AutoConfig

    try:
        dtype = AutoConfig.from_pretrained(spec).dtype
    except Exception:  # the loader reports an unreadable model in its own words
        return "float32"
    name = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    return name if name in DTYPES else "float32"



def read_model_config(path: str) -> dict:
    """A model folder's config.json, refused in one line naming the file when it is not a
    JSON object in UTF-8 text."""
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except UnicodeDecodeError:
        raise RouteLensError(f"{path} is not UTF-8 text; a model's config.json is the JSON save_pretrained "
                             "writes") from None
    except json.JSONDecodeError as error:
        raise RouteLensError(f"{path} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); "
                             "a model's config.json is the JSON save_pretrained writes") from None
    except OSError as error:
        raise RouteLensError(f"cannot read {path}: {error.strerror}") from None
    if not isinstance(config, dict):
        raise RouteLensError(f"{path} holds JSON but not an object; a model's config.json is the JSON save_pretrained "
                             "writes")
    return config
