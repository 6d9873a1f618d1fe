"""GGUF export: a pruned (or dense) model as one file that llama.cpp, llama-cpp-python, Ollama and LM Studio run.

What llama.cpp can express is the family's knowledge (its adapter's `gguf_mapping`). A family whose layers are
llama.cpp's llama block (after `llama_tensors` splits fused projections) is written as `llama` when every layer has
the same widths and as `deci` (the Llama-3.1-Nemotron-NAS block, whose head counts and MLP width are per-layer
arrays) otherwise; its unpruned model may keep its native architecture (Qwen2: `qwen2`). Any other family is
written in its native architecture when every layer keeps the same widths, or refused with the prune options that
make it exportable; its adapter converts tensors where the conventions differ (`native_gguf_tensors`, e.g. Gemma's
norms) and writes the keys only that architecture reads (`add_native_gguf_hparams`, e.g. sliding windows). Tensor
names come from the gguf package's own mapping. llama.cpp's llama block rotates
consecutive pairs of a head's dimensions while transformers rotates its two halves, so q/k rows (and biases) are
interleaved per head with each layer's own head counts; the native `qwen2`/`qwen3` rotate halves as they are.

The tokenizer comes from the model folder's tokenizer.json (byte-level BPE). When that vocabulary is the one of an
embedded GGUF (SmolLM2, Gemma-3-270M), its tokenizer metadata is copied verbatim instead: transformers' GGUF
conversion dropped SmolLM2's digit-splitting pre-tokenizer, which the original file still names, and Gemma's
SentencePiece scores live only in the original file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoConfig

from ..data.assets import MissingAssetError, smollm2_gguf
from ..errors import InvalidRequestError, NonFiniteWeightsError, UnsupportedModelError
from ..models import Adapter, GGUFMapping, adapter_for
from ..models.pruned import base_class
from .checks import all_finite, meta_model
from .load import gemma3_gguf, load_model
from . import tempfiles
from .save import check_output, local_path

OUTTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
ROPE_TYPES = ("default", "linear", "llama3")  # fixed per-dimension frequencies: expressible as rope_freqs

# llama.cpp's pre-tokenizer names for the byte-level BPE pre-tokenizers of tokenizer.json that we recognise
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
ALIGN = 32  # Q8_0 block; llama.cpp's fast CPU matmul (tinyBLAS) also needs inner sizes in multiples of 8
# embedded GGUFs whose tokenizer fields are copied, by vocabulary size (checked before reading the file)
EMBEDDED_TOKENIZERS = {49152: ("SmolLM2", smollm2_gguf), 262144: ("Gemma-3-270M", gemma3_gguf)}


@dataclass
class GGUFExport:
    path: Path
    arch: str
    outtype: str
    tokenizer: str  # where the tokenizer metadata came from
    tensors: int
    file_bytes: int
    unaligned_widths: list[int]  # MLP widths that are not multiples of ALIGN (slower in llama.cpp, no Q8_0)


@dataclass
class _Tensor:
    name: str
    source: torch.Tensor
    qtype: gguf.GGMLQuantizationType
    rope_heads: int | None = None  # q/k rows to interleave per head for llama.cpp's rope

    def data(self) -> np.ndarray:
        """Converted only when written, so one tensor at a time is held twice."""
        data = self.source.detach().float()
        if self.rope_heads is not None:
            data = permute_rope_rows(data, self.rope_heads)
        return data.contiguous().numpy()


def export_gguf(model: str | None, out: str | Path, *, outtype: str = "f16", force: bool = False,
                trust_remote_code: bool = False) -> GGUFExport:
    """Write `model` (a local HF folder, hub name or embedded name) to the GGUF file `out`, atomically.

    Python code shipped in the folder runs only with `trust_remote_code`."""
    if outtype not in OUTTYPES:
        raise InvalidRequestError(f"unknown --outtype {outtype!r}; use one of {', '.join(OUTTYPES)}")
    out = Path(out)
    check_output(out, force, inputs={"--model": local_path(model)}, file=True)
    _check_folder_before_loading(model, trust_remote_code)
    hf_model, tokenizer = load_model(model, device="cpu", dtype="float32", trust_remote_code=trust_remote_code)
    adapter = adapter_for(hf_model)
    widths = [adapter.widths(layer) for layer in adapter.layers()]
    arch = _arch_of(adapter, widths)
    tensors = _tensors(adapter, widths, arch, OUTTYPES[outtype][0])
    _check_representable(tensors, outtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfiles.sibling_name(out)
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    try:
        _add_hparams(writer, adapter, widths, arch, OUTTYPES[outtype][1], name=_model_name(model, hf_model.config))
        source = _add_tokenizer(writer, tokenizer, hf_model.get_input_embeddings().weight.shape[0])
        for t in tensors:
            shape = tuple(t.source.shape)
            nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, t.qtype)))
            writer.add_tensor_info(t.name, shape, np.dtype(np.float32), nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(gguf.quants.quantize(t.data(), t.qtype))
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    unaligned = sorted({w["intermediate_size"] for w in widths if w["intermediate_size"] % ALIGN})
    return GGUFExport(out, gguf.MODEL_ARCH_NAMES[arch], outtype, source, len(tensors), out.stat().st_size, unaligned)


def _check_folder_before_loading(model: str | None, trust_remote_code: bool) -> None:
    """Refuse a local folder llama.cpp cannot express from its config alone (a weightless skeleton on the meta
    device gives the adapter its layers), before gigabytes of weights load; anything else is load_model's to judge."""
    folder = Path(model) if model else None
    if folder is None or not (folder / "config.json").is_file():
        return
    try:
        skeleton = meta_model(AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code),
                              trust_remote_code)
    except (OSError, ValueError, KeyError):
        return  # load_model reports what is wrong with the folder
    adapter = adapter_for(skeleton)
    _arch_of(adapter, [adapter.widths(layer) for layer in adapter.layers()])


