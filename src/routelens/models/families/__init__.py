"""One adapter per MoE family: mostly data (which model types, the gating rule)."""
