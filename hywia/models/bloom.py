"""Bloom: multi-head attention with a fused, per-head interleaved query_key_value and ALiBi positions.

`query_key_value` computes [batch, seq, heads, 3, head_dim], so head h owns the 3*head_dim consecutive rows
h*3*d .. (h+1)*3*d (its q, k and v) plus their bias, and columns h*d .. (h+1)*d of `dense`. Bloom is MHA, so a
head is also its own KV group: heads are removed with their q, k and v (kind "kv", whatever `attention` says).
BloomModel builds one ALiBi tensor for config.n_head heads and hands it to every layer; a pruned layer picks the
rows of the heads it kept (see hywia.models.alibi), and `num_heads`, cached on the modules, is refreshed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BloomForCausalLM
from transformers.models.bloom.modeling_bloom import BloomAttention

from .alibi import HEADS_ATTR, keep_heads, kept_heads, select_heads
from .base import Adapter, GroupSpec, TensorSlice, register_adapter
from .pruned import pruned_classes
from .surgery import resize_linear, select_param


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


@register_adapter("BloomForCausalLM", "HywiaBloomForCausalLM")
class BloomAdapter(Adapter):
    def layers(self) -> list[nn.Module]:
        return list(self.model.transformer.h)

    def layer_name(self, index: int) -> str:
        return f"transformer.h.{index}"

    def _heads(self, layer: nn.Module) -> int:
        attn = layer.self_attention
        return attn.dense.in_features // attn.head_dim

    def group_specs(self, layer: nn.Module) -> list[GroupSpec]:
        d = layer.self_attention.head_dim
        head_spec = GroupSpec(
            kind="kv",
            count=self._heads(layer),
            slices=(
                TensorSlice("self_attention.query_key_value.weight", 0, 3 * d),
                TensorSlice("self_attention.query_key_value.bias", 0, 3 * d),
                TensorSlice("self_attention.dense.weight", 1, d),
            ),
            gate_module="self_attention.dense",
            gate_block=d,
        )
        mlp_spec = GroupSpec(
            kind="mlp",
            count=layer.mlp.dense_h_to_4h.out_features,
            slices=(
                TensorSlice("mlp.dense_h_to_4h.weight", 0, 1),
                TensorSlice("mlp.dense_h_to_4h.bias", 0, 1),
                TensorSlice("mlp.dense_4h_to_h.weight", 1, 1),
            ),
            gate_module="mlp.dense_4h_to_h",
            gate_block=1,
        )
        return [head_spec, mlp_spec]

    def widths(self, layer: nn.Module) -> dict:
        heads = self._heads(layer)
        return {
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "intermediate_size": layer.mlp.dense_h_to_4h.out_features,
            HEADS_ATTR: kept_heads(layer.self_attention, heads),
        }

    def shrink(self, layer: nn.Module, keep: dict[str, torch.Tensor]) -> None:
        if "kv" in keep:
            keep_heads(layer.self_attention, self._heads(layer), keep["kv"])
        for spec in self.group_specs(layer):
            if spec.kind in keep:
                for s in spec.slices:
                    select_param(layer, s.param, s.dim, spec.indices(keep[spec.kind], s))
        self._refresh(layer)

    def resize_to(self, layer: nn.Module, widths: dict) -> None:
        attn, mlp = layer.self_attention, layer.mlp
        inner, hidden = widths["num_attention_heads"] * attn.head_dim, attn.hidden_size
        attn.query_key_value = resize_linear(attn.query_key_value, 3 * inner, hidden)
        attn.dense = resize_linear(attn.dense, hidden, inner)
        mlp.dense_h_to_4h = resize_linear(mlp.dense_h_to_4h, widths["intermediate_size"], hidden)
        mlp.dense_4h_to_h = resize_linear(mlp.dense_4h_to_h, hidden, widths["intermediate_size"])
        setattr(attn, HEADS_ATTR, list(widths[HEADS_ATTR]))
        self._refresh(layer)

    def _refresh(self, layer: nn.Module) -> None:
        """Attention reads its head count from `num_heads`; it also needs its kept heads' ALiBi rows."""
        attn = layer.self_attention
        attn.num_heads = layer.num_heads = self._heads(layer)
        setattr(attn, HEADS_ATTR, kept_heads(attn, attn.num_heads))
        attn.__class__ = PrunedBloomAttention
        # The tensor-parallel emulation slices by the unpruned width; the plain matmul computes the same sum.
        attn.slow_but_exact = False


pruned_classes(BloomForCausalLM)
