"""Bloom: multi-head attention with a fused, per-head interleaved query_key_value and ALiBi positions.

`query_key_value` computes [batch, seq, heads, 3, head_dim], so head h owns the 3*head_dim consecutive rows
h*3*d .. (h+1)*3*d (its q, k and v) plus their bias, and columns h*d .. (h+1)*d of `dense`. Bloom is MHA, so a
head is also its own KV group: heads are removed with their q, k and v (kind "kv", whatever `attention` says).
A pruned layer keeps its heads' original ALiBi slopes (see hywia.models.remote.hywia_bloom, which pruned folders
carry). llama.cpp derives every head's slope from the layer's head count, so no GGUF expresses a pruned Bloom.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BloomForCausalLM

from .base import Adapter, GGUFMapping, GroupSpec, TensorSlice, register_adapter
from .pruned import pruned_classes
from .remote.hywia_alibi import HEADS_ATTR, keep_heads, kept_heads
from .remote.hywia_bloom import refresh_layer, resize_layer
from .surgery import keep_groups

GGUF_REFUSAL = (
    "GGUF export does not write Bloom: llama.cpp derives each head's ALiBi slope from the layer's head count, so a "
    "layer that lost heads cannot keep its own heads' slopes, and no prune option avoids that; run the pruned "
    "folder with transformers"
)


@register_adapter("BloomForCausalLM", "HywiaBloomForCausalLM")
class BloomAdapter(Adapter):
    lora_targets = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
    remote_module = "hywia_bloom"

    def layers(self) -> list[nn.Module]:
        return list(self.model.transformer.h)

    def layer_name(self, index: int) -> str:
        return f"transformer.h.{index}"

    def _heads(self, layer: nn.Module) -> int:
        attn = layer.self_attention
        return attn.dense.in_features // attn.head_dim

    def all_group_specs(self, layer: nn.Module) -> list[GroupSpec]:
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
                keep_groups(layer, spec, keep[spec.kind])
        refresh_layer(layer)

    def resize_to(self, layer: nn.Module, widths: dict) -> None:
        resize_layer(layer, widths)

    def gguf_mapping(self) -> GGUFMapping:
        return GGUFMapping(refusal=GGUF_REFUSAL)


pruned_classes(BloomForCausalLM)
