"""Perplexity over non-overlapping windows, the convention of the LLM-Pruner and HyWIA papers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data.text import adds_bos, heldout_passages, token_stream, windows
from ..errors import InvalidRequestError
from ..importance.layerwise import HEAD_CHECK_TOKENS, final_hidden, head_chunk_tokens, head_is_last


@torch.no_grad()
def perplexity(model: nn.Module, batches: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over every predicted position of every window [n, seq_len].

    Where the output embedding gives the logits as they are, it runs on chunks of tokens
    (`head_chunk_tokens`), so the vocabulary-wide logits of a batch (several times the weights of a small model)
    never exist at once."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    chunked = head_is_last(model, batches[:1, :HEAD_CHECK_TOKENS].to(device))
    for start in range(0, batches.shape[0], batch_size):
        chunk = batches[start : start + batch_size].to(device)
        total_nll += _chunked_nll(model, chunk) if chunked else _nll(model, chunk)
        total_tokens += chunk[:, 1:].numel()
    model.train(was_training)
    return math.exp(total_nll / total_tokens)


def _nll(model: nn.Module, ids: torch.Tensor) -> float:
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()


def _chunked_nll(model: nn.Module, ids: torch.Tensor) -> float:
    head = model.get_output_embeddings()
    final = final_hidden(model, ids)
    inputs, targets = final[:, :-1].reshape(-1, final.shape[-1]), ids[:, 1:].reshape(-1)
    step = head_chunk_tokens(head)
    return sum(F.cross_entropy(head(inputs[s:s + step]).float(), targets[s:s + step], reduction="sum").item()
               for s in range(0, targets.numel(), step))


def heldout_windows(tokenizer, text: str = "lambada", seq_len: int = 128, max_tokens: int = 16384) -> tuple[str, torch.Tensor]:
    """(description, windows) of a held-out text, capped at `max_tokens` tokens; refused when that gives no window
    (a perplexity over zero tokens is undefined)."""
    description, passages = heldout_passages(text)
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    out = windows(token_stream(tokenizer, passages, max_tokens=max_tokens), seq_len, bos)
    if out.shape[0] == 0:
        raise InvalidRequestError(f"perplexity text {text!r} gives no window of {seq_len} tokens "
                                  f"within its first {max_tokens} tokens")
    return description, out
