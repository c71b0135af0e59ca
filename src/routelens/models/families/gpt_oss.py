"""GPT-OSS: the router has a bias; top-k on the raw logits, then softmax over the k chosen
logits. The MegaBlocks hub kernel would bypass router hooks; the override's fire check
catches that."""

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import TOPK_THEN_SOFTMAX


class GptOssAdapter(MoEAdapter):
    gate = TOPK_THEN_SOFTMAX
