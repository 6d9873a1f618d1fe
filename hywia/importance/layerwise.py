"""Gradient statistics one decoder layer at a time, so only one layer's gradients and accumulators ever exist.

The plain pass backpropagates every sample through the whole model and accumulates, for every pruned weight, the
gradient and its square: about twice the pruned layers' weights in extra memory. Here:

1. forward: every sample runs up to the last pruned layer; each pruned layer's input (and the call's other
   arguments: positions, mask) is stored, and the last pruned layer's output;
2. top: the layers above and the head run from that stored output, one sample at a time (the head on chunks
   of tokens, `head_chunk_tokens`), and backpropagate to it: the upstream gradient of every sample, and the loss;
3. layers, from the last pruned one down: the layer is recomputed from each sample's stored input, the sample's
   upstream gradient is backpropagated through it, its weight gradients are accumulated (sum and sum of squares,
   float32), and the gradient at its input becomes the upstream gradient of the layer below. After the last sample
   the mean gradient and Fisher diagonal are complete, reduced to the group terms and freed. Asked for folds, the
   layer also keeps each fold's sums apart and reduces them to that fold's terms.

Per sample and layer this computes exactly what the plain backward computes, in the same order, so the statistics
agree to float rounding; the price is one extra forward of the pruned layers. Per-sample tensors (layer inputs and
upstream gradients: samples x tokens x hidden each) wait in host memory or on disk (`ActivationStore`). A layer
offloaded by accelerate is loaded once for all samples of step 3 (`hywia.offload.resident`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..calibration import ActivationStore, LayerCall, capture_layer_inputs
from ..calibration.capture import forward_replaced, standing_aside
from ..errors import UnsupportedModelError
from ..measure import release_freed_memory
from ..models import Adapter, GroupSpec
from ..offload import execution_device, resident
from .statistics import (Statistics, TaylorTerms, activation_hooks, check_finite, fold_of, fold_sizes,
                         lm_loss, non_finite_loss_error, taylor_terms)

UPSTREAM = "upstream"
HEAD_CHUNK_ELEMENTS = 2**20  # logits per head chunk at least: 4 MB in float32
HEAD_CHUNK_WEIGHT_SHARE = 16  # and up to 1/16 of the head's weight elements (`head_chunk_tokens`)
HEAD_CHECK_TOKENS = 16


def layerwise_gradients(
    model: nn.Module,
    adapter: Adapter,
    layer_indices: list[int],
    batches: torch.Tensor,
    *,
    activations: bool,
    progress: bool,
    store: str,
    folds: int = 1,
) -> Statistics:
    """Statistics equal to the plain pass's, holding one layer's gradient statistics at a time (module docstring).

    Expects every parameter to have requires_grad off (collect_statistics does that and restores it).
    """
    layers = adapter.layers()
    low, high = min(layer_indices), max(layer_indices)
    on_disk = store == "disk" or (store == "auto" and execution_device(model).type == "cpu")
    stats = Statistics(fold_taylor=[{} for _ in range(folds)] if folds > 1 else [])
    acts = ActivationStore(on_disk)
    bar = tqdm(total=len(batches) * (high - low + 3), desc="calibration", disable=not progress, leave=False)
    try:
        prefixes = [adapter.layer_name(i) + "." for i in layer_indices] if activations else []
        with activation_hooks(model, stats, prefixes):
            calls, arity = capture_layer_inputs(model, layers, low, high, batches, acts, bar)
        stats.tokens += batches.numel()
        stats.samples += len(batches)
        _top(model, layers, high, batches, acts, stats, arity, bar)
        if not math.isfinite(stats.loss):  # checked here: the top layer's gradient would show it, misnamed
            raise non_finite_loss_error(model, adapter, batches)
        release_freed_memory()
        for index in range(high, low - 1, -1):
            specs = adapter.group_specs(layers[index]) if index in layer_indices else []
            terms, fold_terms = _layer(layers[index], adapter.layer_name(index), index, specs, calls.pop(index),
                                       acts, input_grad=index > low, bar=bar, folds=folds)
            stats.taylor.update({(index, kind): value for kind, value in terms.items()})
            for table, part in zip(stats.fold_taylor, fold_terms):
                table.update({(index, kind): value for kind, value in part.items()})
            acts.drop(index)
            release_freed_memory()
    finally:
        bar.close()
        acts.close()
    return stats


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
    output) and its output embedding passing the final hidden states through; the head then runs on chunks of
    tokens (`chunked_loss`), so the vocabulary-wide logits of a whole window never exist at once.
    """
    current: dict[str, torch.Tensor] = {}
    head = model.get_output_embeddings()
    device, handover_device = execution_device(model), execution_device(layers[high])
    _check_head(model, batches[0, :HEAD_CHECK_TOKENS][None].to(device))
    total_loss = 0.0
    with standing_aside(layers, high, lambda: current["hidden"], arity):
        for sample, ids in enumerate(batches):
            ids = ids[None].to(device)
            hidden = acts.get(high + 1, sample, handover_device).requires_grad_()
            current["hidden"] = hidden
            with torch.enable_grad():
                loss = chunked_loss(head, final_hidden(model, ids), ids)
            acts.put(UPSTREAM, sample, hidden.grad)
            total_loss += loss
            bar.update()
    current.clear()
    acts.drop(high + 1)
    stats.loss = total_loss / max(stats.samples, 1)


