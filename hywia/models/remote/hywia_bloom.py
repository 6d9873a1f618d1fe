"""HyWIA-pruned Bloom for transformers alone, and the pruned attention hywia itself runs.

BloomModel builds one ALiBi tensor for config.n_head heads and hands it to every layer; a pruned layer picks the
rows of the heads it kept (their original slopes, see hywia_alibi), and `num_heads`, cached on the modules, is
refreshed. Layers are rebuilt at `config.hywia_layers` (heads, MLP width, kept heads) before the weights load.
"""

import torch
from torch import nn
from transformers import BloomConfig, BloomForCausalLM
from transformers.models.bloom.modeling_bloom import BloomAttention

from .hywia_alibi import HEADS_ATTR, kept_heads, select_heads


class PrunedBloomAttention(BloomAttention):
    """BloomAttention that keeps fewer heads: it takes the model-wide ALiBi tensor and uses its own heads' rows."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        residual: torch.Tensor,
        alibi: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_total = self.hidden_size // self.head_dim  # hidden_size is never pruned: the original head count
        alibi = select_heads(alibi, getattr(self, HEADS_ATTR), n_total)
        return super().forward(hidden_states, residual, alibi, attention_mask, **kwargs)


def _linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=old.bias is not None, device=old.weight.device,
                     dtype=old.weight.dtype)


def resize_layer(layer: nn.Module, widths: dict) -> None:
    """Give a freshly built Bloom block the saved widths and kept heads (values are loaded afterwards)."""
    attn, mlp = layer.self_attention, layer.mlp
    inner, hidden, width = widths["num_attention_heads"] * attn.head_dim, attn.hidden_size, widths["intermediate_size"]
    attn.query_key_value = _linear(attn.query_key_value, hidden, 3 * inner)
    attn.dense = _linear(attn.dense, inner, hidden)
    mlp.dense_h_to_4h = _linear(mlp.dense_h_to_4h, hidden, width)
    mlp.dense_4h_to_h = _linear(mlp.dense_4h_to_h, width, hidden)
    setattr(attn, HEADS_ATTR, list(widths[HEADS_ATTR]))
    refresh_layer(layer)


def refresh_layer(layer: nn.Module) -> None:
    """Attention reads its head count from `num_heads`; it also needs its kept heads' ALiBi rows."""
    attn = layer.self_attention
    attn.num_heads = layer.num_heads = attn.dense.in_features // attn.head_dim
    setattr(attn, HEADS_ATTR, kept_heads(attn, attn.num_heads))
    attn.__class__ = PrunedBloomAttention
    # The tensor-parallel emulation slices by the unpruned width; the plain matmul computes the same sum.
    attn.slow_but_exact = False


class HywiaBloomConfig(BloomConfig):
    model_type = "hywia_bloom"


class HywiaBloomForCausalLM(BloomForCausalLM):
    config_class = HywiaBloomConfig

    def __init__(self, config: HywiaBloomConfig):
        super().__init__(config)
        for layer, widths in zip(self.transformer.h, config.hywia_layers):
            resize_layer(layer, widths)
