"""Gemma-3 text decoders (`Gemma3ForCausalLM`): LLaMA's q/k/v/o and gate/up/down layout, so LLaMA's groups.

What differs does not touch the groups: q_norm/k_norm act on head_dim and are shared by all heads, the extra
pre/post-feedforward norms act on the hidden size, sliding-window layers differ only in their mask, and the
attention scale comes from query_pre_attn_scalar, not from the head count. Like LLaMA's, the forward reads widths
from the Linear modules; only `num_key_value_groups` (and the MLP's `intermediate_size`) are cached, so LLaMA's
modeling file (hywia_llama) rebuilds pruned layers too.

GGUF export writes llama.cpp's `gemma3`. That block builds every layer's tensors from layer 0's head counts and MLP
width (it reads the per-layer arrays but does not use them for Gemma-3), so only a model whose layers all keep the
same widths is expressible. What llama.cpp's gemma3 differs in, and how the file makes up for it:
- its RMSNorm multiplies by the weight where Gemma's multiplies by 1 + weight: every norm is written + 1;
- it scales queries by 1/sqrt(head_dim) (1/sqrt(hidden / heads of layer 0) for 62-layer models), Gemma by
  query_pre_attn_scalar^-1/2: the ratio is folded into q_norm, which acts on the query just before rope;
- it scales the embedding by sqrt(hidden) itself, as transformers does, so token_embd stays as it is;
- it rotates halves (NeoX rope), as transformers does, so q/k rows stay in order;
- rope bases per layer type (rope.freq_base for full attention, rope.freq_base_swa for sliding layers), the
  sliding window and which layers slide (sliding_window_pattern, one flag per layer) are keys of the file; linear
  rope scaling applies to the full-attention layers only, as in Gemma-3 4B and larger.
"""

from __future__ import annotations

import math

import gguf
import torch
from transformers import Gemma3ForCausalLM

from .base import GGUFMapping, register_adapter
from .llama import LlamaAdapter
from .pruned import pruned_classes

LLAMA_CPP_SCALE_BY_HIDDEN_LAYERS = 62  # llama.cpp takes such a model for Gemma-3-27B and scales by hidden / heads


@register_adapter("Gemma3ForCausalLM", "HywiaGemma3ForCausalLM")
class Gemma3Adapter(LlamaAdapter):
    """LLaMA's adapter for pruning; GGUF export through llama.cpp's gemma3 (see the module docstring)."""

    def gguf_mapping(self) -> GGUFMapping:
        problem = llama_cpp_gemma3_problem(self.model.config)
        return GGUFMapping(refusal=problem) if problem else GGUFMapping(native_arch="gemma3")

    def native_gguf_tensors(self, name: str, tensor: torch.Tensor, widths: list[dict]) -> dict[str, torch.Tensor]:
        if name.endswith("norm.weight"):
            tensor = tensor.float() + 1.0
            if name.endswith("self_attn.q_norm.weight"):
                tensor = tensor * self._query_scale_ratio(widths)
        return {name: tensor}

    def _query_scale_ratio(self, widths: list[dict]) -> float:
        """Gemma's query scale over llama.cpp's: multiplying q_norm by it gives Gemma's attention logits."""
        config = self.model.config
        scaled_dim = (config.hidden_size / widths[0]["num_attention_heads"]
                      if len(widths) == LLAMA_CPP_SCALE_BY_HIDDEN_LAYERS else config.head_dim)
        return math.sqrt(scaled_dim / config.query_pre_attn_scalar)

    def add_native_gguf_hparams(self, writer: gguf.GGUFWriter) -> None:
        config = self.model.config
        full, sliding = config.rope_parameters["full_attention"], config.rope_parameters["sliding_attention"]
        writer.add_context_length(config.max_position_embeddings)
        writer.add_rope_freq_base(float(full["rope_theta"]))
        writer.add_rope_freq_base_swa(float(sliding["rope_theta"]))
        if full["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(full["factor"]))
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])
        if config.final_logit_softcapping:
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def llama_cpp_gemma3_problem(config) -> str | None:
    """The one line saying why llama.cpp's gemma3 cannot run this configuration, or None when it can."""
    rope = config.rope_parameters or {}
    if set(rope) != {"full_attention", "sliding_attention"}:
        return f"GGUF export of Gemma-3 needs rope parameters per layer type; this config has {sorted(rope)}"
    if rope["sliding_attention"].get("rope_type", "default") != "default" or \
            rope["full_attention"].get("rope_type", "default") not in ("default", "linear"):
        return ("GGUF export of Gemma-3 supports default rope on sliding layers and default or linear rope on "
                f"full-attention layers (llama.cpp's gemma3); got {rope}")
    if config.hidden_activation != "gelu_pytorch_tanh":
        return f"GGUF export of Gemma-3 needs the tanh-approximated GELU of llama.cpp's gemma3; got " \
               f"{config.hidden_activation}"
    if config.attn_logit_softcapping or config.use_bidirectional_attention:
        return "GGUF export of Gemma-3 does not express attention logit soft-capping or bidirectional attention"
    return None


pruned_classes(Gemma3ForCausalLM)
