"""Baichuan-7B (RoPE) and Baichuan-13B (ALiBi) for transformers 5, and their HyWIA-pruned classes.

Transformers 5 has no Baichuan, and the checkpoints' own remote code is not run. The layout follows the published
checkpoints, so their config.json and safetensors load as they are (`model_type: baichuan`):
`model.layers.N.self_attn.W_pack` holds [q; k; v] stacked by rows (3 * hidden), then `o_proj`, an RMSNorm before
attention and before the MLP, and LLaMA's gate/up/down MLP; no biases, untied lm_head. The 7B model rotates q and
k as LLaMA does; the 13B model instead adds the ALiBi bias slope * key position. The original configs do not name
the variant: 7B's declares `max_position_embeddings`, 13B's only `model_max_length`, and that decides when
`position_embedding` is not given. Baichuan 2 (whose lm_head is normalised per row) is refused, not misread.

Imports only torch, transformers and hywia_alibi: hywia runs this code (hywia.models.baichuan registers it) and
pruned folders carry it, so they load with transformers alone; the pruned classes rebuild each layer at
`config.hywia_layers` before the weights load.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import RopeParameters
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils import can_return_tuple

from .hywia_alibi import HEADS_ATTR, additive_mask, alibi_bias

POSITION_EMBEDDINGS = ("rope", "alibi")


@strict
class BaichuanConfig(PreTrainedConfig):
    """The original checkpoints' keys (defaults: Baichuan-7B) plus `position_embedding`, "rope" or "alibi"."""

    model_type = "baichuan"
    keys_to_ignore_at_inference = ["past_key_values"]
    mlp_bias = False  # read by LlamaMLP; Baichuan's MLP has no biases (a class constant, not a config key)

    vocab_size: int = 64000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int | None = None
    model_max_length: int = 4096
    position_embedding: str | None = None
    rope_parameters: RopeParameters | dict | None = None
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if "z_loss_weight" in kwargs:
            raise ValueError("this is a Baichuan 2 config (its lm_head is normalised per row): not supported")
        if self.position_embedding is None:
            self.position_embedding = "rope" if self.max_position_embeddings is not None else "alibi"
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.model_max_length
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict` validation."""
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {self.position_embedding!r}"
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )


class BaichuanAttention(nn.Module):
    """MHA over a packed W_pack; RoPE or ALiBi. Widths come from the Linear modules, so pruned layers just work."""

    def __init__(self, config: BaichuanConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_total = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = 1  # read by the attention interfaces
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.W_pack = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        if config.position_embedding == "alibi":
            setattr(self, HEADS_ATTR, list(range(self.n_total)))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        query, key, value = (
            part.view(*input_shape, -1, self.head_dim).transpose(1, 2)
            for part in self.W_pack(hidden_states).chunk(3, dim=-1)
        )
        if position_embeddings is not None:
            query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        if hasattr(self, HEADS_ATTR):
            bias = alibi_bias(getattr(self, HEADS_ATTR), self.n_total, key.shape[-2], query.dtype, query.device)
            attention_mask = attention_mask + bias
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention(self, query, key, value, attention_mask, scaling=self.scaling, **kwargs)
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


class BaichuanDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: BaichuanConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = BaichuanAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attended, _ = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, past_key_values, **kwargs
        )
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class BaichuanPreTrainedModel(PreTrainedModel):
    config_class = BaichuanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BaichuanDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True


class BaichuanModel(BaichuanPreTrainedModel):
    def __init__(self, config: BaichuanConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(BaichuanDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config) if config.position_embedding == "rope" else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past)[None]
        alibi = self.rotary_emb is None
        # ALiBi adds a per-head bias to the mask, so the mask must exist even where sdpa could skip it.
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
            allow_is_causal_skip=not alibi,
        )
        if alibi:
            mask, position_embeddings = additive_mask(mask, inputs_embeds.dtype), None
        else:
            position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask, position_embeddings, past_key_values, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values)


class BaichuanForCausalLM(BaichuanPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BaichuanConfig) -> None:
        super().__init__(config)
        self.model = BaichuanModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)


def _linear(old: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


def resize_layer(layer: nn.Module, widths: dict) -> None:
    """Give a freshly built decoder layer the saved widths, kept ALiBi heads and added output biases."""
    attn, mlp = layer.self_attn, layer.mlp
    inner, hidden = widths["num_attention_heads"] * attn.head_dim, attn.o_proj.out_features
    width = widths["intermediate_size"]
    added = set(widths.get("added_biases", ()))
    attn.W_pack = _linear(attn.W_pack, hidden, 3 * inner, False)
    attn.o_proj = _linear(attn.o_proj, inner, hidden, "self_attn.o_proj" in added)
    mlp.gate_proj = _linear(mlp.gate_proj, hidden, width, False)
    mlp.up_proj = _linear(mlp.up_proj, hidden, width, False)
    mlp.down_proj = _linear(mlp.down_proj, width, hidden, "mlp.down_proj" in added)
    mlp.intermediate_size = width
    if HEADS_ATTR in widths:
        setattr(attn, HEADS_ATTR, list(widths[HEADS_ATTR]))


class HywiaBaichuanConfig(BaichuanConfig):
    model_type = "hywia_baichuan"


class HywiaBaichuanForCausalLM(BaichuanForCausalLM):
    config_class = HywiaBaichuanConfig

    def __init__(self, config: HywiaBaichuanConfig) -> None:
        super().__init__(config)
        for layer, widths in zip(self.model.layers, config.hywia_layers):
            resize_layer(layer, widths)
