"""The adapter interface: everything hywia knows about a model family.

Families differ only in here (fused qkv, biases, ALiBi slopes): everything downstream (statistics, criteria,
plans, surgery, LoRA, saving, GGUF export) asks the adapter, so a new family is one new adapter file (plus its
self-contained modeling file in `hywia.models.remote`, which pruned folders carry).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
from torch import nn

from ..errors import UnsupportedModelError

if TYPE_CHECKING:
    import gguf

LayerKind = tuple[int, str]  # (decoder layer index, group kind): the key of every per-group table downstream


@dataclass(frozen=True)
class TensorSlice:
    """One tensor a group kind owns: group i holds `block` consecutive entries along `dim`, at offset + i*block.

    `param` is the parameter's name relative to the decoder layer (e.g. "self_attn.q_proj.weight"). `offset` places
    the groups inside a fused tensor (the k rows of a packed [q; k; v] projection start at num_heads * head_dim).
    """

    param: str
    dim: int
    block: int
    offset: int = 0


@dataclass(frozen=True)
class GroupSpec:
    """All groups of one structure kind in one layer: `count` coupled groups sharing the same slices.

    Kinds used by the built-in adapters: "head" (a query head), "kv" (a KV head with all its query heads),
    "mlp" (an MLP channel). `gate_module` is the output projection through which the groups write into the
    residual stream (o_proj, down_proj), and each group feeds `gate_block` consecutive input columns of it: zeroing
    those inputs removes the group exactly, which is what the fusion's soft gates and compensation act on.
    """

    kind: str
    count: int
    slices: tuple[TensorSlice, ...]
    gate_module: str
    gate_block: int
    kv_groups: int = 1  # "head" kind: query head h reads KV group h // (count / kv_groups) (HF's repeat_kv)

    def gate_columns(self, kept: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate module's input columns that the kept groups and that the other groups feed, each ascending."""
        removed = torch.ones(self.count, dtype=torch.bool)
        removed[kept] = False
        block = torch.arange(self.gate_block)
        return (((~removed).nonzero() * self.gate_block + block).reshape(-1),
                (removed.nonzero() * self.gate_block + block).reshape(-1))

    def indices(self, groups: torch.Tensor, s: TensorSlice) -> torch.Tensor:
        """Element indices along `s.dim` owned by `groups`."""
        block = torch.arange(s.block, device=groups.device)
        return (s.offset + groups[:, None] * s.block + block[None, :]).reshape(-1)


@dataclass(frozen=True)
class GGUFMapping:
    """How llama.cpp can run a family's (pruned) model.

    `llama_block`: once `Adapter.llama_tensors` has split its fused weights, every layer is llama.cpp's llama block
    (q/k/v/o, SiLU gate/up/down, RMSNorm, rope), so `llama` (same widths everywhere) or `deci` (per-layer widths)
    express any pruning. `native_arch` (a gguf architecture name): written for the unpruned model, and, when the
    layers are not llama blocks, for a model whose layers all keep the same widths. `refusal`: the one line said
    when llama.cpp cannot express the family at all.
    """

    llama_block: bool = False
    native_arch: str | None = None
    refusal: str | None = None


# How attention is pruned: query heads evenly within every KV group, whole KV groups, or not at all (MLP channels
# only, as LLM-Pruner's GQA path allows on models with few KV groups).
ATTENTION_MODES = ("heads", "kv", "none")