def _arch_of(adapter: Adapter, widths: list[dict]) -> gguf.MODEL_ARCH:
    config = adapter.model.config
    return choose_arch(adapter.gguf_mapping(), widths, config, pruned=getattr(config, "hywia_layers", None) is not None,
                       family=base_class(type(adapter.model)).__name__)


def choose_arch(mapping: GGUFMapping, widths: list[dict], config, *, pruned: bool, family: str) -> gguf.MODEL_ARCH:
    """The llama.cpp architecture that expresses these layers (see the module docstring), or the refusal."""
    if mapping.refusal:
        raise UnsupportedModelError(mapping.refusal)
    native = ARCHS[mapping.native_arch] if mapping.native_arch else None
    if mapping.llama_block or native in LLAMA_LIKE_NATIVES:
        _check_block(config, family)
    counts = {(w["num_attention_heads"], w["num_key_value_heads"], w["intermediate_size"]) for w in widths}
    uniform = len(counts) == 1
    if mapping.llama_block:
        if native is not None and not pruned and _rope_type(config) == "default":
            return native
        return gguf.MODEL_ARCH.LLAMA if uniform else gguf.MODEL_ARCH.DECI
    if native is not None and uniform and not any(w.get("added_biases") for w in widths):
        return native
    raise UnsupportedModelError(
        f"GGUF export writes {family} as llama.cpp's {mapping.native_arch}, which needs the same widths in every "
        f"layer and no added biases; prune with --allocation uniform --layers 0:{len(widths)} --compensate none"
    )


