"""PhiMoE: sparsemixer, always top-2 whatever num_experts_per_tok.

In eval the first expert is the argmax; its weight is its softmax probability among the
experts whose logit lies within a relative margin 2 * jitter_eps of the maximum. The
second expert is the argmax with the first masked out, weighted the same way relative to
its own logit. For an arbitrary pair the model's own formula (its training path, which
accepts any selected expert) gives the weights: the member with the higher logit plays
"first", the masks stay relative to the true maxima. A weight can therefore be 0 when an
expert lies far below the maximum - exactly what the model would apply.
"""

from __future__ import annotations

import torch

from routelens.models.adapter import MoEAdapter


def _masked_softmax_at(scores: torch.Tensor, reference: torch.Tensor, jitter_eps: float,
                       chosen: torch.Tensor) -> torch.Tensor:
    """softmax over the experts within the sparsemixer margin of `reference`, read at `chosen`."""
    factor = scores.abs().clamp(min=reference)
    masked = scores.masked_fill(((reference - scores) / factor) > (2 * jitter_eps), float("-inf"))
    return torch.softmax(masked, dim=-1).gather(-1, chosen)


class PhimoeAdapter(MoEAdapter):
    gate = None   # the sparsemixer is code: weights_for below

    def _top_k(self, router) -> int:
        return 2

    def weights_for(self, logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        if experts.shape[-1] != 2:
            raise ValueError(f"PhiMoE routes always have 2 experts, got {experts.shape[-1]}")
        eps = self.config.router_jitter_noise
        scores = logits.float()
        pair = scores.gather(-1, experts)
        first_slot = pair.argmax(dim=-1, keepdim=True)          # higher logit plays "first"
        first = experts.gather(-1, first_slot)
        second = experts.gather(-1, 1 - first_slot)
        w_first = _masked_softmax_at(scores, scores.max(dim=-1, keepdim=True).values, eps, first)
        without_first = scores.scatter(-1, first, float("-inf"))
        w_second = _masked_softmax_at(
            without_first, without_first.max(dim=-1, keepdim=True).values, eps, second
        )
        # put the weights back in the order of `experts`
        return torch.where(first_slot == 0, torch.cat([w_first, w_second], -1),
                           torch.cat([w_second, w_first], -1))
