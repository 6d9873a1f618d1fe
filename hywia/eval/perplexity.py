"""Perplexity over non-overlapping windows, the convention of the LLM-Pruner and HyWIA papers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data.text import adds_bos, heldout_passages, token_stream, windows
from ..errors import InvalidRequestError


@torch.no_grad()
def perplexity(model: nn.Module, batches: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over every predicted position of every window [n, seq_len]."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    for start in range(0, batches.shape[0], batch_size):
        chunk = batches[start : start + batch_size].to(device)
        logits = model(input_ids=chunk, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += chunk[:, 1:].numel()
    model.train(was_training)
    return math.exp(total_nll / total_tokens)


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
