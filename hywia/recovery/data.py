"""Instruction data for LoRA recovery: conversations in, tokenized examples with the loss on responses only out.

Three sources share one path: the packaged ShareGPT V3 file (a JSON list cut off mid-record, so it is streamed record
by record and the broken tail is dropped), a user's Alpaca JSON/JSONL (instruction, input, output) and a user's chat
JSONL ({"messages": [{"role", "content"}]} or ShareGPT-style "conversations"). Every record becomes a list of
``{"role", "content"}`` messages; tokenization renders them with the tokenizer's chat template when it has one (else
an Alpaca-style template) and labels only the assistant turns, so recovery does not learn to imitate prompts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from hywia.data.assets import sharegpt_dir

IGNORE_INDEX = -100
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"

Message = dict[str, str]
Example = dict[str, list[int]]

# ShareGPT speakers seen in the V3 dump plus the OpenAI/Gemini names, mapped onto chat-template roles.
_ROLE_ALIASES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
_CHUNK_CHARS = 1 << 20
_SEPARATORS = re.compile(r"[\s,]*")


def iter_json_records(path: str | Path, *, tolerate_truncation: bool = False) -> Iterator[Any]:
    """Yield the records of a JSON list or a JSONL file one at a time, parsing only as far as the caller reads.

    With ``tolerate_truncation`` a JSON list cut off inside its last record ends quietly after the last complete
    record (the packaged ShareGPT file is shipped that way); otherwise broken JSON is a ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"instruction data file not found: {path}")
    with path.open(encoding="utf-8-sig") as fh:
        head = fh.read(_CHUNK_CHARS)
        start = _SEPARATORS.match(head).end()
        if start == len(head):
            raise ValueError(f"instruction data file is empty: {path}")
        if head[start] == "[":
            yield from _iter_json_array(fh, head, start + 1, path, tolerate_truncation)
        else:
            fh.seek(0)
            yield from _iter_jsonl(fh, path)


def _iter_json_array(fh: TextIO, buf: str, pos: int, path: Path, tolerate_truncation: bool) -> Iterator[Any]:
    """Stream the elements of a JSON list with raw_decode, refilling the buffer only when a record runs past it."""
    decoder = json.JSONDecoder()
    eof = False
    while True:
        pos = _SEPARATORS.match(buf, pos).end()
        if pos < len(buf) and buf[pos] == "]":
            return
        if pos < len(buf):
            try:
                record, pos = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as err:
                if eof:
                    if tolerate_truncation:
                        return
                    raise ValueError(f"{path}: invalid JSON near character {err.pos} of a record: {err.msg}") from None
            else:
                yield record
                continue
        elif eof:
            if tolerate_truncation:
                return
            raise ValueError(f"{path}: the JSON list is not closed (file truncated?)")
        # Read at least as much as is buffered so a record larger than a chunk costs amortised linear time.
        more = fh.read(max(_CHUNK_CHARS, len(buf) - pos))
        eof = not more
        buf, pos = buf[pos:] + more, 0


def _iter_jsonl(fh: TextIO, path: Path) -> Iterator[Any]:
    """One JSON value per non-blank line."""
    for lineno, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: invalid JSON line: {err.msg}") from None


def to_messages(record: Any, where: str = "record") -> list[Message]:
    """Turn one Alpaca, chat ("messages") or ShareGPT ("conversations") record into role/content messages."""
    if isinstance(record, dict):
        turns = record.get("messages", record.get("conversations"))
        if isinstance(turns, list):
            return [_to_message(turn, where) for turn in turns]
        if "instruction" in record and "output" in record:
            prompt = str(record["instruction"])
            if record.get("input"):
                prompt = f"{prompt}\n\n{record['input']}"
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(record["output"])}]
    raise ValueError(
        f"{where} has none of the known fields: 'messages', 'conversations', or 'instruction' + 'output'"
    )


def _to_message(turn: Any, where: str) -> Message:
    """A chat turn in either spelling ({"role", "content"} or ShareGPT's {"from", "value"})."""
    if not isinstance(turn, dict):
        raise ValueError(f"{where}: a turn is not an object: {turn!r:.80}")
    speaker = turn.get("role", turn.get("from"))
    content = turn.get("content", turn.get("value"))
    role = _ROLE_ALIASES.get(str(speaker).lower())
    if role is None:
        raise ValueError(f"{where}: unknown speaker {speaker!r} (known: {', '.join(sorted(_ROLE_ALIASES))})")
    if not isinstance(content, str):
        raise ValueError(f"{where}: turn content must be a string, got {type(content).__name__}")
    return {"role": role, "content": content}


def normalize(messages: list[Message]) -> list[Message]:
    """Shape a conversation the way chat templates expect: [system] user assistant user assistant ...

    Empty turns are dropped, a later system turn counts as user context, consecutive turns of one role are joined,
    and turns before the first user turn or after the last assistant turn are removed (nothing to learn from them).
    ShareGPT needs this: a third of its V3 records start with the assistant (continuations of split chats).
    """
    system = messages[0] if messages and messages[0]["role"] == "system" else None
    merged: list[Message] = []
    for message in messages[1:] if system else messages:
        if not message["content"].strip():
            continue
        role = "user" if message["role"] == "system" else message["role"]
        if not merged and role != "user":
            continue
        if merged and merged[-1]["role"] == role:
            merged[-1] = {"role": role, "content": f"{merged[-1]['content']}\n\n{message['content']}"}
        else:
            merged.append({"role": role, "content": message["content"]})
    while merged and merged[-1]["role"] != "assistant":
        merged.pop()
    if merged and system and system["content"].strip():
        merged.insert(0, {"role": "system", "content": system["content"]})
    return merged


