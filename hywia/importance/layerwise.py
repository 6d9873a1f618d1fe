"""Gradient statistics one decoder layer at a time, so only one layer's gradients and accumulators ever exist.

The plain pass backpropagates every sample through the whole model and accumulates, for every pruned weight, the
gradient and its square: about twice the pruned layers' weights in extra memory. Here:

1. forward: every sample runs up to the last pruned layer; each pruned layer's input (and the call's other
   arguments: positions, mask) is stored, and the last pruned layer's output;
2. top: the layers above and the head run from that stored output, one sample at a time (the head a few tokens
   at a time), and backpropagate to it: the upstream gradient of every sample, and the loss;
3. layers, from the last pruned one down: the layer is recomputed from each sample's stored input, the sample's
   upstream gradient is backpropagated through it, its weight gradients are accumulated (sum and sum of squares,
   float32), and the gradient at its input becomes the upstream gradient of the layer below. After the last sample
   the mean gradient and Fisher diagonal are complete, reduced to the group terms and freed.

Per sample and layer this computes exactly what the plain backward computes, in the same order, so the statistics
agree to float rounding; the price is one extra forward of the pruned layers. Per-sample tensors (layer inputs and
upstream gradients: samples x tokens x hidden each) wait in host memory or on disk (`ActivationStore`). A layer
offloaded by accelerate is loaded once for all samples of step 3 (`hywia.offload.resident`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import UnsupportedModelError
from ..io import tempfiles
from ..models import Adapter, GroupSpec
from ..offload import execution_device, resident
from .statistics import (Statistics, TaylorTerms, activation_hooks, check_finite, lm_loss, non_finite_loss_error,
                         taylor_terms)

STORES = ("auto", "memory", "disk")
UPSTREAM = "upstream"
HEAD_CHUNK_ELEMENTS = 2**20  # logits per head chunk: 4 MB in float32
HEAD_CHECK_TOKENS = 16


class ActivationStore:
    """Per-sample tensors by (key, sample): in host memory, or in one file per key in a temporary folder.

    On disk the tensors cost no process memory beyond the one being read, which is what lets the pass stay within
    a fraction of the model's own memory on a CPU, where host memory is the device memory.
    """

    def __init__(self, on_disk: bool) -> None:
        self.folder = tempfiles.temp_dir("activations") if on_disk else None
        self._memory: dict[tuple, torch.Tensor] = {}
        self._files: dict[object, tuple] = {}

    def put(self, key: object, index: int, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu", copy=True)  # a copy: the model may reuse the memory it came from
        if self.folder is None:
            self._memory[(key, index)] = tensor
            return
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        handle, entries = self._file(key)
        entry = entries.get(index)
        offset = entry[0] if entry is not None and entry[3] == raw.nbytes else handle.seek(0, 2)
        handle.seek(offset)
        handle.write(memoryview(raw))
        entries[index] = (offset, tensor.shape, tensor.dtype, raw.nbytes)

    def get(self, key: object, index: int, device: torch.device) -> torch.Tensor:
        if self.folder is None:
            return self._memory[(key, index)].to(device).detach()
        handle, entries = self._files[key]
        offset, shape, dtype, nbytes = entries[index]
        buffer = bytearray(nbytes)
        handle.seek(offset)
        handle.readinto(buffer)
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape).to(device)

    def drop(self, key: object) -> None:
        for item in [item for item in self._memory if item[0] == key]:
            del self._memory[item]
        if key in self._files:
            handle, _ = self._files.pop(key)
            handle.close()
            Path(handle.name).unlink()

    def close(self) -> None:
        for key in list(self._files):
            self.drop(key)
        self._memory.clear()
        if self.folder is not None:
            tempfiles.release(self.folder)

    def _file(self, key: object) -> tuple:
        if key not in self._files:
            self._files[key] = (open(self.folder / f"{key}.bin", "w+b"), {})
        return self._files[key]


@dataclass
class LayerCall:
    """How the model called a decoder layer for one sample, minus the hidden states."""

    args: tuple
    kwargs: dict
    positional: bool

    def sharing(self, previous: "LayerCall") -> "LayerCall":
        """This call, holding `previous`'s tensors wherever they are equal: windows of one length share their
        positions and mask, so the stored calls stay one sample's worth however many samples there are."""
        kwargs = {k: _reuse(v, previous.kwargs.get(k)) for k, v in self.kwargs.items()}
        return LayerCall(_reuse(self.args, previous.args), kwargs, self.positional)

    def run(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.positional:
            out = layer(hidden, *self.args, **self.kwargs)
        else:
            out = layer(*self.args, hidden_states=hidden, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


def _reuse(value, previous):
    """`previous` where it equals `value` (tensors, tuples of them), else `value`."""
    if isinstance(value, torch.Tensor) and isinstance(previous, torch.Tensor):
        same = (value.shape == previous.shape and value.dtype == previous.dtype and value.device == previous.device
                and torch.equal(value, previous))
        return previous if same else value
    if isinstance(value, tuple) and isinstance(previous, tuple) and len(value) == len(previous):
        return tuple(_reuse(v, p) for v, p in zip(value, previous))
    return value


class _Stop(Exception):
    """Ends a forward pass once the last pruned layer has run: nothing above it is needed yet."""


def layerwise_gradients(
    model: nn.Module,
    adapter: Adapter,
    layer_indices: list[int],
    batches: torch.Tensor,
    *,
    activations: bool,
    progress: bool,
    store: str,
) -> Statistics:
    """Statistics equal to the plain pass's, holding one layer's gradient statistics at a time (module docstring).

    Expects every parameter to have requires_grad off (collect_statistics does that and restores it).
    """
    layers = adapter.layers()
    low, high = min(layer_indices), max(layer_indices)
    on_disk = store == "disk" or (store == "auto" and execution_device(model).type == "cpu")
    stats = Statistics()
    acts = ActivationStore(on_disk)
    bar = tqdm(total=len(batches) * (high - low + 3), desc="calibration", disable=not progress, leave=False)
    try:
        prefixes = [adapter.layer_name(i) + "." for i in layer_indices] if activations else []
        calls, arity = capture_layer_inputs(model, layers, low, high, batches, acts, stats, prefixes, bar)
        _top(model, layers, high, batches, acts, stats, arity, bar)
        if not math.isfinite(stats.loss):  # checked here: the top layer's gradient would show it, misnamed
            raise non_finite_loss_error(model, adapter, batches)
        _release_freed_memory()
        for index in range(high, low - 1, -1):
            specs = adapter.group_specs(layers[index]) if index in layer_indices else []
            terms = _layer(layers[index], adapter.layer_name(index), index, specs, calls.pop(index), acts,
                           input_grad=index > low, bar=bar)
            stats.taylor.update({(index, kind): value for kind, value in terms.items()})
            acts.drop(index)
            _release_freed_memory()
    finally:
        bar.close()
        acts.close()
    return stats


def capture_layer_inputs(
    model: nn.Module,
    layers: list[nn.Module],
    low: int,
    high: int,
    batches: torch.Tensor,
    acts: ActivationStore,
    stats: Statistics,
    prefixes: list[str],
    bar: tqdm | None = None,
    input_layers: set[int] | None = None,
) -> tuple[dict[int, list[LayerCall]], int]:
    """Step 1: store the input of each layer low..high (of `input_layers` only, when given) and every call of
    them, and the last one's output (key high + 1).

    Returns the calls and the arity of a layer's output (0: a tensor; n: a tuple of n, hidden states first).
    """
    calls: dict[int, list[LayerCall]] = {index: [] for index in range(low, high + 1)}
    state = {"sample": 0, "arity": 0}

    def before(module: nn.Module, args: tuple, kwargs: dict, index: int) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if input_layers is None or index in input_layers:
            acts.put(index, state["sample"], hidden)
        call = LayerCall(tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"}, bool(args))
        calls[index].append(call.sharing(calls[index][-1]) if calls[index] else call)

    def after(module: nn.Module, args: tuple, output) -> None:
        state["arity"] = len(output) if isinstance(output, tuple) else 0
        acts.put(high + 1, state["sample"], output[0] if isinstance(output, tuple) else output)
        raise _Stop

    handles = [layers[i].register_forward_pre_hook(partial(before, index=i), with_kwargs=True)
               for i in range(low, high + 1)]
    handles.append(layers[high].register_forward_hook(after))
    device = execution_device(model)
    try:
        with activation_hooks(model, stats, prefixes), torch.no_grad():
            for sample, ids in enumerate(batches):
                state["sample"] = sample
                try:
                    model(input_ids=ids[None].to(device), use_cache=False)
                except _Stop:
                    pass
                stats.tokens += ids.numel()
                stats.samples += 1
                if bar is not None:
                    bar.update()
    finally:
        for handle in handles:
            handle.remove()
    return calls, state["arity"]


def _top(
    model: nn.Module,
    layers: list[nn.Module],
    high: int,
    batches: torch.Tensor,
    acts: ActivationStore,
    stats: Statistics,
    arity: int,
    bar: tqdm,
) -> None:
    """Step 2: the loss and its gradient at the last pruned layer's output, sample by sample.

    The model's own forward runs with the layers up to `high` standing aside (the last one hands over the stored
    output) and its output embedding passing the final hidden states through; the head then runs on a few tokens
    at a time (`_chunked_loss`), so the vocabulary-wide logits of a whole window never exist at once.
    """
    current: dict[str, torch.Tensor] = {}

    def hand_over(*args, **kwargs):
        return _as_output(current["hidden"], arity)

    def pass_through(*args, **kwargs):
        return _as_output(args[0] if args else kwargs["hidden_states"], arity)

    head = model.get_output_embeddings()
    device, handover_device = execution_device(model), execution_device(layers[high])
    _check_head(model, head, batches[0, :HEAD_CHECK_TOKENS][None].to(device))
    total_loss = 0.0
    with _forward_replaced(layers[:high], pass_through), _forward_replaced([layers[high]], hand_over):
        for sample, ids in enumerate(batches):
            ids = ids[None].to(device)
            hidden = acts.get(high + 1, sample, handover_device).requires_grad_()
            current["hidden"] = hidden
            with torch.enable_grad():
                with _forward_replaced([head], lambda x: x):
                    final = model(input_ids=ids, use_cache=False).logits
                loss = _chunked_loss(head, final, ids)
            acts.put(UPSTREAM, sample, hidden.grad)
            total_loss += loss
            bar.update()
    current.clear()
    acts.drop(high + 1)
    stats.loss = total_loss / max(stats.samples, 1)


def _chunked_loss(head: nn.Module, final: torch.Tensor, ids: torch.Tensor) -> float:
    """`lm_loss` and its backward from the final hidden states, the head applied to a few tokens at a time."""
    leaf = final.detach().requires_grad_()
    inputs, targets = leaf[0, :-1], ids[0, 1:]
    chunk = max(1, HEAD_CHUNK_ELEMENTS // head.weight.shape[0])
    total = 0.0
    for start in range(0, targets.numel(), chunk):
        logits = head(inputs[start:start + chunk]).float()
        part = F.cross_entropy(logits, targets[start:start + chunk], reduction="sum") / targets.numel()
        part.backward()
        total += part.item()
    final.backward(leaf.grad)
    return total


def _check_head(model: nn.Module, head: nn.Module, ids: torch.Tensor) -> None:
    """The output embedding applied to the final hidden states must give the model's own loss (checked on a few
    tokens): a family that transforms its logits after it (softcapping, scaling) would not."""
    with torch.no_grad():
        reference = lm_loss(model, ids).item()
        with _forward_replaced([head], lambda x: x):
            final = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(head(final[0, :-1]).float(), ids[0, 1:]).item()
    if abs(loss - reference) > 1e-4 * max(1.0, abs(reference)):
        raise UnsupportedModelError(
            f"{type(model).__name__} transforms its logits after the output embedding (loss {reference:.6f}, "
            f"head alone {loss:.6f}); use the plain importance path"
        )


def _layer(
    layer: nn.Module,
    name: str,
    index: int,
    specs: list[GroupSpec],
    calls: list[LayerCall],
    acts: ActivationStore,
    *,
    input_grad: bool,
    bar: tqdm,
) -> dict[str, TaylorTerms]:
    """Step 3 for one layer: its group terms (none if it is not pruned) and the upstream gradient below it."""
    with resident(layer):
        device = execution_device(layer)
        params = {s.param: layer.get_parameter(s.param) for spec in specs for s in spec.slices}
        sums = {key: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for key, p in params.items()}
        squares = {key: torch.zeros_like(value) for key, value in sums.items()}
        for param in params.values():
            param.requires_grad_(True)
        try:
            for sample, call in enumerate(calls):
                hidden = acts.get(index, sample, device).requires_grad_(input_grad)
                with torch.enable_grad():
                    out = call.run(layer, hidden)
                    wrt = ([hidden] if input_grad else []) + list(params.values())
                    grads = torch.autograd.grad(out, wrt, grad_outputs=acts.get(UPSTREAM, sample, out.device),
                                                allow_unused=True)
                if input_grad:
                    acts.put(UPSTREAM, sample, grads[0])
                for key, grad in zip(params, grads[len(grads) - len(params):]):
                    if grad is not None:
                        grad = grad.float()
                        sums[key].add_(grad)
                        squares[key].addcmul_(grad, grad)
                bar.update()
        finally:
            for param in params.values():
                param.requires_grad_(False)
        for key in params:
            sums[key] /= len(calls)
            squares[key] /= len(calls)
            check_finite(f"{name}.{key}", sums[key], params[key].dtype)
        return {
            spec.kind: taylor_terms(spec, ((s, params[s.param].detach().float(), sums[s.param], squares[s.param])
                                           for s in spec.slices))
            for spec in specs
        }


def _release_freed_memory() -> None:
    """Hand the memory a finished layer freed back to the OS (glibc keeps it otherwise, and the process's memory
    creeps up layer after layer from fragmentation); elsewhere a no-op."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()


def _as_output(hidden: torch.Tensor, arity: int):
    return hidden if arity == 0 else (hidden,) + (None,) * (arity - 1)


@contextmanager
def _forward_replaced(modules: list[nn.Module], forward: Callable) -> Iterator[None]:
    """Temporarily route calls of `modules` to `forward` (accelerate's wrapper, if any, is restored after)."""
    saved = [module.__dict__.get("forward") for module in modules]
    for module in modules:
        module.forward = forward
    try:
        yield
    finally:
        for module, previous in zip(modules, saved):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
