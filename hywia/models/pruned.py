"""Pruned-model classes: the family's own HF classes, building each decoder layer at its saved widths.

A pruned folder's config.json has `model_type: hywia_<family>` and `hywia_layers` (one dict of widths per
layer); `import hywia` registers these classes with the Auto classes, so `AutoModelForCausalLM.from_pretrained`
builds the right shapes and loads the safetensors as they are (never `ignore_mismatched_sizes`).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .base import adapter_for

_PRUNED: dict[type, tuple[type, type]] = {}


def pruned_classes(base_model_cls: type[PreTrainedModel]) -> tuple[type, type]:
    """The (config, model) classes of a pruned `base_model_cls`, created and registered once."""
    if base_model_cls in _PRUNED:
        return _PRUNED[base_model_cls]
    base_config_cls = base_model_cls.config_class
    model_type = f"hywia_{base_config_cls.model_type}"
    config_cls = type(f"Hywia{base_config_cls.__name__}", (base_config_cls,), {"model_type": model_type})

    def __init__(self, config):  # noqa: N807 - method built for the generated class
        base_model_cls.__init__(self, config)
        adapter = adapter_for(self)
        for layer, widths in zip(adapter.layers(), config.hywia_layers):
            adapter.resize_to(layer, widths)

    model_cls = type(
        f"Hywia{base_model_cls.__name__}",
        (base_model_cls,),
        {"config_class": config_cls, "__init__": __init__, "__module__": __name__},
    )
    AutoConfig.register(model_type, config_cls)
    AutoModelForCausalLM.register(config_cls, model_cls)
    _PRUNED[base_model_cls] = (config_cls, model_cls)
    return config_cls, model_cls


def base_class(model_cls: type) -> type:
    """The family's original class of a (possibly already pruned) model class."""
    for base, (_, pruned) in _PRUNED.items():
        if model_cls is pruned:
            return base
    return model_cls


def mark_pruned(model: PreTrainedModel) -> None:
    """Turn a model whose layers were shrunk in place into its pruned class, recording per-layer widths.

    The config object is re-classed rather than rebuilt, so runtime settings (attention implementation, ...)
    that `to_dict` does not carry stay as they are.
    """
    adapter = adapter_for(model)
    config_cls, model_cls = pruned_classes(base_class(type(model)))
    model.config.__class__ = config_cls
    model.config.hywia_layers = [adapter.widths(layer) for layer in adapter.layers()]
    model.config.architectures = [model_cls.__name__]
    model.__class__ = model_cls
