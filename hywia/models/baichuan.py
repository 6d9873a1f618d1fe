"""Baichuan-7B (RoPE) and Baichuan-13B (ALiBi): their adapter; the modeling code is hywia.models.remote.hywia_baichuan,
registered here under `model_type: baichuan` and carried by pruned folders.

Pruning: a head owns its rows in all three blocks of W_pack and its o_proj columns (MHA: heads go with their q, k
and v, kind "kv"); an MLP channel owns its gate/up rows and down column. ALiBi layers keep their heads' original
slopes (hywia.models.remote.hywia_alibi). GGUF: with RoPE, W_pack split into q/k/v makes every layer llama.cpp's
llama block; llama.cpp derives ALiBi slopes from a layer's head count, so a pruned 13B has no GGUF.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .base import Adapter, GGUFMapping, GroupSpec, TensorSlice, register_adapter
from .pruned import pruned_classes
from .remote.hywia_alibi import HEADS_ATTR, keep_heads, kept_heads
from .remote.hywia_baichuan import BaichuanConfig, BaichuanForCausalLM, BaichuanModel, resize_layer
from .surgery import keep_groups

GGUF_REFUSAL = (
    "GGUF export does not write Baichuan-13B: llama.cpp derives each head's ALiBi slope from the layer's head count, "
    "so a layer that lost heads cannot keep its heads' slopes, whatever the prune options; run the pruned folder "
    "with transformers"
)

AutoConfig.register("baichuan", BaichuanConfig)
AutoModel.register(BaichuanConfig, BaichuanModel)
AutoModelForCausalLM.register(BaichuanConfig, BaichuanForCausalLM)

# Output projections that compensation (hywia.pruning.compensate) may give a bias; saved configs list them.
OUTPUT_PROJECTIONS = ("self_attn.o_proj", "mlp.down_proj")


@register_adapter("BaichuanForCausalLM", "HywiaBaichuanForCausalLM")
class BaichuanAdapter(Adapter):
    lora_targets = ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj")
    remote_module = "hywia_baichuan"

    def layers(self) -> list[nn.Module]:
        return list(self.model.model.layers)

    def layer_name(self, index: int) -> str:
        return f"model.layers.{index}"

    def _heads(self, layer: nn.Module) -> int:
        return layer.self_attn.o_proj.in_features // layer.self_attn.head_dim

    def all_group_specs(self, layer: nn.Module) -> list[GroupSpec]:
        n, d = self._heads(layer), layer.self_attn.head_dim
        w_pack = tuple(TensorSlice("self_attn.W_pack.weight", 0, d, offset=part * n * d) for part in range(3))
        head_spec = GroupSpec(
            kind="kv",
            count=n,
            slices=w_pack + (TensorSlice("self_attn.o_proj.weight", 1, d),),
            gate_module="self_attn.o_proj",
            gate_block=d,
        )
        mlp_spec = GroupSpec(
            kind="mlp",
            count=layer.mlp.gate_proj.out_features,
            slices=(
                TensorSlice("mlp.gate_proj.weight", 0, 1),
                TensorSlice("mlp.up_proj.weight", 0, 1),
                TensorSlice("mlp.down_proj.weight", 1, 1),
            ),
            gate_module="mlp.down_proj",
            gate_block=1,
        )
        return [head_spec, mlp_spec]

    def widths(self, layer: nn.Module) -> dict:
        heads = self._heads(layer)
        widths: dict = {
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "intermediate_size": layer.mlp.gate_proj.out_features,
        }
        if hasattr(layer.self_attn, HEADS_ATTR):
            widths[HEADS_ATTR] = kept_heads(layer.self_attn, heads)
        added = [name for name in OUTPUT_PROJECTIONS if layer.get_submodule(name).bias is not None]
        if added:
            widths["added_biases"] = added
        return widths

    def shrink(self, layer: nn.Module, keep: dict[str, torch.Tensor]) -> None:
        if "kv" in keep and hasattr(layer.self_attn, HEADS_ATTR):
            keep_heads(layer.self_attn, self._heads(layer), keep["kv"])
        for spec in self.group_specs(layer):
            if spec.kind in keep:
                keep_groups(layer, spec, keep[spec.kind])
        layer.mlp.intermediate_size = layer.mlp.gate_proj.out_features

    def resize_to(self, layer: nn.Module, widths: dict) -> None:
        resize_layer(layer, widths)

    def gguf_mapping(self) -> GGUFMapping:
        if self.model.config.position_embedding == "alibi":
            return GGUFMapping(refusal=GGUF_REFUSAL)
        return GGUFMapping(llama_block=True)

    def llama_tensors(self, name: str, tensor: torch.Tensor, widths: dict) -> dict[str, torch.Tensor]:
        """W_pack is [q; k; v] by rows: LLaMA's three projections."""
        if ".W_pack." not in name:
            return {name: tensor}
        parts = zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3))
        return {name.replace("W_pack", proj): part for proj, part in parts}


pruned_classes(BaichuanForCausalLM)