def head_chunk_tokens(head: nn.Module) -> int:
    """Tokens per chunk of the output embedding: logits up to 1/16 of its weight (at least 4 MB), so memory stays a
    small share of the weights while every read of the weight serves many tokens. At 4 MB alone Gemma-3's 262k
    vocabulary gave 4 tokens a chunk: the 168M-element weight was read 32 times per 128-token window."""
    vocab, hidden = head.weight.shape
    return max(1, HEAD_CHUNK_ELEMENTS // vocab, hidden // HEAD_CHUNK_WEIGHT_SHARE)


def chunked_loss(head: nn.Module, final: torch.Tensor, ids: torch.Tensor, share: float = 1.0) -> float:
    """`lm_loss` of windows `ids` [batch, tokens] and its backward from their final hidden states, the head applied
    to chunks of tokens (`head_chunk_tokens`: the vocabulary-wide logits never exist at once); returns the loss.
    `share` scales loss and gradients: the part of a larger batch's mean that these windows are."""
    leaf = final.detach().requires_grad_()
    inputs, targets = leaf[:, :-1].reshape(-1, leaf.shape[-1]), ids[:, 1:].reshape(-1)
    chunk = head_chunk_tokens(head)
    total = 0.0
    for start in range(0, targets.numel(), chunk):
        logits = head(inputs[start:start + chunk]).float()
        part = F.cross_entropy(logits, targets[start:start + chunk], reduction="sum") * (share / targets.numel())
        part.backward()
        total += part.item()
    final.backward(leaf.grad)
    return total


def final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The final hidden states of `ids`: the model's own forward with its output embedding passing them through."""
    with forward_replaced([model.get_output_embeddings()], lambda x: x):
        return model(input_ids=ids, use_cache=False).logits


def head_is_last(model: nn.Module, ids: torch.Tensor) -> bool:
    """Whether the output embedding applied to the final hidden states gives the model's own loss (checked on a
    few tokens): a family that transforms its logits after it (softcapping, scaling) does not."""
    head = model.get_output_embeddings()
    with torch.no_grad():
        reference = lm_loss(model, ids).item()
        loss = F.cross_entropy(head(final_hidden(model, ids)[0, :-1]).float(), ids[0, 1:]).item()
    return not abs(loss - reference) > 1e-4 * max(1.0, abs(reference))  # a NaN loss is reported later, by name


def _check_head(model: nn.Module, ids: torch.Tensor) -> None:
    if not head_is_last(model, ids):
        raise UnsupportedModelError(f"{type(model).__name__} transforms its logits after the output embedding; "
                                    "use the plain importance path")


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
    folds: int = 1,
) -> tuple[dict[str, TaylorTerms], list[dict[str, TaylorTerms]]]:
    """Step 3 for one layer: its group terms (none if it is not pruned), those of each fold alone when `folds` > 1
    (`Statistics.fold_taylor`), and the upstream gradient below it."""
    with resident(layer):
        device = execution_device(layer)
        params = {s.param: layer.get_parameter(s.param) for spec in specs for s in spec.slices}
        sums = {key: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for key, p in params.items()}
        squares = {key: torch.zeros_like(value) for key, value in sums.items()}
        fold_moments = [({key: torch.zeros_like(v) for key, v in sums.items()},
                         {key: torch.zeros_like(v) for key, v in sums.items()})
                        for _ in range(folds if folds > 1 else 0)]
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
                tables = [(sums, squares)] + ([fold_moments[fold_of(sample, folds)]] if fold_moments else [])
                for key, grad in zip(params, grads[len(grads) - len(params):]):
                    if grad is not None:
                        grad = grad.float()
                        for table_sums, table_squares in tables:
                            table_sums[key].add_(grad)
                            table_squares[key].addcmul_(grad, grad)
                bar.update()
        finally:
            for param in params.values():
                param.requires_grad_(False)
        for key in params:
            check_finite(f"{name}.{key}", sums[key], params[key].dtype)
        weights = {key: param.detach().float() for key, param in params.items()}

        def terms(table_sums: dict, table_squares: dict, count: int) -> dict[str, TaylorTerms]:
            for key in params:
                table_sums[key] /= count
                table_squares[key] /= count
            return {spec.kind: taylor_terms(spec, ((s, weights[s.param], table_sums[s.param], table_squares[s.param])
                                                   for s in spec.slices))
                    for spec in specs}

        sizes = fold_sizes(len(calls), folds)
        return terms(sums, squares, len(calls)), [terms(*moments, size) for moments, size in zip(fold_moments, sizes)]


