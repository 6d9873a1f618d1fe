import json

import pytest

from hywia.cli import main


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["prune", "--ratio", "1.5", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ratio" in err[0]
    assert main(["prune", "--ratio", "0.2", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_requires_ratio_and_out():
    with pytest.raises(SystemExit):
        main(["prune"])


@pytest.fixture
def calib_text(tmp_path):
    from conftest import TINY_TEXT

    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join([TINY_TEXT] * 6), encoding="utf-8")
    return path


def _one_line_error(capsys) -> str:
    """The error line, checked to be the only one (transformers' progress bars may precede it) with no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(lines) == 1 and lines[0].startswith("hywia: error: ") and err.rstrip().endswith(lines[0]), err
    return lines[0]


@pytest.mark.parametrize("content, name, expected", [
    ("Caf\u00e9\n".encode("latin-1"), "calib.txt", "not UTF-8 text (byte 0xe9 at offset 3, line 1)"),
    ("text".encode("utf-16"), "calib.txt", "not UTF-8 text (byte 0xff at offset 0, line 1)"),
    (b'{"text": null}\n', "calib.jsonl", 'line 1: expected a {"text": "..."} object with non-empty text'),
    (b'{"text": "ok"}', "calib.json", "expected a JSON array"),
    (b"some text", "calib.csv", "unsupported text file type '.csv'"),
])
def test_bad_calibration_text_is_refused_before_the_model_loads(tmp_path, capsys, content, name, expected):
    calib = tmp_path / name
    calib.write_bytes(content)
    argv = ["prune", "--model", str(tmp_path / "missing"), "--ratio", "0.2", "--calib", str(calib),
            "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert expected in _one_line_error(capsys)  # the text's error, not the missing model's
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--seq-len", "4"], "--seq-len must be at least 8"),
    (["--calib-samples", "0"], "--calib-samples must be at least 1"),
    (["--ppl-text", "nonexistent.txt"], "neither a built-in text"),
])
def test_bad_window_flags_are_refused_before_the_model_loads(tmp_path, capsys, calib_text, flags, expected):
    argv = ["prune", "--model", str(tmp_path / "missing"), "--ratio", "0.2", "--calib", str(calib_text),
            "--seq-len", "32", "--out", str(tmp_path / "o"), *flags]
    assert main(argv) == 2
    assert expected in _one_line_error(capsys)


@pytest.mark.parametrize("flags, expected", [
    (["--ppl-tokens", "16"], "--ppl-tokens 16 gives no window of --seq-len 32"),
    (["--seq-len", "2"], "--seq-len must be at least 8"),
])
def test_bad_eval_window_flags_are_refused_before_the_model_loads(tmp_path, capsys, calib_text, flags, expected):
    argv = ["eval", "--model", str(tmp_path / "missing"), "--ppl-text", str(calib_text), "--tasks", "none",
            "--seq-len", "32", *flags]
    assert main(argv) == 2
    assert expected in _one_line_error(capsys)


@pytest.mark.parametrize("flags, expected", [
    (["--seq-len", "512"], "--seq-len 512 exceeds the model's 256 positions"),
    (["--layers", "1"], "--layers must look like A:B"),
    (["--layers", "0:99"], "bound 99 is outside the model's 4 layers"),
    (["--layers=-5:"], "bound -5 is outside the model's 4 layers"),
    (["--layers", "3:1"], "selects no layer of the model's 4 layers"),
    (["--round-to", "128"], "--round-to 128 is not below the MLP width of layer 0 (96 channels)"),
    (["--ratio", "0.6"], "cannot be reached with --allocation global"),
    (["--ratio", "0.6", "--allocation", "search"], "every pruned layer keeps 25% of its heads and channels"),
    (["--ratio", "0.7", "--layers", "1:3", "--allocation", "uniform"], "would empty the pruned layers"),
])
def test_flags_that_do_not_fit_the_model_are_refused_before_calibration(
    tiny_folder, calib_text, tmp_path, capsys, monkeypatch, flags, expected
):
    import hywia.pipeline

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration started")

    monkeypatch.setattr(hywia.pipeline, "calibration_windows", no_calibration)
    argv = ["prune", "--model", str(tiny_folder), "--ratio", "0.3", "--calib", str(calib_text), "--calib-samples",
            "4", "--seq-len", "32", "--layers", "0:4", "--ppl-text", "none", "--out", str(tmp_path / "o"), *flags]
    assert main(argv) == 2
    assert expected in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_json_calibration_and_perplexity_texts_work_end_to_end(tiny_folder, tmp_path, capsys):
    from conftest import TINY_TEXT

    texts = tmp_path / "texts.JSON"
    texts.write_text(json.dumps([TINY_TEXT] * 3 + [{"text": TINY_TEXT}] * 3), encoding="utf-8")
    argv = ["prune", "--model", str(tiny_folder), "--ratio", "0.2", "--criterion", "magnitude", "--calib",
            str(texts), "--calib-samples", "4", "--seq-len", "32", "--layers", "0:4", "--ppl-text", str(texts),
            "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["ppl_text"]["tokens"] >= 4 * 32 and report["calibration"]["text"] == str(texts)


def test_eval_refuses_bad_perplexity_text_before_loading_and_long_windows_after(tiny_folder, tmp_path, capsys):
    bad = tmp_path / "heldout.txt"
    bad.write_bytes(b"fine\n\xc3(")
    assert main(["eval", "--model", str(tmp_path / "missing"), "--ppl-text", str(bad), "--tasks", "none"]) == 2
    assert "heldout.txt: not UTF-8 text (byte 0xc3 at offset 5, line 2)" in _one_line_error(capsys)
    bad.write_text("fine text", encoding="utf-8")
    argv = ["eval", "--model", str(tiny_folder), "--ppl-text", str(bad), "--tasks", "none", "--seq-len", "300",
            "--ppl-tokens", "300"]
    assert main(argv) == 2
    assert "--seq-len 300 exceeds the model's 256 positions" in _one_line_error(capsys)


@pytest.mark.parametrize("flags, message", [
    (["--criterion", "hywia:8"], "give settings as key=value"),
    (["--allocation", "global:floor=2"], "floor must lie in"),
    (["--allocation", "global:attention_weight=0"], "attention_weight must be > 0"),
    (["--allocation", "search:survivors=9"], "survivors (9) cannot exceed offspring (8)"),
    (["--allocation", "search:attention_weight=-1"], "attention_weight must be > 0"),
    (["--compensate", "lstsq:ridge=x"], "ridge must be float"),
    (["--compensate", "lstsq:holdout=1"], "holdout must lie in [0, 1)"),
    (["--compensate", "lstsq:decades=-1"], "decades must be >= 0"),
    (["--seed", "one"], "seed must be int"),
    (["--recipe", "missing.json"], "cannot read recipe"),
])
def test_cli_refuses_bad_settings_in_one_line(tmp_path, capsys, flags, message):
    assert main(["prune", "--ratio", "0.2", *flags, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "o").exists()


def test_cli_needs_a_ratio_unless_the_recipe_has_one(tmp_path, capsys):
    assert main(["prune", "--out", str(tmp_path / "o")]) == 2
    assert "--ratio is required" in capsys.readouterr().err


def test_attention_none_prunes_mlp_channels_only_with_the_default_criterion(tiny_folder, calib_text, tmp_path):
    argv = ["prune", "--model", str(tiny_folder), "--ratio", "0.2", "--attention", "none", "--criterion",
            "hywia:steps=2", "--calib", str(calib_text), "--calib-samples", "4", "--seq-len", "32", "--layers", "0:4",
            "--ppl-text", "none", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    dense = json.loads((tiny_folder / "config.json").read_text())
    assert all(w["num_attention_heads"] == dense["num_attention_heads"] for w in report["layers"])
    assert abs(report["ratio_achieved"] - 0.2) <= 0.01
    assert json.loads((tmp_path / "o" / "plan.json").read_text())["attention"] == "none"


def test_validated_fusion_reports_its_choice(tiny_folder, calib_text, tmp_path, capsys):
    argv = ["prune", "--model", str(tiny_folder), "--ratio", "0.2", "--criterion", "hywia:steps=2:validate=0.5",
            "--calib", str(calib_text), "--calib-samples", "4", "--seq-len", "32", "--layers", "0:4",
            "--ppl-text", "none", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    fusion = json.loads((tmp_path / "o" / "report.json").read_text())["fusion"]
    assert fusion["held_out_windows"] == 2 and fusion["choice"] in fusion["held_out_loss"]
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("kept (held-out LM loss, 2 windows)"))
    assert line.split()[-2 * len(fusion["held_out_loss"]) - 1] == f"{fusion['choice']}:"


def test_cross_fitted_fusion_runs_end_to_end_and_says_so(tiny_folder, calib_text, tmp_path, capsys):
    argv = ["prune", "--model", str(tiny_folder), "--ratio", "0.2", "--criterion", "hywia:steps=2:crossfit=true",
            "--calib", str(calib_text), "--calib-samples", "4", "--seq-len", "32", "--layers", "0:4",
            "--ppl-text", "none", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    assert json.loads((tmp_path / "o" / "report.json").read_text())["fusion"]["crossfit"] is True
    assert any(line.startswith("blend, mean alpha (learned in 2 steps, cross-fitted)")
               for line in capsys.readouterr().out.splitlines())
    argv[argv.index("--calib-samples") + 1] = "1"
    argv[argv.index("--out") + 1] = str(tmp_path / "p")
    assert main(argv + ["--compensate", "bias"]) == 2
    assert "crossfit" in capsys.readouterr().err and not (tmp_path / "p").exists()


def test_profile_search_runs_end_to_end_and_its_recipe_repeats_it(tiny_folder, calib_text, tmp_path):
    """`--allocation search` through the CLI: the share requested, the search recorded in the report, and the
    saved recipe (every search setting written out) prunes to the same plan."""
    argv = ["prune", "--model", str(tiny_folder), "--ratio", "0.3", "--criterion", "magnitude", "--allocation",
            "search:generations=4:windows=2", "--calib", str(calib_text), "--calib-samples", "4", "--seq-len",
            "32", "--layers", "0:4", "--ppl-text", "none", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert abs(report["ratio_achieved"] - 0.3) <= 0.01
    assert report["profile_search"]["kl"] <= report["profile_search"]["start_kl"]
    recipe = json.loads((tmp_path / "o" / "recipe.json").read_text())
    assert recipe["prune"]["allocation"].startswith("search:floor=0.25:attention_weight=16.0:generations=4:")
    again = ["prune", "--model", str(tiny_folder), "--recipe", str(tmp_path / "o" / "recipe.json"), "--out",
             str(tmp_path / "again")]
    assert main(again) == 0
    assert (tmp_path / "again" / "plan.json").read_text() == (tmp_path / "o" / "plan.json").read_text()


def test_slimgpt_recipe_runs_end_to_end(tiny_folder, calib_text, tmp_path):
    argv = ["prune", "--model", str(tiny_folder), "--ratio", "0.3", "--criterion", "obs", "--allocation", "log",
            "--calib", str(calib_text), "--calib-samples", "4", "--seq-len", "32", "--layers", "0:4",
            "--ppl-text", "none", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert abs(report["ratio_achieved"] - 0.3) <= 0.01 and report["allocation"] == "log"
    widths = [layer["intermediate_size"] for layer in report["layers"][:4]]
    assert widths[0] >= widths[-1]
