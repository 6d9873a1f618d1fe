"""`hywia bench` on a tiny model: every output is written, options reach `prune`, the dense model is untouched."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import hywia.bench
from conftest import TINY_TEXT
from hywia.bench.report import BEGIN, END, write_markdown
from hywia.bench.run import NO_AGREEMENT, check_options, parse_variant, peak_memory
from hywia.cli import _command_line, build_parser, main
from hywia.errors import InvalidRequestError

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join([TINY_TEXT] * 6))
    return path


def test_bench_writes_table_json_and_plots(tiny_model_factory, tiny_tokenizer, text_file, tmp_path):
    model = tiny_model_factory("llama", layers=4)
    model.config.max_position_embeddings = 4096  # lm-eval: see tests/eval/test_evaluate.py
    before = {name: value.clone() for name, value in model.state_dict().items()}
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\nHand-written intro.\n")

    record = hywia.bench.run(
        model, tiny_tokenizer, ratios=[0.2], criteria="hywia,taylor-element1@layers=1:3", tasks="piqa", limit=2,
        ppl_texts=[str(text_file)], ppl_tokens=256, seq_len=32, calib=text_file, calib_samples=4,
        prune_kwargs={"layers": "0:4"}, out_dir=tmp_path / "out", markdown=markdown,
        model_description="tiny random llama", command="hywia bench x", progress=False,
    )

    for name, value in model.state_dict().items():  # every run pruned a copy
        torch.testing.assert_close(value, before[name], atol=0, rtol=0)
    out = tmp_path / "out"
    for name in ("widths.png", "agreement.png", "alpha.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    saved = json.loads((out / "bench.json").read_text())
    assert saved["settings"]["criteria"] == ["hywia", "taylor-element1@layers=1:3"]
    assert [run["label"] for run in saved["runs"]] == saved["settings"]["criteria"]
    hywia_run, taylor_run = saved["runs"]
    assert taylor_run["options"] == {"layers": "1:3"} and taylor_run["report"]["layers_pruned"] == [1, 3]
    assert hywia_run["options"] == {"layers": "0:4"} and hywia_run["report"]["layers_pruned"] == [0, 4]
    assert hywia_run["report"]["fusion"]["per_layer"]
    for run in saved["runs"]:
        assert run["eval"]["params"] < saved["dense"]["params"]
        assert run["eval"]["zero_shot"]["tasks"]["piqa"]["n"] == 2
        assert run["memory"]["peak_rss_mb"] > 0 and run["prune_seconds"] > 0
    agreement = saved["granularity_agreement"]["per_layer"]
    assert {row["kind"] for row in agreement} == {"head", "mlp"}
    assert all(-1 <= row["element1_vs_vector"] <= 1 for row in agreement)
    assert record["seconds"] == saved["seconds"]

    table = (out / "bench.md").read_text()
    assert "| dense | 0 |" in table and "`taylor-element1@layers=1:3`" in table and "](widths.png)" in table
    assert "tiny random llama" in table and "`hywia bench x`" in table and "PIQA 2 (validation" in table
    assert "| `hywia` − best other `taylor-element1@layers=1:3` | 0.2 |" in table and "PIQA (n=2)" in table
    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nHand-written intro.") and "](out/agreement.png)" in text
    assert text.count(BEGIN) == 1 and text.count(END) == 1


def test_forward_only_benches_take_no_gradients(tiny_model_factory, tiny_tokenizer, text_file, tmp_path):
    """FLAP and Wanda-sp read activations only: their bench's calibration pass has no backward, and the rank
    agreement that would need one is marked skipped, not computed."""
    model = tiny_model_factory("llama", layers=4)
    model.config.max_position_embeddings = 4096
    record = hywia.bench.run(
        model, tiny_tokenizer, ratios=[0.2], criteria="flap,wanda-sp", tasks="none", ppl_texts=[str(text_file)],
        ppl_tokens=256, seq_len=32, calib=text_file, calib_samples=4, prune_kwargs={"layers": "0:4"},
        out_dir=tmp_path / "out", progress=False,
    )
    assert record["granularity_agreement"] == {"per_layer": [], "skipped": NO_AGREEMENT}
    assert not (tmp_path / "out" / "agreement.png").exists()
    assert all(run["report"]["ratio_achieved"] > 0 for run in record["runs"])


def test_the_benchs_pipelines_build_the_calibration_windows_once(tiny_model_factory, tiny_tokenizer, text_file,
                                                                  tmp_path, monkeypatch):
    """Runs with other attention modes calibrate in passes of their own, on the windows of the first pass: built
    once (`--calib self` samples them from the model)."""
    import hywia.pipeline

    built = []
    build = hywia.pipeline.calibration_windows
    monkeypatch.setattr(hywia.pipeline, "calibration_windows", lambda *a, **k: built.append(1) or build(*a, **k))
    model = tiny_model_factory("llama", layers=4)
    model.config.max_position_embeddings = 4096
    record = hywia.bench.run(
        model, tiny_tokenizer, ratios=[0.2], criteria="flap,flap@attention=none", tasks="none",
        ppl_texts=[str(text_file)], ppl_tokens=256, seq_len=32, calib=text_file, calib_samples=4,
        prune_kwargs={"layers": "0:4"}, out_dir=tmp_path / "out", progress=False,
    )
    assert len(record["calibration_passes"]) == 2 and len(built) == 1


def test_alpha_plot_shows_learned_blends_only(tmp_path):
    from hywia.bench.plots import plot_alpha

    per_layer = [{"layer": i, "kind": kind, "alpha": {"fine": 0.5, "coarse": 0.3, "fluctuation": 0.2}}
                 for i in range(3) for kind in ("head", "mlp")]
    run = {"label": "hywia:steps=2", "ratio": 0.2, "report": {"fusion": {"steps": 2, "per_layer": per_layer}}}
    equal = {"label": "hywia", "ratio": 0.2, "report": {"fusion": {"steps": 0, "per_layer": per_layer}}}
    assert plot_alpha({"runs": [equal]}, tmp_path / "none.png") is None
    assert plot_alpha({"runs": [equal, run]}, tmp_path / "alpha.png").read_bytes()[:8] == PNG


def test_markdown_section_is_replaced_not_duplicated(tmp_path):
    path = tmp_path / "B.md"
    write_markdown(path, f"{BEGIN}\nold\n{END}\n")
    path.write_text(path.read_text() + "\n## Speed\n\nkept\n")
    write_markdown(path, f"{BEGIN}\nnew\n{END}\n")
    text = path.read_text()
    assert "new" in text and "old" not in text and text.count(BEGIN) == 1 and text.endswith("## Speed\n\nkept\n")


def test_criteria_entries_carry_prune_options():
    variant = parse_variant("hywia@allocation=global@round_to=8@compensate=bias")
    assert variant.criterion == "hywia" and variant.label == "hywia@allocation=global@round_to=8@compensate=bias"
    assert variant.options == {"allocation": "global", "round_to": 8, "compensate": "bias"}
    assert parse_variant("fixed:0.5").options == {}
    check_options({"layers": "2:5", "attention": "kv"})
    with pytest.raises(InvalidRequestError, match="set by the bench"):
        check_options({"calib_samples": 8})
    with pytest.raises(InvalidRequestError, match="not an argument"):
        check_options({"no_such_option": 1})
    with pytest.raises(InvalidRequestError, match="KEY=VALUE"):
        parse_variant("hywia@allocation")


def test_recorded_command_reproduces_the_settings():
    parser = build_parser()
    args = parser.parse_args(["bench", "--ratios", "0.3", "--criteria", "magnitude,hywia@allocation=global",
                              "--limit", "none", "--ppl-text", "lambada", "--ppl-text", "coqa",
                              "--prune-option", "round_to=8"])
    command = _command_line(args)
    assert command.startswith("hywia bench ") and "--limit none" in command and "--calib-samples 64" in command
    import shlex

    again = parser.parse_args(shlex.split(command)[1:])
    assert {k: v for k, v in vars(again).items() if k != "command_parser"} == \
        {k: v for k, v in vars(args).items() if k != "command_parser"}


def test_peak_memory_is_measured_per_block():
    with peak_memory() as memory:
        block = torch.ones(64, 1024, 1024, dtype=torch.uint8)  # 64 MB
        del block
    assert memory["peak_rss_mb"] >= memory["rss_before_mb"] + 60 or memory["scope"] == "process"


def test_bench_cli_on_a_saved_folder(tiny_model_factory, tiny_tokenizer, text_file, tmp_path):
    folder = tmp_path / "tiny"
    tiny_model_factory("llama", layers=4).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    argv = ["bench", "--model", str(folder), "--ratios", "0.1", "--criteria", "magnitude", "--tasks", "none",
            "--ppl-text", str(text_file), "--ppl-tokens", "128", "--seq-len", "32", "--calib", str(text_file),
            "--calib-samples", "2", "--prune-option", "layers=0:4", "--out-dir", str(tmp_path / "out"),
            "--markdown", str(tmp_path / "B.md")]
    assert main(argv) == 0
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert saved["model"] == str(folder) and saved["runs"][0]["options"] == {"layers": "0:4"}
    assert saved["command"].startswith("hywia bench --model ") and "--prune-option layers=0:4" in saved["command"]
    assert "| `magnitude` | 0.1 (" in (tmp_path / "B.md").read_text()
    assert main(argv[:-2] + ["--criteria", "magnitude,no-such-criterion"]) == 2  # refused before any work


def test_bench_outputs_are_checked_before_loading(tmp_path, capsys):
    """A --out-dir that is a file or the model folder itself, or a --markdown that is the model, ends in one line
    before the model loads (bench writes its files into the folder and deletes nothing, so a parent is fine)."""
    model = tmp_path / "model"  # never loaded: the check comes first, so an empty folder will do
    model.mkdir()
    (tmp_path / "file").write_text("x")
    base = ["bench", "--model", str(model), "--tasks", "none"]
    assert main(base + ["--out-dir", str(tmp_path / "file")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert main(base + ["--out-dir", str(model)]) == 2
    assert "is also --model" in capsys.readouterr().err
    assert main(base + ["--out-dir", str(tmp_path / "out"), "--markdown", str(model)]) == 2
    assert "is also --model" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "model"]


def test_table_marks_the_in_domain_text_and_judges_on_the_others():
    """The calibration source's own held-out text is shown, marked, and left out of the geometric mean that picks
    the winner."""
    from hywia.bench.report import _table, _winners, cross_gm

    def evaluation(ppls):
        return {"params": 1e6, "zero_shot": None,
                "perplexity": {text: {"ppl": value} for text, value in ppls.items()}}

    texts = ["lambada", "wiki", "coqa"]
    record = {"settings": {"ppl_texts": texts, "tasks": [], "calibration": {"source": "lambada"}},
              "dense": evaluation({"lambada": 10.0, "wiki": 20.0, "coqa": 5.0}),
              "runs": [{"label": label, "ratio": 0.2, "prune_seconds": 1.0, "memory": {"peak_rss_mb": 1.0},
                        "report": {"ratio_achieved": 0.2}, "eval": evaluation(ppls)}
                       for label, ppls in [("fits-calibration", {"lambada": 11.0, "wiki": 80.0, "coqa": 20.0}),
                                           ("generalises", {"lambada": 30.0, "wiki": 40.0, "coqa": 10.0})]]}
    header = _table(record)[0]
    assert "ppl lambada (in-domain)" in header and header.rstrip(" |").endswith("peak MB")
    assert "cross gm" in header and "ppl wiki (in-domain)" not in header
    assert cross_gm(record["runs"][1]["eval"], ["wiki", "coqa"]) == pytest.approx(20.0)
    assert _winners(record) == ["- ratio 0.2: lowest cross-domain geometric-mean perplexity `generalises` (20.00)"]
    record["runs"][1]["eval"]["perplexity"]["coqa"]["ppl"] = float("nan")  # a diverged run never wins
    assert "`fits-calibration` (40.00)" in _winners(record)[0]
    record["settings"]["calibration"]["source"] = "mix"  # both genres of the mix are in-domain
    header = _table(record)[0]
    assert "ppl lambada (in-domain)" in header and "ppl wiki (in-domain)" in header and "cross gm" not in header


def _zero_shot(correct: dict[str, list[int]]) -> dict:
    """A zero-shot record of tasks with the given per-item correctness (acc_norm for PIQA, acc for LAMBADA)."""
    tasks = {}
    for task, items in correct.items():
        mean = sum(items) / len(items)
        norm = task != "lambada"
        tasks[task] = {"acc": mean, "acc_stderr": 0.1, "acc_norm": mean if norm else None,
                       "acc_norm_stderr": 0.1 if norm else None, "n": len(items), "split": "test", "version": 1,
                       "source": "s", "items": {"idx": list(range(len(items))), "acc": items,
                                                **({"acc_norm": items} if norm else {})}}
    average = sum(sum(items) / len(items) for items in correct.values()) / len(correct)
    return {"lm_eval_version": "x", "tasks": tasks, "average_acc": average, "average_acc_norm": average,
            "average_tasks": list(correct), "averages": {}}


def test_report_pairs_each_run_with_dense_and_the_default_with_the_best_other():
    from hywia.bench.report import render_markdown

    n = 40
    dense = {"piqa": [1] * 30 + [0] * 10, "lambada": [1] * 20 + [0] * 20}
    runs = {  # hywia loses 2 PIQA items and 10 LAMBADA items; "strong" loses 1 and 2; "weak" loses 20 and 20
        "hywia": {"piqa": [1] * 28 + [0] * 12, "lambada": [1] * 10 + [0] * 30},
        "strong": {"piqa": [1] * 29 + [0] * 11, "lambada": [1] * 18 + [0] * 22},
        "weak": {"piqa": [1] * 10 + [0] * 30, "lambada": [0] * n},
    }
    evaluation = lambda correct: {"params": 1e6, "perplexity": {}, "zero_shot": _zero_shot(correct)}  # noqa: E731
    record = {"model": "m", "machine": {"cpu": "c", "cores": 1, "torch_threads": 1, "torch": "t",
                                       "transformers": "t", "lm_eval": "l", "hywia": "h"},
              "settings": {"ppl_texts": [], "tasks": ["piqa", "lambada"], "limit": n, "seed": 0,
                           "calibration": {"text": "t", "source": "lambada", "samples": 1, "seq_len": 8, "seed": 0},
                           "prune_kwargs": {}},
              "dense": evaluation(dense),
              "runs": [{"label": label, "ratio": 0.5, "prune_seconds": 1.0, "memory": {"peak_rss_mb": 1.0},
                        "report": {"ratio_achieved": 0.5}, "eval": evaluation(correct)}
                       for label, correct in runs.items()]}

    text = render_markdown(record, Path("."))

    assert "| comparison | ratio | PIQA (n=40) | LAMBADA (n=40) | average (2 tasks) |" in text
    # hywia - dense on LAMBADA: 10 of 40 items lost, per-item differences -1 (10x) and 0 (30x)
    lost = [-1] * 10 + [0] * 30
    stderr = math.sqrt(sum((d + 0.25) ** 2 for d in lost) / 39 / 40)
    assert f"| `hywia` − dense | 0.5 | -5.0 ± 3.5 | **-25.0 ± {100 * stderr:.1f}** |" in text
    assert "| `weak` − dense | 0.5 | **-50.0 ± 8.0** | **-50.0 ± 8.0** | **-50.0 ± 5.7** |" in text
    # the best other run by average is "strong": hywia loses 1 more PIQA item and 8 more LAMBADA items than it
    assert "| `hywia` − best other `strong` | 0.5 | -2.5 ± 2.5 | **-20.0 ± 6.4** | **-11.2 ± 3.4** |" in text
    assert text.count("− dense |") == 3 and text.count("− best other") == 1
    assert "is resolvable; smaller ones are noise." in text

    for row in [record["dense"], *(run["eval"] for run in record["runs"])]:  # a bench from before per-item results
        for task in row["zero_shot"]["tasks"].values():
            task.pop("items")
    old = render_markdown(record, Path("."))
    assert "Paired accuracy differences" not in old and "| `strong` | 0.5 (0.500) |" in old
    assert "smaller differences are noise." in old


def test_report_ranks_by_the_separating_average_and_shows_it_beside_the_headline():
    from hywia.bench.report import _paired_table, _table, _winners

    def evaluation(correct: dict[str, list[int]], separating: float) -> dict:
        zero = _zero_shot(correct)
        zero["average_tasks"] = ["piqa"]  # stands in for the paper's seven: LAMBADA is not in the headline
        zero["averages"] = {"separating": {"tasks": ["piqa", "lambada"], "acc": separating, "acc_norm": separating}}
        return {"params": 1e6, "perplexity": {}, "zero_shot": zero}

    same = {"piqa": [1, 0, 1, 0], "lambada": [1, 1, 0, 0]}
    record = {"settings": {"ppl_texts": [], "tasks": ["piqa", "lambada"], "calibration": {"source": "lambada"}},
              "dense": evaluation(same, 0.5),
              "runs": [{"label": label, "ratio": 0.2, "prune_seconds": 1.0, "memory": {"peak_rss_mb": 1.0},
                        "report": {"ratio_achieved": 0.2}, "eval": evaluation(same, value)}
                       for label, value in [("hywia", 0.4), ("low", 0.3), ("high", 0.6)]]}

    header = _table(record)[0]
    assert header.endswith("| average | separating average | prune s | peak MB |")
    assert "| `hywia` | 0.2 (0.200) | 1.0M | 50.0 | 50.0 | 50.0 | 40.0 |" in _table(record)[3]
    assert _winners(record) == ["- ratio 0.2: best separating average accuracy `high` (60.0)"]
    paired = "\n".join(_paired_table(record))
    assert "| `hywia` − best other `high` | 0.2 |" in paired and "separating average (2 tasks) |" in paired


def test_report_gives_every_stage_its_seconds_and_peak():
    from hywia.bench.report import _stage_table

    stage = {"seconds": 2.0, "cpu_seconds": 1.5, "peak_rss_mb": 900.0}
    record = {"calibration_passes": [{"samples": 8, "layers": None, "seconds": 5.0, "peak_rss_mb": 800.0}],
              "runs": [{"label": "hywia", "ratio": 0.2,
                        "report": {"stages": {"score": stage, "plan": stage, "compensate": stage, "cut": stage}}}]}
    lines = _stage_table(record)
    assert lines[2] == "| run | ratio | calibrate | score | plan | compensate | cut |"
    assert lines[4].startswith("| calibration pass (8 windows, layers default) |  | 5.0 s / 800 MB |")
    assert lines[5] == "| `hywia` | 0.2 |  | " + " | ".join(["2.0 s (1.5 CPU s) / 900 MB"] * 4) + " |"
