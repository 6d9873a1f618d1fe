"""Qwen3: LLaMA's q/k/v/o and gate/up/down layout with GQA, plus q_norm/k_norm on head_dim.

The per-head norms have head_dim weights shared by every head, so they stay whole when heads go and the groups
are LLaMA's (query head h reads KV head h // (H / KV)). LLaMA's modeling file (hywia_llama) rebuilds pruned layers.
The q/k norms are not part of llama.cpp's llama block, so GGUF export writes llama.cpp's `qwen3`, whose widths are
the same in every layer.
"""

from __future__ import annotations

from transformers import Qwen3ForCausalLM

from .base import GGUFMapping, register_adapter
from .llama import LlamaAdapter
from .pruned import pruned_classes


@register_adapter("Qwen3ForCausalLM", "HywiaQwen3ForCausalLM")
class Qwen3Adapter(LlamaAdapter):
    """LLaMA's adapter applies as it is; GGUF goes through llama.cpp's qwen3 (rotates halves, as transformers)."""

    def gguf_mapping(self) -> GGUFMapping:
        return GGUFMapping(native_arch="qwen3")


pruned_classes(Qwen3ForCausalLM)