def read_conversations(path: str | Path, *, max_records: int | None = None) -> list[list[Message]]:
    """A user's Alpaca JSON/JSONL or chat JSONL as normalized conversations (at most ``max_records`` of them)."""
    return _collect(iter_json_records(path), path, max_records)


def read_sharegpt(path: str | Path | None = None, *, max_records: int | None = None) -> list[list[Message]]:
    """Complete ShareGPT conversations, by default from the packaged V3 file (17,671 complete records)."""
    path = Path(path) if path is not None else sharegpt_dir() / SHAREGPT_FILE
    return _collect(iter_json_records(path, tolerate_truncation=True), path, max_records)


def _collect(records: Iterable[Any], path: str | Path, max_records: int | None) -> list[list[Message]]:
    """Convert records until ``max_records`` usable conversations are found, so parsing stops right there.

    Conversations left empty by normalization (no prompt or no response) are skipped; a record of unknown shape
    is an error.
    """
    if max_records is not None and max_records < 1:
        raise ValueError(f"max_records must be at least 1, got {max_records}")
    conversations: list[list[Message]] = []
    seen = 0
    for index, record in enumerate(records):
        seen += 1
        messages = normalize(to_messages(record, f"{path}: record {index}"))
        if messages:
            conversations.append(messages)
            if len(conversations) == max_records:
                break
    if not seen:
        raise ValueError(f"instruction data file holds no records: {path}")
    if not conversations:
        raise ValueError(f"{path}: no record has both a prompt and a non-empty response")
    return conversations


def tokenize_conversation(tokenizer: Any, messages: list[Message], cutoff_len: int) -> Example | None:
    """Token ids, attention mask and labels (-100 outside assistant turns) cut at ``cutoff_len`` tokens.

    Each turn is tokenized on its own so label boundaries fall exactly on turn boundaries. Returns None when
    truncation leaves no response token, since such an example would only add a zero-weight row to a batch.
    """
    if tokenizer.chat_template:
        segments = _chat_template_segments(tokenizer, messages, cutoff_len)
    else:
        segments = _alpaca_segments(tokenizer, messages, cutoff_len)
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, trained in segments:
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
    input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Ids of a text fragment; special tokens come from the template text itself, never added twice."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat_template_segments(tokenizer: Any, messages: list[Message], cutoff_len: int) -> list[tuple[list[int], bool]]:
    """Split the rendered chat into prompt and response pieces by rendering growing prefixes of the conversation.

    The text between "history + generation prompt" and "history + this assistant turn" is the response, including
    the template's end-of-turn marker so the model keeps learning to stop.
    """
    segments: list[tuple[list[int], bool]] = []
    rendered = ""
    length = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], generation_prompt=True)
        full = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not (prompt.startswith(rendered) and full.startswith(prompt)):
            raise ValueError(
                "the tokenizer's chat template does not render a conversation as an extension of its prefix; "
                "response-only labels cannot be placed (clear tokenizer.chat_template to use the Alpaca template)"
            )
        for text, trained in ((prompt[len(rendered) :], False), (full[len(prompt) :], True)):
            ids = _encode(tokenizer, text)
            segments.append((ids, trained))
            length += len(ids)
        rendered = full
        if length >= cutoff_len:
            break
    return segments


def _render(tokenizer: Any, messages: list[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _alpaca_segments(tokenizer: Any, messages: list[Message], cutoff_len: int) -> list[tuple[list[int], bool]]:
    """Alpaca-style prompts for tokenizers without a chat template; each response ends with EOS so it learns to stop."""
    has_system = messages[0]["role"] == "system"
    preamble = messages[0]["content"] if has_system else ALPACA_PREAMBLE
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    segments: list[tuple[list[int], bool]] = [(bos + _encode(tokenizer, preamble), False)]
    length = len(segments[0][0])
    for message in messages[1 if has_system else 0 :]:
        if message["role"] == "user":
            ids = _encode(tokenizer, f"\n\n### Instruction:\n{message['content']}\n\n### Response:\n")
            segments.append((ids, False))
        else:
            ids = _encode(tokenizer, message["content"]) + eos
            segments.append((ids, True))
        length += len(ids)
        if length >= cutoff_len:
            break
    return segments


def build_examples(tokenizer: Any, conversations: Iterable[list[Message]], cutoff_len: int = 256) -> list[Example]:
    """Tokenized training examples; conversations whose responses fall entirely past the cutoff are skipped."""
    if cutoff_len < 2:
        raise ValueError(f"cutoff_len must be at least 2, got {cutoff_len}")
    examples = [tokenize_conversation(tokenizer, messages, cutoff_len) for messages in conversations]
    kept = [example for example in examples if example is not None]
    if not kept:
        raise ValueError(f"no example keeps a response token within cutoff_len={cutoff_len}")
    return kept


def load_examples(
    tokenizer: Any, path: str | Path | None = None, *, cutoff_len: int = 256, max_records: int | None = None
) -> list[Example]:
    """Training examples from a user's file, or from the packaged ShareGPT conversations when ``path`` is None."""
    conversations = read_sharegpt(max_records=max_records) if path is None else read_conversations(
        path, max_records=max_records
    )
    return build_examples(tokenizer, conversations, cutoff_len)
