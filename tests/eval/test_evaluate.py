"""`hywia.evaluate` and `hywia eval`: perplexity as defined, the JSON record's fields, reproducible subsets."""

from __future__ import annotations

import json
import math

import pytest
import torch

import hywia
from conftest import TINY_TEXT
from hywia.cli import main
from hywia.data.text import token_stream, windows
from hywia.errors import InvalidRequestError
from hywia.eval.api import parse_tasks, parse_texts
from hywia.eval.perplexity import perplexity
from hywia.importance import layerwise


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "heldout.txt"
    path.write_text("\n\n".join([TINY_TEXT] * 4))
    return path


@pytest.fixture
def model(tiny_model_factory):
    model = tiny_model_factory("llama")
    # lm-eval refuses continuations longer than the window; the 300-token tokenizer makes some long (RoPE has no
    # hard limit, so a wider window is harmless).
    model.config.max_position_embeddings = 4096
    return model


@pytest.mark.parametrize("head", ["a few tokens at a time", "whole logits"])
def test_perplexity_equals_direct_computation_from_logits(model, tiny_tokenizer, head, monkeypatch):
    from hywia.eval import perplexity as module

    if head == "whole logits":  # as for a family that transforms its logits after the output embedding
        monkeypatch.setattr(module, "head_is_last", lambda model, ids: False)
    monkeypatch.setattr(layerwise, "HEAD_CHUNK_ELEMENTS", 300 * 7)  # 7 tokens a chunk: several per window
    batch = windows(token_stream(tiny_tokenizer, [TINY_TEXT] * 3), 16)
    assert batch.shape[0] >= 5  # several chunks of batch_size 2, the last one partial
    with torch.no_grad():
        logits = model(input_ids=batch).logits.double()
    logprobs = logits[:, :-1].log_softmax(-1).gather(-1, batch[:, 1:, None]).squeeze(-1)
    expected = math.exp(-logprobs.mean().item())
    assert math.isclose(perplexity(model, batch, batch_size=2), expected, rel_tol=1e-5)


def test_evaluate_record_has_versions_counts_and_texts(model, tiny_tokenizer, text_file):
    result = hywia.evaluate(model, tiny_tokenizer, ppl_texts=[str(text_file)], tasks="piqa,boolq", limit=3,
                            seq_len=32, ppl_tokens=200)

    assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert result["params"] == sum(p.numel() for p in model.parameters())
    assert {"cpu", "cores", "torch", "transformers", "lm_eval"} <= set(result["machine"])
    ppl = result["perplexity"][str(text_file)]
    assert ppl["tokens"] == 192 and ppl["windows"] == 6 and ppl["seq_len"] == 32  # 200 tokens -> 6 full windows
    assert ppl["description"] == str(text_file) and math.isfinite(ppl["ppl"]) and ppl["ppl"] > 1
    zero = result["zero_shot"]
    assert zero["lm_eval_version"] == result["machine"]["lm_eval"] and zero["limit"] == 3
    assert list(zero["tasks"]) == ["piqa", "boolq"]
    for row in zero["tasks"].values():
        assert row["n"] == 3 and row["version"] is not None and 0 <= row["acc"] <= 1
    assert zero["tasks"]["piqa"]["acc_norm"] is not None and zero["tasks"]["boolq"]["acc_norm"] is None
    # not the paper's seven: the average is over the tasks that ran, and says so
    assert zero["average_tasks"] == ["piqa", "boolq"] and zero["averages"] == {}
    assert math.isclose(zero["average_acc"], (zero["tasks"]["piqa"]["acc"] + zero["tasks"]["boolq"]["acc"]) / 2)


def test_eval_cli_on_a_folder_is_reproducible(model, tiny_tokenizer, text_file, tmp_path, capsys):
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    records = []
    for name in ("a.json", "b.json"):
        argv = ["eval", "--model", str(folder), "--ppl-text", str(text_file), "--tasks", "winogrande",
                "--limit", "4", "--seed", "3", "--seq-len", "32", "--ppl-tokens", "256", "--out", str(tmp_path / name)]
        assert main(argv) == 0
        records.append(json.loads((tmp_path / name).read_text()))
    table = capsys.readouterr().out
    assert "winogrande" in table and "perplexity" in table
    for record in records:
        record.pop("seconds")
        record.pop("cpu_seconds")
        record["zero_shot"].pop("seconds")
        for row in record["perplexity"].values():
            row.pop("seconds")
    assert records[0] == records[1]
    assert records[0]["zero_shot"]["tasks"]["winogrande"]["n"] == 4


def test_task_and_text_lists():
    assert parse_tasks("all")[:2] == ["boolq", "piqa"] and len(parse_tasks("all")) == 8
    assert parse_tasks("paper") == parse_tasks("all")[:7] and parse_tasks("paper,lambada") == parse_tasks("all")
    assert parse_tasks("piqa,separating") == ["piqa", "hellaswag", "arc_easy", "lambada"]  # each task once
    assert parse_tasks("none") == [] and parse_tasks(["piqa,boolq", "hellaswag"]) == ["piqa", "boolq", "hellaswag"]
    assert parse_texts(["lambada,coqa"]) == ["lambada", "coqa"] and parse_texts("none") == []
    with pytest.raises(InvalidRequestError, match="unknown task"):
        parse_tasks("piqa,mmlu")
    assert main(["eval", "--tasks", "mmlu", "--ppl-text", "none", "--model", "/nonexistent/x"]) == 2


def test_a_text_shorter_than_one_window_is_refused(model, tiny_tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    with pytest.raises(InvalidRequestError, match="no window"):
        hywia.evaluate(model, tiny_tokenizer, ppl_texts=str(short), tasks="none", seq_len=128)