def permute_rope_rows(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows (or biases) from transformers' half-split rope layout to llama.cpp's pair-interleaved one.

    Per head, dimension i of the first half and i of the second half rotate together in transformers; llama.cpp
    rotates dimensions 2i and 2i+1, so row i goes to 2i and row i + d/2 to 2i + 1.
    """
    head_dim = rows.shape[0] // n_heads
    return rows.reshape(n_heads, 2, head_dim // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


ARCHS = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
# native architectures that are the llama block plus biases or q/k norms: their block is checked here; any other
# native architecture's adapter checks its configuration in gguf_mapping
LLAMA_LIKE_NATIVES = (gguf.MODEL_ARCH.QWEN2, gguf.MODEL_ARCH.QWEN3)


def _check_block(config, family: str) -> None:
    """What every written architecture (llama, deci, qwen2, qwen3) shares: a SiLU-gated MLP and plain rope over
    every dimension of a head (Phi-4-mini's partial rotary factor is not expressed)."""
    if config.hidden_act != "silu":
        raise UnsupportedModelError(f"GGUF export needs the SiLU-gated MLP of the LLaMA block; {family} has "
                                    f"{config.hidden_act}")
    if _rope_type(config) not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"GGUF export supports rope types {', '.join(ROPE_TYPES)}; got {_rope_type(config)!r}"
        )
    rotary = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    if rotary != 1.0:
        raise UnsupportedModelError(f"GGUF export needs rope on whole heads; {family} rotates {rotary} of each head")


def _rope_type(config) -> str:
    return (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")


def _model_name(model: str | None, config) -> str:
    return Path(model).name if model and Path(model).exists() else str(model or config.name_or_path)


def _add_hparams(writer: gguf.GGUFWriter, adapter: Adapter, widths: list[dict], arch: gguf.MODEL_ARCH,
                 file_type: gguf.LlamaFileType, name: str) -> None:
    model, config = adapter.model, adapter.model.config
    head_dim = adapter.layers()[0].self_attn.head_dim
    heads = [w["num_attention_heads"] for w in widths]
    kv_heads = [w["num_key_value_heads"] for w in widths]
    mlp = [w["intermediate_size"] for w in widths]
    per_layer = arch == gguf.MODEL_ARCH.DECI
    if arch not in (gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.DECI):
        adapter.add_native_gguf_hparams(writer)  # its keys first: the shared ones below skip what it set
    written = writer.kv_data[0]
    context = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if window and window < context:  # the llama and qwen blocks have no sliding window: stay where both agree
        context = window
    writer.add_name(name)
    if gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=writer.arch) not in written:
        writer.add_context_length(context)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(widths))
    writer.add_feed_forward_length(mlp if per_layer else mlp[0])
    writer.add_head_count(heads if per_layer else heads[0])
    writer.add_head_count_kv(kv_heads if per_layer else kv_heads[0])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    if gguf.Keys.Rope.FREQ_BASE.format(arch=writer.arch) not in written:
        writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(model.get_input_embeddings().weight.shape[0])
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tensors(adapter: Adapter, widths: list[dict], arch: gguf.MODEL_ARCH,
             qtype: gguf.GGMLQuantizationType) -> list[_Tensor]:
    """Every weight under its llama.cpp name (fused projections split for the llama block), q/k rows reordered
    where the architecture's rope needs it."""
    model = adapter.model
    names = gguf.get_tensor_name_map(arch, len(widths))
    llama_block = arch in (gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.DECI)
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    layer_of = {adapter.layer_name(i) + ".": i for i in range(len(widths))}
    tensors = []
    for full_name, full_param in model.state_dict().items():
        if tied and full_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        index = next((i for prefix, i in layer_of.items() if full_name.startswith(prefix)), None)
        if not llama_block:
            parts = adapter.native_gguf_tensors(full_name, full_param, widths)
        elif index is not None:
            parts = adapter.llama_tensors(full_name, full_param, widths[index])
        else:
            parts = {full_name: full_param}
        for hf_name, param in parts.items():
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise UnsupportedModelError(f"no GGUF name for tensor {hf_name}")
            rope_heads = None
            if llama_block and (".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name):
                rope_heads = widths[index]["num_attention_heads" if ".q_proj." in hf_name else "num_key_value_heads"]
            tensors.append(_Tensor(name, param, _tensor_qtype(param, qtype), rope_heads))
    rope_factors = _rope_freq_factors(model)
    if rope_factors is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        tensors.append(_Tensor(name, rope_factors, gguf.GGMLQuantizationType.F32))
    return tensors


def _check_representable(tensors: list[_Tensor], outtype: str) -> None:
    """Refuse, before the file is opened, a tensor that the GGUF would hold as Inf or NaN: a non-finite weight, or
    a value beyond float16's range in a tensor written as f16."""
    for t in tensors:
        if not all_finite(t.source):
            raise NonFiniteWeightsError(f"tensor {t.name} holds NaN or Inf values: not exporting it")
        if t.qtype == gguf.GGMLQuantizationType.F16 and not all_finite(t.source.detach().half()):
            raise InvalidRequestError(f"tensor {t.name} holds values beyond float16's range (+-65504), which f16 "
                                      f"turns into Inf; export with --outtype bf16 or f32 (asked: {outtype})")


def _tensor_qtype(param: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """Norms, biases and other vectors stay f32 (as llama.cpp's converter keeps them); Q8_0 needs rows of whole
    32-value blocks, which a pruned MLP width need not give, so such a matrix falls back to f16."""
    if param.dim() < 2:
        return gguf.GGMLQuantizationType.F32
    return qtype if param.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else gguf.GGMLQuantizationType.F16


def _rope_freq_factors(model) -> torch.Tensor | None:
    """llama.cpp's rope_freqs (per-dimension divisors of the base frequency) for linear and llama3 scaling."""
    if _rope_type(model.config) == "default":
        return None
    rotary = model.model.rotary_emb
    dim = model.model.layers[0].self_attn.head_dim
    theta = float(model.config.rope_parameters["rope_theta"])
    base = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return (base / rotary.inv_freq.double()).float()


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer, n_vocab: int) -> str:
    """Vocabulary, merges, special ids and chat template; returns where they came from."""
    with tempfiles.temp_folder("tokenizer") as tmp:
        tokenizer.save_pretrained(tmp)
        spec_path = Path(tmp) / "tokenizer.json"
        if not spec_path.is_file():
            raise UnsupportedModelError("GGUF export needs a fast tokenizer (tokenizer.json)")
        spec = json.loads(spec_path.read_text())
        tokens, types = _token_list(tokenizer, n_vocab)
        merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"].get("merges", [])]
        embedded = _embedded_tokenizer_fields(tokens, merges)
        if embedded is not None:
            source, fields = embedded
            for key, (value, vtype, sub_type) in fields.items():
                writer.add_key_value(key, value, vtype, sub_type=sub_type)
            return source
        _check_byte_level_bpe(spec)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(spec["pre_tokenizer"]))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=n_vocab)
        sample = tokenizer("a")["input_ids"]
        special.add_special_token["bos"] = tokenizer.bos_token_id is not None and sample[0] == tokenizer.bos_token_id
        special.add_special_token["eos"] = tokenizer.eos_token_id is not None and sample[-1] == tokenizer.eos_token_id
        special.add_to_gguf(writer, quiet=True)
    return "tokenizer.json"


