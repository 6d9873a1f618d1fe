"""Phi-3: LLaMA's block with fused projections, `qkv_proj` ([q; k; v] by rows) and `gate_up_proj` ([gate; up]).

A query head owns its rows of the q block (inside qkv_proj) and its columns of o_proj; a KV group owns its query
heads' rows, its k and v rows and the o_proj columns of its query heads (query head h reads KV head
h // (H / KV), HF's repeat_kv); an MLP channel j owns row j of both halves of gate_up_proj and column j of
down_proj. Phi3Attention splits qkv at model-wide head counts, so pruned layers run PrunedPhi3Attention
(hywia.models.remote.hywia_phi3, which pruned folders carry). Split into q/k/v and gate/up, every layer is
llama.cpp's llama block, so GGUF export goes through `llama` / `deci`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Phi3ForCausalLM

from ..errors import InvalidRequestError
from .base import Adapter, GGUFMapping, GroupSpec, TensorSlice, register_adapter
from .pruned import pruned_classes
from .remote.hywia_phi3 import refresh_layer, resize_layer
from .surgery import keep_groups

# Output projections that compensation may give a bias (Phi-3 declares none).
OUTPUT_PROJECTIONS = ("self_attn.o_proj", "mlp.down_proj")


@register_adapter("Phi3ForCausalLM", "HywiaPhi3ForCausalLM")
class Phi3Adapter(Adapter):
    lora_targets = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    remote_module = "hywia_phi3"

    def layers(self) -> list[nn.Module]:
        return list(self.model.model.layers)

    def layer_name(self, index: int) -> str:
        return f"model.layers.{index}"

    def _heads(self, layer: nn.Module) -> tuple[int, int]:
        attn = layer.self_attn
        return attn.o_proj.in_features // attn.head_dim, attn.num_key_value_heads

    def all_group_specs(self, layer: nn.Module) -> list[GroupSpec]:
        d = layer.self_attn.head_dim
        n_heads, n_kv = self._heads(layer)
        per_group = n_heads // n_kv
        qkv, o_proj = "self_attn.qkv_proj.weight", "self_attn.o_proj.weight"
        if self.attention == "heads" and per_group > 1:
            attn_spec = GroupSpec(
                kind="head",
                count=n_heads,
                slices=(TensorSlice(qkv, 0, d), TensorSlice(o_proj, 1, d)),
                gate_module="self_attn.o_proj",
                gate_block=d,
                kv_groups=n_kv,
            )
        else:  # whole KV groups: their query heads' rows, their k rows and their v rows of the fused qkv
            attn_spec = GroupSpec(
                kind="kv",
                count=n_kv,
                slices=(
                    TensorSlice(qkv, 0, per_group * d),
                    TensorSlice(qkv, 0, d, offset=n_heads * d),
                    TensorSlice(qkv, 0, d, offset=(n_heads + n_kv) * d),
                    TensorSlice(o_proj, 1, per_group * d),
                ),
                gate_module="self_attn.o_proj",
                gate_block=per_group * d,
            )
        width = self._mlp_width(layer)
        mlp_spec = GroupSpec(
            kind="mlp",
            count=width,
            slices=(
                TensorSlice("mlp.gate_up_proj.weight", 0, 1),
                TensorSlice("mlp.gate_up_proj.weight", 0, 1, offset=width),
                TensorSlice("mlp.down_proj.weight", 1, 1),
            ),
            gate_module="mlp.down_proj",
            gate_block=1,
        )
        return [attn_spec, mlp_spec]

    @staticmethod
    def _mlp_width(layer: nn.Module) -> int:
        return layer.mlp.down_proj.in_features

    def widths(self, layer: nn.Module) -> dict:
        n_heads, n_kv = self._heads(layer)
        widths = {"num_attention_heads": n_heads, "num_key_value_heads": n_kv,
                  "intermediate_size": self._mlp_width(layer)}
        added = [name for name in OUTPUT_PROJECTIONS if layer.get_submodule(name).bias is not None]
        if added:
            widths["added_biases"] = added
        return widths

    def shrink(self, layer: nn.Module, keep: dict[str, torch.Tensor]) -> None:
        n_heads, n_kv = self._heads(layer)
        if "head" in keep:
            per_kv = torch.bincount(keep["head"] // (n_heads // n_kv), minlength=n_kv)
            if len(set(per_kv.tolist())) != 1 or per_kv[0] == 0:
                raise InvalidRequestError(
                    f"kept query heads {keep['head'].tolist()} are not the same non-zero number per KV group"
                )
        for spec in self.group_specs(layer):
            if spec.kind in keep:
                keep_groups(layer, spec, keep[spec.kind])
        refresh_layer(layer, len(keep["kv"]) if "kv" in keep else n_kv)

    def resize_to(self, layer: nn.Module, widths: dict) -> None:
        resize_layer(layer, widths)

    def gguf_mapping(self) -> GGUFMapping:
        return GGUFMapping(llama_block=True)

    def llama_tensors(self, name: str, tensor: torch.Tensor, widths: dict) -> dict[str, torch.Tensor]:
        """qkv_proj into q/k/v at the layer's widths, gate_up_proj into its halves."""
        if ".qkv_proj." in name:
            d = tensor.shape[0] // (widths["num_attention_heads"] + 2 * widths["num_key_value_heads"])
            kv = widths["num_key_value_heads"] * d
            parts = tensor.split([tensor.shape[0] - 2 * kv, kv, kv])
            return {name.replace("qkv_proj", proj): part for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts)}
        if ".gate_up_proj." in name:
            halves = zip(("gate_proj", "up_proj"), tensor.chunk(2))
            return {name.replace("gate_up_proj", proj): part for proj, part in halves}
        return {name: tensor}


pruned_classes(Phi3ForCausalLM)
