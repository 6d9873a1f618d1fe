"""Models larger than the device: decoder layers placed with accelerate (a device_map with CPU or disk offload, or
spread over several GPUs) and handled one layer at a time.

accelerate keeps an offloaded module's weights on the meta device and loads them for every call; the statistics
pass, weight-reading criteria and surgery instead hold one layer's weights resident for many calls (`resident`),
and surgery points accelerate at the edited tensors afterwards (`editable`), so the pruned layer streams on.
Nothing here schedules anything itself: placement and streaming are accelerate's.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .errors import InvalidRequestError
from .models import adapter_for

OFFLOAD_TARGETS = ("cpu", "disk")
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's named device_map strategies
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def _offload_hooks(module: nn.Module) -> list:
    """accelerate's offloading AlignDevicesHook(s) attached to `module` itself (possibly inside a SequentialHook)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    from accelerate.hooks import AlignDevicesHook

    hooks = getattr(hook, "hooks", (hook,))
    return [h for h in hooks if isinstance(h, AlignDevicesHook) and h.offload]


def is_offloaded(model: nn.Module) -> bool:
    return any(_offload_hooks(m) for m in model.modules())


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its accelerate execution device, else the device of its first real tensor."""
    for m in module.modules():
        hook = getattr(m, "_hf_hook", None)
        for h in getattr(hook, "hooks", (hook,)) if hook is not None else ():
            if getattr(h, "execution_device", None) is not None:
                return torch.device(h.execution_device)
    for tensor in module.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


@contextmanager
def resident(root: nn.Module) -> Iterator[list[tuple[str, nn.Module, object]]]:
    """Load every offloaded weight under `root` onto its execution device once for the whole block; yields the
    (name, module, hook) loaded."""
    loaded = []
    try:
        for name, module in root.named_modules():
            for hook in _offload_hooks(module):
                hook.pre_forward(module)
                hook.offload = False
                loaded.append((name, module, hook))
        yield loaded
    finally:
        for _, module, hook in reversed(loaded):
            hook.offload = True
            hook.post_forward(module, None)


@contextmanager
def editable(root: nn.Module) -> Iterator[None]:
    """`resident`, and afterwards accelerate serves the edited tensors (smaller after surgery) instead of the
    originals: written as safetensors beside the original offload folder when they came from disk, kept in host
    memory when they came from there."""
    with resident(root) as loaded:
        yield
        for name, module, hook in loaded:
            hook.weights_map = _new_weights_map(hook.weights_map, module, name)


def _new_weights_map(old, module: nn.Module, name: str):
    from accelerate.utils import OffloadedWeightsLoader
    from safetensors.torch import save_file

    tensors = {key: t.detach().to("cpu").contiguous() for key, t in module.named_parameters(recurse=False)}
    tensors.update({key: t.to("cpu") for key, t in module.named_buffers(recurse=False) if key in old})
    dataset = getattr(old, "dataset", old)
    folder = getattr(dataset, "save_folder", None)
    prefix = getattr(old, "prefix", "")
    if folder is None or any(prefix + key in getattr(dataset, "state_dict", {}) for key in tensors):
        return tensors
    edited = Path(folder) / "hywia-edited"
    path = edited / f"{name or 'root'}-{uuid.uuid4().hex}.safetensors"
    edited.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    for entry in getattr(dataset, "index", {}).values():  # an earlier edit's file, never the checkpoint's
        previous = Path(entry.get("safetensors_file") or path)
        if previous.parent == edited and previous != path:
            previous.unlink(missing_ok=True)
    index = {key: {"safetensors_file": str(path), "weight_name": key} for key in tensors}
    return OffloadedWeightsLoader(save_folder=folder, index=index)


def stored_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of `model` by name, one at a time: an offloaded one (on the meta device) read from
    accelerate's weights map (host memory or its safetensors file on disk), so a check of all the weights never
    needs them all in memory at once."""
    for prefix, module in model.named_modules():
        hooks = _offload_hooks(module)
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for key, tensor in own:
            if tensor.device.type == "meta":
                tensor = _offloaded(hooks, key)
                if tensor is None:
                    continue  # nothing holds it (an empty skeleton): no values to check
            yield (f"{prefix}.{key}" if prefix else key), tensor


def _offloaded(hooks: list, key: str) -> torch.Tensor | None:
    """The tensor `key` from the first hook's weights map that holds it (read once: a lookup loads it from disk)."""
    for hook in hooks:
        if hook.weights_map is None:
            continue
        try:
            return hook.weights_map[key]
        except KeyError:
            continue
    return None