def _check_byte_level_bpe(spec: dict) -> None:
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise UnsupportedModelError(
            "GGUF export supports byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, Qwen2); this one is "
            f"{model.get('type')} with a {decoder.get('type')} decoder (SentencePiece-style tokenizers need "
            "their scores from tokenizer.model)"
        )


def _token_list(tokenizer, n_vocab: int) -> tuple[list[str], list[gguf.TokenType]]:
    """Tokens by id, padded to the embedding's rows with unused placeholders (llama.cpp needs one per row)."""
    by_id = {i: text for text, i in tokenizer.get_vocab().items()}
    if max(by_id) >= n_vocab:
        raise UnsupportedModelError(f"the tokenizer has ids up to {max(by_id)} but the embedding only {n_vocab} rows")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added
                         else gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    return tokens, types


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for the tokenizer.json pre-tokenizer (it re-implements each as fixed regexes)."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        names = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}
        if regex in names:
            return names[regex]
    raise UnsupportedModelError(
        f"GGUF export does not know llama.cpp's name for this pre-tokenizer: {json.dumps(pre)[:200]}"
    )


def _embedded_tokenizer_fields(tokens: list[str], merges: list[str]) -> tuple[str, dict[str, tuple]] | None:
    """(source, tokenizer.* fields) of the embedded GGUF whose vocabulary (and merges, where it has them) are
    these, else None."""
    if len(tokens) not in EMBEDDED_TOKENIZERS:
        return None
    name, gguf_path = EMBEDDED_TOKENIZERS[len(tokens)]
    try:
        path = gguf_path()
    except MissingAssetError:
        return None
    reader = gguf.GGUFReader(path)
    fields = {key: field for key, field in reader.fields.items() if key.startswith("tokenizer.")}
    if _spaces_as_sentencepiece(fields["tokenizer.ggml.tokens"].contents()) != _spaces_as_sentencepiece(tokens) or (
            "tokenizer.ggml.merges" in fields and fields["tokenizer.ggml.merges"].contents() != merges):
        return None
    return f"embedded {name} GGUF", {
        key: (field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
        for key, field in fields.items()}


def _spaces_as_sentencepiece(tokens: list[str]) -> list[str]:
    """Tokens with spaces written as SentencePiece's U+2581, the form transformers' GGUF conversion gives Gemma's
    whitespace-run tokens (the original file keeps their spaces)."""
    return [token.replace(" ", "\u2581") for token in tokens]
