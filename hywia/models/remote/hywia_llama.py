"""HyWIA-pruned LLaMA-layout models for transformers alone: LLaMA, Mistral, Qwen2, Qwen3 and Gemma-3 (text).

Saved by hywia next to a pruned model, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works
where hywia is not installed; hywia rebuilds pruned layers with the same `resize_layer`. Each class is the family's
own transformers class whose decoder layers are rebuilt at the widths in `config.hywia_layers` (query heads, KV
heads, MLP channels, and the output-projection biases that pruning compensation added) before the weights load.
q_norm/k_norm (Qwen3, Gemma-3) act on head_dim and stay as they are.
"""

from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)


def _linear(old: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """An empty Linear of the pruned shape on the old one's device and dtype; from_pretrained fills it."""
    return nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


def resize_layer(layer: nn.Module, widths: dict) -> None:
    """Give a freshly built decoder layer the saved widths (values are loaded afterwards)."""
    attn, mlp = layer.self_attn, layer.mlp
    hidden, head_dim = attn.q_proj.in_features, attn.head_dim
    q_out = widths["num_attention_heads"] * head_dim
    kv_out = widths["num_key_value_heads"] * head_dim
    width = widths["intermediate_size"]
    added = set(widths.get("added_biases", ()))
    attn.q_proj = _linear(attn.q_proj, hidden, q_out, attn.q_proj.bias is not None)
    attn.k_proj = _linear(attn.k_proj, hidden, kv_out, attn.k_proj.bias is not None)
    attn.v_proj = _linear(attn.v_proj, hidden, kv_out, attn.v_proj.bias is not None)
    attn.o_proj = _linear(attn.o_proj, q_out, hidden, attn.o_proj.bias is not None or "self_attn.o_proj" in added)
    mlp.gate_proj = _linear(mlp.gate_proj, hidden, width, mlp.gate_proj.bias is not None)
    mlp.up_proj = _linear(mlp.up_proj, hidden, width, mlp.up_proj.bias is not None)
    mlp.down_proj = _linear(mlp.down_proj, width, hidden, mlp.down_proj.bias is not None or "mlp.down_proj" in added)
    refresh_layer(layer)


def refresh_layer(layer: nn.Module) -> None:
    """Forward reads widths from the Linear modules; only the GQA repeat factor (and MLP width) are cached."""
    attn, mlp = layer.self_attn, layer.mlp
    attn.num_key_value_groups = attn.q_proj.out_features // attn.k_proj.out_features
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = mlp.gate_proj.out_features


def _pruned(family: type, config_cls: type) -> type:
    """The family's class building its layers at `config.hywia_layers`."""

    def __init__(self, config):  # noqa: N807 - method of the built class
        family.__init__(self, config)
        for layer, widths in zip(self.model.layers, config.hywia_layers):
            resize_layer(layer, widths)

    return type(f"Hywia{family.__name__}", (family,), {"config_class": config_cls, "__init__": __init__})


class HywiaLlamaConfig(LlamaConfig):
    model_type = "hywia_llama"


class HywiaMistralConfig(MistralConfig):
    model_type = "hywia_mistral"


class HywiaQwen2Config(Qwen2Config):
    model_type = "hywia_qwen2"


class HywiaQwen3Config(Qwen3Config):
    model_type = "hywia_qwen3"


class HywiaGemma3TextConfig(Gemma3TextConfig):
    model_type = "hywia_gemma3_text"


HywiaLlamaForCausalLM = _pruned(LlamaForCausalLM, HywiaLlamaConfig)
HywiaMistralForCausalLM = _pruned(MistralForCausalLM, HywiaMistralConfig)
HywiaQwen2ForCausalLM = _pruned(Qwen2ForCausalLM, HywiaQwen2Config)
HywiaQwen3ForCausalLM = _pruned(Qwen3ForCausalLM, HywiaQwen3Config)
HywiaGemma3ForCausalLM = _pruned(Gemma3ForCausalLM, HywiaGemma3TextConfig)
