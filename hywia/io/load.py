"""Loading models: the embedded default (converted once from its GGUF), a local folder, or a hub name.

Weights load from safetensors only: no pickle. A GGUF-loaded model keeps a quantizer marker that makes
`save_pretrained` refuse it; the default's conversion clears it once and caches a plain HF folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..data.assets import cache_dir, smollm2_gguf
from ..errors import ModelLoadError
from .save import atomic_dir

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {
    DEFAULT_MODEL: ("SmolLM2-135M-Instruct", smollm2_gguf,
                    "SmolLM2-135M-Instruct (embedded GGUF, Q4_1 weights dequantised to float)"),
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The cached HF folder of an embedded model, converted from its packaged GGUF on first use (~30 s)."""
    folder_name, gguf_path, _ = EMBEDDED[name]
    target = cache_dir() / "models" / folder_name
    if (target / "config.json").is_file():
        return target
    gguf = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def describe(name_or_path: str | None) -> str:
    name = name_or_path or DEFAULT_MODEL
    return EMBEDDED[name][2] if name in EMBEDDED else str(name)


def load_model(
    name_or_path: str | None = None, device: str | None = None, dtype: str | torch.dtype = "float32"
) -> tuple[PreTrainedModel, object]:
    """(model, tokenizer) from an embedded name (default SmolLM2-135M), a local HF folder or a hub name."""
    import hywia.models  # noqa: F401  (registers the pruned classes before Auto classes resolve a config)

    name = name_or_path or DEFAULT_MODEL
    torch_dtype = resolve_dtype(dtype)
    path = embedded_model_dir(name) if name in EMBEDDED else Path(name)
    if name not in EMBEDDED and (path.exists() or name.startswith((".", "/", "~"))):
        _check_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, use_safetensors=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {name!r}: {first_line}") from exc
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(f"model folder not found: {path}")
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config} is not valid JSON (corrupt model folder)") from exc
    if not any(path.glob("*.safetensors")):
        hint = " (only pickle .bin weights found; convert them to safetensors)" if any(path.glob("*.bin")) else ""
        raise ModelLoadError(f"{path} holds no .safetensors weights{hint}")


