"""HyWIA-pruned Phi-3 for transformers alone, and the pruned attention hywia itself runs.

Phi3Attention splits its fused qkv_proj output at config.num_attention_heads * head_dim, a model-wide count; a
pruned layer has its own, so PrunedPhi3Attention splits at its own widths (read from o_proj and
num_key_value_heads) and otherwise computes as Phi3Attention does. The fused gate_up_proj is chunked in halves, so
it needs nothing. Layers are rebuilt at `config.hywia_layers` before the weights load.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import Phi3Config, Phi3ForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.phi3.modeling_phi3 import Phi3Attention, apply_rotary_pos_emb, eager_attention_forward


class PrunedPhi3Attention(Phi3Attention):
    """Phi3Attention whose q/k/v split follows the layer's own head counts."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        q_size, kv_size = self.o_proj.in_features, self.num_key_value_heads * self.head_dim
        query, key, value = (
            part.view(*input_shape, -1, self.head_dim).transpose(1, 2)
            for part in self.qkv_proj(hidden_states).split([q_size, kv_size, kv_size], dim=-1)
        )
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention(
            self, query, key, value, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
            sliding_window=getattr(self.config, "sliding_window", None), **kwargs,
        )
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


def _linear(old: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


def resize_layer(layer: nn.Module, widths: dict) -> None:
    """Give a freshly built decoder layer the saved widths and added output biases (values are loaded afterwards)."""
    attn, mlp = layer.self_attn, layer.mlp
    hidden, d, width = attn.o_proj.out_features, attn.head_dim, widths["intermediate_size"]
    q_out, kv_out = widths["num_attention_heads"] * d, widths["num_key_value_heads"] * d
    added = set(widths.get("added_biases", ()))
    attn.qkv_proj = _linear(attn.qkv_proj, hidden, q_out + 2 * kv_out, attn.qkv_proj.bias is not None)
    attn.o_proj = _linear(attn.o_proj, q_out, hidden, attn.o_proj.bias is not None or "self_attn.o_proj" in added)
    mlp.gate_up_proj = _linear(mlp.gate_up_proj, hidden, 2 * width, mlp.gate_up_proj.bias is not None)
    mlp.down_proj = _linear(mlp.down_proj, width, hidden, mlp.down_proj.bias is not None or "mlp.down_proj" in added)
    refresh_layer(layer, widths["num_key_value_heads"])


def refresh_layer(layer: nn.Module, kv_heads: int) -> None:
    """Cache the layer's KV head count and GQA factor on its attention, which splits qkv by them."""
    attn = layer.self_attn
    attn.num_key_value_heads = kv_heads
    attn.num_key_value_groups = attn.o_proj.in_features // attn.head_dim // kv_heads
    attn.__class__ = PrunedPhi3Attention


class HywiaPhi3Config(Phi3Config):
    model_type = "hywia_phi3"


class HywiaPhi3ForCausalLM(Phi3ForCausalLM):
    config_class = HywiaPhi3Config

    def __init__(self, config: HywiaPhi3Config):
        super().__init__(config)
        for layer, widths in zip(self.model.layers, config.hywia_layers):
            resize_layer(layer, widths)
