"""Routes an inference engine chose (issue 30: the routing replay audit), aligned to the
tokens of trajectories, in one shape every reader produces and every consumer reads.

An `EngineRoutes` holds, per trajectory id, an int array [T, L, k]: for each of the
trajectory's T tokens (position t is token t of its `input_ids`, the prompt included) and
each of the model's L MoE layers (`layers`, decoder-layer indices, in order), the k expert
ids the engine's router chose for that token at that layer, -1 where the engine reported no
routed expert (a dense layer, an unused slot, a token the engine did not route). The
readers (`routelens.data.engine_routes_io`: SGLang, vLLM, .npy, Parquet; the llama.cpp
capture; a second Hugging Face run under `--compare-to`) produce one; the replay analysis
(`routelens.analyses.replay`) compares it with the model's own routes and forces it.

Examples:
    >>> import numpy as np
    >>> routes = EngineRoutes({"t0": np.array([[[0, 1]], [[2, 3]]])}, layers=[1], top_k=2, source="npy")
    >>> routes.shape("t0")
    (2, 1, 2)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from routelens.errors import RouteLensError

#: what position t of a route array stands for: token t of the trajectory's input_ids
ALIGNMENT = "position t = token t of input_ids (prompt included)"


@dataclass
class EngineRoutes:
    """Per trajectory id: int [T, L, k] expert ids (-1: none) at each MoE layer of `layers`.

    `source` says where they came from ("sglang", "vllm", "npy", "parquet",
    "llama.cpp:q8_0", "hf:dtype=bfloat16", ...); `meta` keeps what the source said besides
    (model name, engine version, the file's header), recorded in the run's run.json;
    `logprobs` the engine's own next-token log-probs where it gives them (the replay audit
    then says how much of its gap to the model is routing).

    Examples:
        >>> import numpy as np
        >>> from routelens import EngineRoutes
        >>> routes = EngineRoutes({"t0": np.array([[[0, 1]], [[2, -1]]])}, layers=[3], top_k=2, source="npy")
        >>> routes.layers, routes.shape("t0")
        ([3], (2, 1, 2))
    """

    experts: dict[str, np.ndarray]
    layers: list[int]
    top_k: int
    source: str
    alignment: str = ALIGNMENT
    meta: dict = field(default_factory=dict)
    #: per trajectory id, where the engine gives them: its log p of token t + 1 at position t,
    #: float [T - 1] (what it sampled with; llama.cpp run by routelens gives them)
    logprobs: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        from routelens.errors import SettingError

        if not isinstance(self.experts, dict):
            raise SettingError(f"`experts` must be a dict of trajectory id -> int array [tokens, layers, k], got "
                               f"{type(self.experts).__name__}", "experts")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 1:
            raise SettingError(f"`top_k` must be an integer >= 1 (experts per token), got {self.top_k!r}", "top_k")
        if not isinstance(self.layers, (list, tuple)) or not all(
                isinstance(layer, (int, np.integer)) and not isinstance(layer, bool) for layer in self.layers):
            raise SettingError(f"`layers` must be a list of decoder-layer indices, got {self.layers!r}", "layers")
        if not isinstance(self.source, str):
            raise SettingError(f"`source` must be a string naming where the routes came from, got {self.source!r}",
                               "source")
        for trajectory_id, routes in list(self.experts.items()):
            if not isinstance(trajectory_id, str):
                raise SettingError(f"`experts` must be keyed by trajectory id (a string), got {trajectory_id!r}",
                                   "experts")
            if not isinstance(routes, np.ndarray):   # nested lists, a tensor: as an array
                try:
                    routes = self.experts[trajectory_id] = np.asarray(routes.cpu() if hasattr(routes, "cpu") else routes)
                except ValueError:
                    raise RouteLensError(f"routes of trajectory {trajectory_id!r} are ragged lists, not an array "
                                         "[tokens, layers, k]") from None
            if routes.ndim != 3 or routes.shape[1:] != (len(self.layers), self.top_k):
                raise RouteLensError(
                    f"routes of trajectory {trajectory_id!r} have shape {routes.shape}; expected [tokens, "
                    f"{len(self.layers)} MoE layers, k={self.top_k}]")

    def shape(self, trajectory_id: str) -> tuple[int, int, int]:
        return tuple(self.experts[trajectory_id].shape)
