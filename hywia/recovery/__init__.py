"""LoRA recovery of pruned models (peft + transformers' Trainer)."""
