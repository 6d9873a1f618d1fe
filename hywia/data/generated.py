"""Calibration windows the dense model writes itself (`--calib self`).

Ji et al., "Beware of Calibration Data for Pruning Large Language Models" (ICLR 2025), found that pruning keeps more
of a model calibrated on text close to its training data, and that when that data is out of reach the model's own
samples are such text. Here each window starts from the first `PREFIX_TOKENS` tokens of a window of the shipped
`mix` text and goes on with tokens sampled from the model at temperature 1 (no top-k or top-p). A quarter more
windows than asked are written; as in the paper, the ones the model itself finds least likely (highest perplexity)
are dropped. The sampling draws from its own seeded generator state, so the same seed gives the same windows and
the caller's random state is left as it was. The samples follow the model's numerics: on another device or dtype the
same seed may draw other tokens, so a recipe replayed there calibrates on windows of the same kind, not the same ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig

from .text import calibration_source, calibration_windows

PREFIX_SOURCE = "mix"  # the shipped text whose windows' first tokens start the samples
PREFIX_TOKENS = 8
DROPPED_SHARE = 0.2
GENERATION_BATCH = 16


def prefix_windows_needed(n_samples: int) -> int:
    """How many windows to write for `n_samples` kept once the least likely `DROPPED_SHARE` is dropped."""
    return math.ceil(n_samples / (1 - DROPPED_SHARE))


def generation_steps(n_samples: int, seq_len: int) -> int:
    """How many decoding steps writing `n_samples` kept windows of `seq_len` tokens takes: one per new token of
    each batch. With offloaded layers each step streams them all once."""
    return math.ceil(prefix_windows_needed(n_samples) / GENERATION_BATCH) * (seq_len - PREFIX_TOKENS)


def self_calibration_windows(model: nn.Module, tokenizer, n_samples: int, seq_len: int, seed: int,
                             progress: bool = False, device: torch.device | None = None) -> torch.Tensor:
    """The `self` source's `n_samples` windows: prefixes from `PREFIX_SOURCE`'s windows (drawn by `seed`),
    continued by `model` (`generated_windows`)."""
    _, passages = calibration_source(PREFIX_SOURCE)
    prefixes = calibration_windows(tokenizer, passages, prefix_windows_needed(n_samples), seq_len, seed)
    return generated_windows(model, tokenizer, prefixes[:, :PREFIX_TOKENS], n_samples, seq_len, seed, progress,
                             device)


def generated_windows(model: nn.Module, tokenizer, prefixes: torch.Tensor, n_samples: int, seq_len: int, seed: int,
                      progress: bool = False, device: torch.device | None = None) -> torch.Tensor:
    """`n_samples` windows [n_samples, seq_len] sampled from `model`, each continuing a row of `prefixes`
    [>= n_samples, PREFIX_TOKENS]; of all rows written, the `n_samples` with the lowest perplexity are kept, in
    the order written. `device`: where the model computes (an offloaded model's execution device; default: that of
    its first parameter)."""
    device = device or next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    written = []
    new = seq_len - prefixes.shape[1]
    # Every sampling setting spelled out, so that a model's own generation defaults (top-k, repetition penalty)
    # do not change what is sampled.
    sampling = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                                min_new_tokens=new, pad_token_id=tokenizer.eos_token_id or 0)
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for start in tqdm(range(0, prefixes.shape[0], GENERATION_BATCH), desc="writing calibration",
                          disable=not progress, leave=False):
            prefix = prefixes[start:start + GENERATION_BATCH].to(device)
            out = model.generate(prefix, attention_mask=torch.ones_like(prefix), generation_config=sampling)
            written.append(out.cpu())
    windows = torch.cat(written)
    nll = torch.tensor([_mean_nll(model, row[None].to(device)) for row in windows])
    kept = nll.argsort()[:n_samples].sort().values
    return windows[kept]


def _mean_nll(model: nn.Module, ids: torch.Tensor) -> float:
    """The model's mean next-token NLL over one window."""
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    return float(F.cross_entropy(logits, ids[0, 1:]))
