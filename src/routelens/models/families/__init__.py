"""One adapter per MoE family: a `gate` and a `layout` (data, `routelens.models.spec`), plus
code only where an answer is computed (PhiMoE's sparsemixer, residual multipliers, caches)."""
