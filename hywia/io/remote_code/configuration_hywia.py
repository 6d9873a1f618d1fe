"""Configs of HyWIA-pruned models: the family's config plus `hywia_layers`, one dict of widths per decoder layer.

Saved by hywia next to a pruned model; self-contained (transformers only), loaded through config.json's auto_map.
"""

from transformers import LlamaConfig, MistralConfig, Qwen2Config


class HywiaLlamaConfig(LlamaConfig):
    model_type = "hywia_llama"


class HywiaMistralConfig(MistralConfig):
    model_type = "hywia_mistral"


class HywiaQwen2Config(Qwen2Config):
    model_type = "hywia_qwen2"
