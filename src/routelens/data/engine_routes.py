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
    (model name, engine version, the file's header), recorded in the run's run.json.

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

    def __post_init__(self):
        for trajectory_id, routes in self.experts.items():
            if routes.ndim != 3 or routes.shape[1:] != (len(self.layers), self.top_k):
                raise RouteLensError(
                    f"routes of trajectory {trajectory_id!r} have shape {routes.shape}; expected [tokens, "
                    f"{len(self.layers)} MoE layers, k={self.top_k}]")

    def shape(self, trajectory_id: str) -> tuple[int, int, int]:
        return tuple(self.experts[trajectory_id].shape)