class Adapter(ABC):
    """Knows one family: its decoder layers, group kinds, widths, how to shrink a layer, and how the other steps
    address it (LoRA targets, modeling code for loading without hywia, GGUF mapping).

    Subclasses register with `@register_adapter("LlamaForCausalLM", ...)` and set the class attributes below.
    """

    architectures: ClassVar[tuple[str, ...]] = ()
    # Names (last component) of the Linear modules LoRA adapts; peft sizes each pair to its layer's width.
    lora_targets: ClassVar[tuple[str, ...]] = ()
    # Module of hywia.models.remote (imports only torch and transformers) that defines the pruned config and model
    # classes under the names `pruned_classes` gives them; saved into pruned folders and named by their auto_map.
    remote_module: ClassVar[str] = ""

    def __init__(self, model: nn.Module, attention: str = "heads") -> None:
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
        self.model = model
        self.attention = attention

    @abstractmethod
    def layers(self) -> list[nn.Module]:
        """The decoder layers, in order."""

    @abstractmethod
    def layer_name(self, index: int) -> str:
        """The qualified module name of decoder layer `index` (prefix of its parameter names)."""

    @abstractmethod
    def all_group_specs(self, layer: nn.Module) -> list[GroupSpec]:
        """Every group kind of a layer in its current (possibly pruned) shape; the attention's as `attention` says
        (query heads within KV groups, or whole KV groups)."""

    def group_specs(self, layer: nn.Module) -> list[GroupSpec]:
        """The group kinds pruning may remove: all of them, or the MLP channels alone with attention `none`."""
        specs = self.all_group_specs(layer)
        return [s for s in specs if s.kind == "mlp"] if self.attention == "none" else specs

    @abstractmethod
    def widths(self, layer: nn.Module) -> dict[str, int]:
        """The layer's widths in the config's vocabulary: always num_attention_heads, num_key_value_heads and
        intermediate_size, plus what reloading needs (e.g. alibi_heads, added_biases)."""

    @abstractmethod
    def shrink(self, layer: nn.Module, keep: dict[str, torch.Tensor]) -> None:
        """Physically keep only the given groups (sorted indices per kind) of a layer, in place."""

    @abstractmethod
    def resize_to(self, layer: nn.Module, widths: dict[str, int]) -> None:
        """Give a freshly built layer the widths saved in a pruned config (values are loaded afterwards)."""

    @abstractmethod
    def gguf_mapping(self) -> GGUFMapping:
        """How llama.cpp can run this model (it may depend on the config, e.g. RoPE or ALiBi)."""

    def llama_tensors(self, name: str, tensor: torch.Tensor, widths: dict) -> dict[str, torch.Tensor]:
        """A layer parameter under LLaMA's HF names (fused projections split); used when `llama_block`."""
        return {name: tensor}

    def native_gguf_tensors(self, name: str, tensor: torch.Tensor, widths: list[dict]) -> dict[str, torch.Tensor]:
        """A parameter (any, under its HF name) as `GGUFMapping.native_arch` stores it, given every layer's widths;
        used when the layers are not written as llama blocks (e.g. Gemma's norms scale by 1 + weight)."""
        return {name: tensor}

    def add_native_gguf_hparams(self, writer: "gguf.GGUFWriter") -> None:
        """Hyperparameters `native_arch` reads beyond the shared ones (e.g. sliding windows); written before the
        shared ones, which then skip any key set here."""

    def num_decoder_params(self) -> int:
        return sum(p.numel() for layer in self.layers() for p in layer.parameters())


_ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(*architectures: str) -> Callable[[type[Adapter]], type[Adapter]]:
    def decorator(cls: type[Adapter]) -> type[Adapter]:
        if not cls.lora_targets or not cls.remote_module:
            raise TypeError(f"{cls.__name__} must declare lora_targets and remote_module")
        cls.architectures = tuple(architectures)
        for arch in architectures:
            _ADAPTERS[arch] = cls
        return cls

    return decorator


def supported_architectures() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(model: nn.Module, attention: str = "heads") -> Adapter:
    """The registered adapter for a model, by its class name or its config's architectures."""
    names = [type(model).__name__] + list(getattr(model.config, "architectures", None) or [])
    for name in names:
        if name in _ADAPTERS:
            return _ADAPTERS[name](model, attention=attention)
    raise UnsupportedModelError(
        f"unsupported architecture {names[0]}; supported: {', '.join(supported_architectures())}"
    )
