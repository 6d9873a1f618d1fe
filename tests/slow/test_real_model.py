"""The real embedded model (SmolLM2-135M-Instruct, 4-bit-grid weights): prune, reload, generate."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hywia import prune

pytestmark = pytest.mark.slow


def test_prune_default_model_reloads_and_generates(tmp_path):
    out = tmp_path / "pruned"
    result = prune(None, ratio=0.2, calib_samples=16, ppl_tokens=2048, out=out, progress=False)
    report = json.loads((out / "report.json").read_text())
    assert abs(report["ratio_achieved"] - 0.2) < 0.01
    assert torch.isfinite(torch.tensor(report["ppl_after"])) and report["ppl_after"] > report["ppl_before"] * 0.9
    assert report["params_before"] == 134_515_008
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, result.model(ids).logits, atol=0, rtol=0)
    text = tokenizer.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:])
    assert len(text.strip()) > 0
