"""Run calibration windows up to a decoder layer and keep what each layer received: its input and its call.

Both the layer-by-layer statistics (`hywia.importance.layerwise`) and compensation (`hywia.pruning.compensate`)
replay a decoder layer on stored inputs; this is the one place that records them. `forward_replaced` lets the
model's own forward skip layers whose output is already known, and `standing_aside` hands such an output to the
layers above it (the statistics' head pass, the fusion's held-out check, the profile search).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..offload import execution_device
from .store import ActivationStore


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


def capture_layer_inputs(
    model: nn.Module,
    layers: list[nn.Module],
    low: int,
    high: int,
    batches: torch.Tensor,
    acts: ActivationStore,
    bar: tqdm | None = None,
    input_layers: set[int] | None = None,
) -> tuple[dict[int, list[LayerCall]], int]:
    """Store the input of each layer low..high and the last one's output (key high + 1), or only those of them
    in `input_layers` when given, and every call of the layers low..high.

    Forward hooks the caller holds (activation sums, say) see every sample up to layer `high`. Returns the calls
    and the arity of a layer's output (0: a tensor; n: a tuple of n, hidden states first).
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
        if input_layers is None or high + 1 in input_layers:
            acts.put(high + 1, state["sample"], output[0] if isinstance(output, tuple) else output)
        raise _Stop

    handles = [layers[i].register_forward_pre_hook(partial(before, index=i), with_kwargs=True)
               for i in range(low, high + 1)]
    handles.append(layers[high].register_forward_hook(after))
    device = execution_device(model)
    try:
        with torch.no_grad():
            for sample, ids in enumerate(batches):
                state["sample"] = sample
                try:
                    model(input_ids=ids[None].to(device), use_cache=False)
                except _Stop:
                    pass
                if bar is not None:
                    bar.update()
    finally:
        for handle in handles:
            handle.remove()
    return calls, state["arity"]


def replay_start(
    model: nn.Module, layers: list[nn.Module], low: int, high: int, batches: torch.Tensor
) -> tuple[dict[int, list[LayerCall]], list[torch.Tensor], int]:
    """What a pass that replays layers low..high in order starts from: every call of those layers, layer `low`'s
    input for each window on the CPU (the pass advances the hidden states through the layers itself), and the arity
    of a layer's output (`as_layer_output`, for a pass that hands its result back to the model's forward).

    Only the layers up to `low` compute: each layer above it records its call and hands layer `low`'s output on.
    A decoder layer's call (positions, masks, rotary tables) comes from the model's own forward, not from the
    hidden states below it, so the calls are those of the full forward, at the cost of a forward up to `low`."""
    acts = ActivationStore(on_disk=False)
    output = {}

    def keep(module: nn.Module, args: tuple, result) -> None:
        output["low"] = result

    handle = layers[low].register_forward_hook(keep)
    try:
        with forward_replaced(layers[low + 1:high + 1], lambda *args, **kwargs: output["low"]):
            calls, arity = capture_layer_inputs(model, layers, low, high, batches, acts, input_layers={low})
        return calls, [acts.get(low, sample, torch.device("cpu")) for sample in range(len(batches))], arity
    finally:
        handle.remove()
        acts.close()


def as_layer_output(hidden: torch.Tensor, arity: int):
    """What a decoder layer returns, from its hidden states: the tensor itself (arity 0) or a tuple of `arity`."""
    return hidden if arity == 0 else (hidden,) + (None,) * (arity - 1)


@contextmanager
def standing_aside(layers: list[nn.Module], last: int, handed_over: Callable[[], torch.Tensor],
                   arity: int) -> Iterator[None]:
    """The layers below `last` pass their input through and layer `last` returns `handed_over()`: the model's own
    forward then runs the layers above `last` and the head on that output, with the positions, masks and rotary
    tables it makes itself, at the cost of the embedding alone below it."""

    def pass_through(*args, **kwargs):
        return as_layer_output(args[0] if args else kwargs["hidden_states"], arity)

    with forward_replaced(layers[:last], pass_through), \
            forward_replaced([layers[last]], lambda *args, **kwargs: as_layer_output(handed_over(), arity)):
        yield


@contextmanager
def forward_replaced(modules: list[nn.Module], forward: Callable | None = None, *,
                     wrap: Callable[[Callable], Callable] | None = None) -> Iterator[None]:
    """Temporarily route calls of `modules` to `forward`, or to `wrap` of each module's own forward (accelerate's
    wrapper, if any, is restored after)."""
    saved = [module.__dict__.get("forward") for module in modules]
    for module in modules:
        module.forward = forward if wrap is None else wrap(module.forward)
    try:
        yield
    finally:
        for module, previous in zip(modules, saved):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
