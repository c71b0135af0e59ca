"""GPT-OSS: the router has a bias; top-k on the raw logits, then softmax over the k chosen
logits. The MegaBlocks hub kernel would bypass router hooks; the override's fire check
catches that."""

from __future__ import annotations

import torch

from routelens.models.adapter import MoEAdapter


class GptOssAdapter(MoEAdapter):
    model_types = ("gpt_oss",)

    def weights_for(self, logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float().gather(-1, experts), dim=-1)
