"""LLaMA-style decoders (LLaMA-1/2/3, Vicuna, Mistral, Qwen2): separate q/k/v/o and gate/up/down projections.

Query head h reads KV head h // (num_heads / num_kv_heads) (HF's `repeat_kv` layout), so heads are grouped by
that mapping; pruning query heads keeps the same number in every KV group so the layer stays valid GQA. Pruned
folders carry hywia.models.remote.hywia_llama, which rebuilds the layers; every layer is llama.cpp's llama block.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

from ..errors import InvalidRequestError
from .base import Adapter, GGUFMapping, GroupSpec, TensorSlice, register_adapter
from .pruned import pruned_classes
from .remote.hywia_llama import refresh_layer, resize_layer
from .surgery import keep_groups

# Output projections that compensation may give a bias the family's config does not declare.
OUTPUT_PROJECTIONS = ("self_attn.o_proj", "mlp.down_proj")


@register_adapter(
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "HywiaLlamaForCausalLM",
    "HywiaMistralForCausalLM",
    "HywiaQwen2ForCausalLM",
)
class LlamaAdapter(Adapter):
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    remote_module = "hywia_llama"

    def layers(self) -> list[nn.Module]:
        return list(self.model.model.layers)

    def layer_name(self, index: int) -> str:
        return f"model.layers.{index}"

    def head_dim(self, layer: nn.Module) -> int:
        return layer.self_attn.head_dim

    def _heads(self, layer: nn.Module) -> tuple[int, int]:
        attn, d = layer.self_attn, self.head_dim(layer)
        return attn.q_proj.out_features // d, attn.k_proj.out_features // d

    def all_group_specs(self, layer: nn.Module) -> list[GroupSpec]:
        attn, mlp = layer.self_attn, layer.mlp
        d = self.head_dim(layer)
        n_heads, n_kv = self._heads(layer)
        per_group = n_heads // n_kv

        def weight_and_bias(module: str, linear: nn.Linear, dim: int, block: int) -> list[TensorSlice]:
            slices = [TensorSlice(f"{module}.weight", dim, block)]
            if linear.bias is not None and dim == 0:
                slices.append(TensorSlice(f"{module}.bias", 0, block))
            return slices

        if self.attention == "heads" and per_group > 1:
            attn_spec = GroupSpec(
                kind="head",
                count=n_heads,
                slices=tuple(
                    weight_and_bias("self_attn.q_proj", attn.q_proj, 0, d)
                    + weight_and_bias("self_attn.o_proj", attn.o_proj, 1, d)
                ),
                gate_module="self_attn.o_proj",
                gate_block=d,
                kv_groups=n_kv,
            )
        else:  # whole KV groups; with MHA (one query head per KV head) this is how a head goes
            attn_spec = GroupSpec(
                kind="kv",
                count=n_kv,
                slices=tuple(
                    weight_and_bias("self_attn.q_proj", attn.q_proj, 0, per_group * d)
                    + weight_and_bias("self_attn.k_proj", attn.k_proj, 0, d)
                    + weight_and_bias("self_attn.v_proj", attn.v_proj, 0, d)
                    + weight_and_bias("self_attn.o_proj", attn.o_proj, 1, per_group * d)
                ),
                gate_module="self_attn.o_proj",
                gate_block=per_group * d,
            )
        mlp_spec = GroupSpec(
            kind="mlp",
            count=mlp.gate_proj.out_features,
            slices=tuple(
                weight_and_bias("mlp.gate_proj", mlp.gate_proj, 0, 1)
                + weight_and_bias("mlp.up_proj", mlp.up_proj, 0, 1)
                + weight_and_bias("mlp.down_proj", mlp.down_proj, 1, 1)
            ),
            gate_module="mlp.down_proj",
            gate_block=1,
        )
        return [attn_spec, mlp_spec]

    def widths(self, layer: nn.Module) -> dict:
        n_heads, n_kv = self._heads(layer)
        widths = {
            "num_attention_heads": n_heads,
            "num_key_value_heads": n_kv,
            "intermediate_size": layer.mlp.gate_proj.out_features,
        }
        added = [name for name in OUTPUT_PROJECTIONS if _has_added_bias(layer, name, self.model.config)]
        if added:
            widths["added_biases"] = added
        return widths

    def shrink(self, layer: nn.Module, keep: dict[str, torch.Tensor]) -> None:
        specs = {spec.kind: spec for spec in self.group_specs(layer)}
        if "head" in keep:
            n_heads, n_kv = self._heads(layer)
            per_kv = torch.bincount(keep["head"] // (n_heads // n_kv), minlength=n_kv)
            if len(set(per_kv.tolist())) != 1 or per_kv[0] == 0:
                raise InvalidRequestError(
                    f"kept query heads {keep['head'].tolist()} are not the same non-zero number per KV group"
                )
        for kind, kept in keep.items():
            keep_groups(layer, specs[kind], kept)
        refresh_layer(layer)

    def resize_to(self, layer: nn.Module, widths: dict[str, int]) -> None:
        resize_layer(layer, widths)

    def gguf_mapping(self) -> GGUFMapping:
        """The llama block; an unpruned Qwen2 keeps its own architecture (it rotates halves, as transformers)."""
        return GGUFMapping(llama_block=True, native_arch="qwen2" if isinstance(self.model, Qwen2ForCausalLM) else None)


def _has_added_bias(layer: nn.Module, name: str, config) -> bool:
    declared = getattr(config, "attention_bias" if "attn" in name else "mlp_bias", False)
    return layer.get_submodule(name).bias is not None and not declared


for _family in (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM):
    pruned_classes(_family)
