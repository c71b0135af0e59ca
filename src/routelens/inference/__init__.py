"""Inference engines run on the model a Lens serves, for the routing replay audit (issue 30).

`gguf_export` writes a GGUF file of the model (OLMoE, Qwen3-MoE) in f32, f16, q8_0 or q4_0
with the `gguf` package, checks that a GGUF belongs to a model; `llama_cpp` runs llama.cpp
(llama-cpp-python's low-level API) on trajectories and captures its routes and next-token
log-probs. Both need the optional extra `routelens[llama]` (`llama-cpp-python` is built from
its source package); nothing here is imported by `import routelens`.
"""
