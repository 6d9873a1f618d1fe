"""ALiBi (Press et al., 2022) after head pruning, shared by Bloom and Baichuan-13B; torch only (folders carry it).

A head's slope is fixed by its index among the model's ORIGINAL heads, so a pruned layer must keep each surviving
head's own slope: recomputing slopes for the smaller head count would hand every head another head's distance
penalty. Each attention module therefore carries `alibi_heads`, the original indices of the heads it still has;
pruned configs store that list per layer and reloading restores it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

HEADS_ATTR = "alibi_heads"


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """The geometric slopes of `n_heads` heads: 2^(-8i/n) for a power of two n; otherwise those of the closest
    power of two followed by every other slope of the next power (the published recipe), float32."""
    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = _geometric(closest)
    if closest < n_heads:
        slopes = torch.cat([slopes, _geometric(2 * closest)[0::2][: n_heads - closest]])
    return slopes.float()


def _geometric(n: int) -> torch.Tensor:
    return 2.0 ** (-8.0 / n * torch.arange(1, n + 1, dtype=torch.float64))


def kept_heads(attention: nn.Module, n_heads: int) -> list[int]:
    """Original indices of the heads an attention module still has (all of them if it was never pruned)."""
    return list(getattr(attention, HEADS_ATTR, range(n_heads)))


def keep_heads(attention: nn.Module, n_heads: int, kept: torch.Tensor) -> None:
    """Record that only the current heads `kept` (sorted positions, not original indices) survive."""
    current = kept_heads(attention, n_heads)
    setattr(attention, HEADS_ATTR, [current[i] for i in kept.tolist()])


def select_heads(alibi: torch.Tensor, heads: list[int], n_total: int) -> torch.Tensor:
    """The rows of `heads` from a bias laid out [batch * n_total, ...] (Bloom's), as [batch * len(heads), ...]."""
    per_batch = alibi.view(-1, n_total, *alibi.shape[1:])
    index = torch.tensor(heads, device=alibi.device)
    return per_batch.index_select(1, index).reshape(-1, *alibi.shape[1:])


def alibi_bias(
    heads: list[int], n_total: int, kv_length: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive bias [1, len(heads), 1, kv_length]: slope * key position. Softmax ignores a per-row constant, so
    this equals slope * (key - query) on every unmasked entry."""
    slopes = alibi_slopes(n_total).to(device)[torch.tensor(heads, device=device)]
    positions = torch.arange(kv_length, device=device, dtype=torch.float32)
    return (slopes[:, None, None] * positions).to(dtype)[None]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A materialised attention mask (boolean: True = attend, or already additive) as an additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask.to(dtype)
