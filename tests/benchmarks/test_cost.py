"""The cost benchmark: one measured pass per path on a tiny model, and the summary's ratios and goals."""

import pytest

from conftest import TINY_TEXT, build_tiny_model
from benchmarks.harness.cost import main, measure_step, render_markdown, summarise


def test_measure_step_on_a_tiny_model(tiny_tokenizer, tmp_path):
    folder = tmp_path / "model"
    build_tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    (tmp_path / "calib.txt").write_text("\n\n".join([TINY_TEXT] * 6))
    calib = str(tmp_path / "calib.txt")
    results = [measure_step(str(folder), path, "auto", 3, 32, "0:4", "float32", "cpu", 0, calib)
               for path in ("plain", "layerwise")]
    for result in results:
        assert result["added_mb"] > -5 and result["seconds"] > 0  # a tiny model: RSS noise only and result["memory"] == "RSS"
        weights_mb = build_tiny_model("llama").num_parameters() * 4 / 2**20
        assert result["weights_mb"] == pytest.approx(weights_mb, abs=0.05)
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-6)


def _run(label, samples, added, seconds, cpu):
    return {"label": label, "samples": samples, "added_mb": added, "weights_mb": 500.0, "seconds": seconds,
            "cpu_seconds": cpu, "memory": "RSS"}


def test_summary_ratios_and_goals():
    runs = [_run("plain", 64, 1200, 100, 90), _run("layerwise", 64, 100, 120, 80),
            _run("layerwise, memory store", 64, 600, 110, 85), _run("plain", 256, 1250, 400, 360),
            _run("layerwise", 256, 110, 480, 320), _run("layerwise, memory store", 256, 2000, 450, 330)]
    rows = summarise(runs, 64)
    light = next(r for r in rows if r["label"] == "layerwise" and r["samples"] == 64)
    assert light["added_vs_weights"] == 0.2 and light["plain_vs_added"] == 12.0
    assert light["seconds_vs_plain"] == 1.2 and light["cpu_seconds_vs_plain"] == pytest.approx(0.889, abs=1e-3)
    assert all(light["goals"].values())
    assert sum("goals" in r for r in rows) == 1
    table = render_markdown({"model": "m", "dtype": "float32", "seq_len": 128, "calib": "c", "summary": rows,
                             "runs": runs})
    assert table.count("\n| layerwise |") == 2 and "NOT met" not in table


def test_cost_script_measures_both_paths_at_both_sizes(tiny_tokenizer, tmp_path, capsys):
    import json

    folder = tmp_path / "model"
    build_tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    (tmp_path / "calib.txt").write_text("\n\n".join([TINY_TEXT] * 6))
    out = tmp_path / "cost"
    assert main(["--model", str(folder), "--calib", str(tmp_path / "calib.txt"), "--calib-samples", "2",
                 "--scale", "2", "--seq-len", "16", "--layers", "0:4", "--device", "cpu", "--out-dir", str(out)]) == 0
    result = json.loads((out / "cost.json").read_text())
    assert {(row["label"], row["samples"]) for row in result["summary"]} == {
        (label, n) for label in ("plain", "layerwise", "layerwise, memory store") for n in (2, 4)}
    assert "| layerwise | 2 |" in (out / "cost.md").read_text() and "Goals" in capsys.readouterr().out
