"""Gemma-3 text decoders (`Gemma3ForCausalLM`): LLaMA's q/k/v/o and gate/up/down layout, so LLaMA's groups.

What differs does not touch the groups: q_norm/k_norm act on head_dim and are shared by all heads, the extra
pre/post-feedforward norms act on the hidden size, sliding-window layers differ only in their mask, and the
attention scale comes from query_pre_attn_scalar, not from the head count. Like LLaMA's, the forward reads widths
from the Linear modules; only `num_key_value_groups` (and the MLP's `intermediate_size`) are cached, so LLaMA's
modeling file (hywia_llama) rebuilds pruned layers too.
"""

from __future__ import annotations

from transformers import Gemma3ForCausalLM

from .base import GGUFMapping, register_adapter
from .llama import LlamaAdapter
from .pruned import pruned_classes

GGUF_REFUSAL = (
    "GGUF export does not write Gemma-3: its block (GELU gate, pre/post norms, q/k norms, sliding-window layers) is "
    "not llama.cpp's llama block and hywia has no gemma3 mapping, whatever the prune options; run the pruned "
    "folder with transformers"
)


@register_adapter("Gemma3ForCausalLM", "HywiaGemma3ForCausalLM")
class Gemma3Adapter(LlamaAdapter):
    """LLaMA's adapter applies as it is; registered under Gemma-3's architecture names."""

    def gguf_mapping(self) -> GGUFMapping:
        return GGUFMapping(refusal=GGUF_REFUSAL)


pruned_classes(Gemma3ForCausalLM)
