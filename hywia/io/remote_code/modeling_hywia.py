"""HyWIA-pruned models for transformers alone: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.

Saved by hywia next to a pruned model, so it loads where hywia is not installed. Each class is the family's own
transformers class whose decoder layers are rebuilt at the widths in `config.hywia_layers` (query heads, KV heads,
MLP channels, and the output-projection biases that pruning compensation added) before the weights load, so the
safetensors load as they are. Class names and model types match hywia's registered pruned classes.
"""

from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

from .configuration_hywia import HywiaLlamaConfig, HywiaMistralConfig, HywiaQwen2Config


def _linear(old: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """An empty Linear of the pruned shape; from_pretrained fills it."""
    return nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


def _resize_layers(model: nn.Module, hywia_layers: list[dict]) -> None:
    for layer, widths in zip(model.model.layers, hywia_layers):
        attn, mlp = layer.self_attn, layer.mlp
        hidden, head_dim = attn.q_proj.in_features, attn.head_dim
        q_out = widths["num_attention_heads"] * head_dim
        kv_out = widths["num_key_value_heads"] * head_dim
        width = widths["intermediate_size"]
        added = set(widths.get("added_biases", ()))
        attn.q_proj = _linear(attn.q_proj, hidden, q_out, attn.q_proj.bias is not None)
        attn.k_proj = _linear(attn.k_proj, hidden, kv_out, attn.k_proj.bias is not None)
        attn.v_proj = _linear(attn.v_proj, hidden, kv_out, attn.v_proj.bias is not None)
        attn.o_proj = _linear(attn.o_proj, q_out, hidden,
                              attn.o_proj.bias is not None or "self_attn.o_proj" in added)
        mlp.gate_proj = _linear(mlp.gate_proj, hidden, width, mlp.gate_proj.bias is not None)
        mlp.up_proj = _linear(mlp.up_proj, hidden, width, mlp.up_proj.bias is not None)
        mlp.down_proj = _linear(mlp.down_proj, width, hidden,
                                mlp.down_proj.bias is not None or "mlp.down_proj" in added)
        # forward reads widths from the Linear modules; only the GQA repeat factor is cached on the module
        attn.num_key_value_groups = widths["num_attention_heads"] // widths["num_key_value_heads"]
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width


class HywiaLlamaForCausalLM(LlamaForCausalLM):
    config_class = HywiaLlamaConfig

    def __init__(self, config: HywiaLlamaConfig):
        super().__init__(config)
        _resize_layers(self, config.hywia_layers)


class HywiaMistralForCausalLM(MistralForCausalLM):
    config_class = HywiaMistralConfig

    def __init__(self, config: HywiaMistralConfig):
        super().__init__(config)
        _resize_layers(self, config.hywia_layers)


class HywiaQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = HywiaQwen2Config

    def __init__(self, config: HywiaQwen2Config):
        super().__init__(config)
        _resize_layers(self, config.hywia_layers)