def check_device(device: str | torch.device, flag: str = "--device") -> torch.device:
    """`device` parsed and present on this machine, before any weight is loaded onto it; `flag` names where the
    user gave it."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidRequestError(f"{flag} {device!r} is not a device; use cpu, cuda or cuda:N") from exc
    if parsed.type not in DEVICE_TYPES:
        raise InvalidRequestError(f"{flag} {device!r}: hywia runs on {', '.join(DEVICE_TYPES)}, not {parsed.type}")
    if parsed.type == "cpu":
        return parsed
    backend = getattr(torch, parsed.type)
    count = backend.device_count() if backend.is_available() else 0
    if count == 0:
        raise InvalidRequestError(f"{flag} {device!r}: no {parsed.type} device is visible here; use cpu")
    if parsed.index is not None and parsed.index >= count:
        raise InvalidRequestError(f"{flag} {device!r}: only {count} {parsed.type} device(s) are visible "
                                  f"({parsed.type}:0 to {parsed.type}:{count - 1})")
    return parsed


def check_device_map(device_map: object, model: nn.Module) -> None:
    """A --device-map that accelerate can honour on `model` (a meta skeleton is enough): a strategy name, a device,
    or a map whose keys are the model's modules or tensors, whose values are devices here, "cpu" or "disk", and
    which places every weight."""
    if isinstance(device_map, str):
        if device_map in STRATEGIES:
            return
        try:
            torch.device(device_map)
        except RuntimeError as exc:
            raise InvalidRequestError(f"--device-map must be one of {', '.join(STRATEGIES)}, a device or a .json "
                                      f"file of a device map, got {device_map!r}") from exc
        check_device(device_map, "--device-map")
        return
    if not isinstance(device_map, dict) or not device_map:
        raise InvalidRequestError(f"--device-map must be one of {', '.join(STRATEGIES)} or a JSON file of a "
                                  f"non-empty {{module name: device}} object, got {type(device_map).__name__}")
    known = {name for name, _ in model.named_modules()} | set(model.state_dict())
    unknown = [key for key in device_map if key not in known]
    if unknown:
        raise InvalidRequestError(f"--device-map names {', '.join(map(repr, unknown[:3]))}, which the model does not "
                                  f"have (its modules are e.g. {', '.join(_top_names(model))})")
    for key, value in device_map.items():
        if value in ("cpu", "disk"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise InvalidRequestError(f"--device-map {key!r}: {value!r} is not a device (cpu, disk, cuda:N or N)")
        check_device(f"cuda:{value}" if isinstance(value, int) else value, f"--device-map {key!r}:")
    uncovered = [name for name in model.state_dict()
                 if not any(key == "" or name == key or name.startswith(key + ".") for key in device_map)]
    if uncovered:
        raise InvalidRequestError(f"--device-map places no device for {', '.join(uncovered[:3])}"
                                  f"{' ...' if len(uncovered) > 3 else ''}")


def _top_names(model: nn.Module) -> list[str]:
    """A few module names a map could use: the model's children and their children."""
    return [name for name, _ in model.named_modules() if name and name.count(".") <= 1][:4]


def offload_device_map(model: nn.Module, layer_names: list[str], target: str, device: str) -> dict[str, str]:
    """A device_map that puts every decoder layer on `target` ("cpu" or "disk") and everything else on `device`.

    Works on a meta-device model (built from a config), so the map exists before any weight is loaded.
    """
    layers = set(layer_names)
    placement: dict[str, str] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        for key, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            placement[f"{prefix}{key}"] = device
        for key, child in module.named_children():
            full = f"{prefix}{key}"
            if full in layers:
                placement[full] = target
            elif any(layer.startswith(full + ".") for layer in layers):
                visit(full + ".", child)
            else:
                placement[full] = device

    visit("", model)
    return placement


def check_placement(offload: str | None, device_map: str | dict | None) -> None:
    if offload is not None and offload not in OFFLOAD_TARGETS:
        raise InvalidRequestError(f"--offload must be one of {', '.join(OFFLOAD_TARGETS)}, got {offload!r}")
    if offload is not None and device_map is not None:
        raise InvalidRequestError("--offload and --device-map both place the layers: give one of them")


def loading_device_map(skeleton: nn.Module, *, offload: str | None, device_map: str | dict | None,
                       device: str) -> str | dict:
    """What `from_pretrained(device_map=...)` gets: `device_map` as given (accelerate's "auto", "balanced", ... or
    a dict), checked against `skeleton` (the model on the meta device), or every decoder layer on `offload` and the
    rest on `device`."""
    if device_map is not None:
        check_device_map(device_map, skeleton)
        return device_map
    adapter = adapter_for(skeleton)
    names = [adapter.layer_name(i) for i in range(len(adapter.layers()))]
    return offload_device_map(skeleton, names, offload, device)


def place(model: nn.Module, *, offload: str | None, device_map: str | dict | None, device: str,
          folder: str | Path) -> nn.Module:
    """Dispatch a live model with accelerate as `loading_device_map` would have placed it at loading."""
    from accelerate import dispatch_model, infer_auto_device_map

    check_device(device)
    if device_map is None:
        adapter = adapter_for(model)
        names = [adapter.layer_name(i) for i in range(len(adapter.layers()))]
        mapping = offload_device_map(model, names, offload, device)
    elif device_map == "auto":
        mapping = infer_auto_device_map(model, no_split_module_classes=getattr(model, "_no_split_modules", None))
    elif isinstance(device_map, dict):
        check_device_map(device_map, model)
        mapping = device_map
    else:
        raise InvalidRequestError(f"a live model takes --device-map auto or an explicit map, not {device_map!r}")
    return dispatch_model(model, mapping, main_device=device, offload_dir=str(folder))
