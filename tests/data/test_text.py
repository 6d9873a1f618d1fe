"""Reading calibration and perplexity text: strict UTF-8, the three formats, and window-size checks."""

import json

import pytest
from transformers import LlamaConfig

from hywia.data.text import (
    check_seq_len_fits,
    check_text_request,
    check_window_sizes,
    model_positions,
    read_text_file,
)
from hywia.errors import CalibrationError, InvalidRequestError


def test_txt_passages_split_on_blank_lines_with_any_newline_and_a_bom(tmp_path):
    path = tmp_path / "calib.TXT"
    path.write_bytes(b"\xef\xbb\xbfFirst passage,\r\nstill first.\r\n\r\nSecond \xc3\xa9t\xc3\xa9.\n\n\n")
    assert read_text_file(path) == ["First passage,\nstill first.", "Second \u00e9t\u00e9."]


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16", "utf-16-le"])
def test_text_in_another_encoding_is_refused_with_offset_and_line(tmp_path, encoding):
    path = tmp_path / "calib.txt"
    path.write_bytes("Line one.\nCaf\u00e9 au lait.".encode(encoding))
    with pytest.raises(CalibrationError, match=r"not UTF-8 text \(byte 0x[0-9a-f]{2} at offset \d+, line \d\)"):
        read_text_file(path)


def test_the_first_bad_byte_is_located(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_bytes(b"\xef\xbb\xbfgood\nalso good\nbad \xff here\n")
    with pytest.raises(CalibrationError, match=r"byte 0xff at offset 22, line 3\)"):
        read_text_file(path)


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CalibrationError, match="not UTF-8 text"):
        read_text_file(path)


def test_jsonl_needs_a_non_empty_text_string_on_every_line(tmp_path):
    path = tmp_path / "calib.JSONL"
    path.write_text('{"text": "one"}\r\n\n{"text": "two\u2028lines", "id": 2}\n', encoding="utf-8")
    assert read_text_file(path) == ["one", "two\u2028lines"]
    for line, shown in [('{"text": null}', '"text": null'), ('{"text": "  "}', '"text": "  "'),
                        ('{"text": 3}', '"text": 3'), ('{"body": "x"}', "an object without a 'text' field"),
                        ('"a bare string"', '"a bare string"'), ("[1, 2]", r"\[1, 2\]")]:
        path.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
        with pytest.raises(CalibrationError, match=f"line 2: .*got {shown}"):
            read_text_file(path)
    path.write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(CalibrationError, match="line 2: not valid JSON"):
        read_text_file(path)


def test_json_is_an_array_of_strings_or_of_text_objects(tmp_path):
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(["first", {"text": "second"}, "third"]), encoding="utf-8")
    assert read_text_file(path) == ["first", "second", "third"]
    path.write_text(json.dumps({"text": "an object, not an array"}), encoding="utf-8")
    with pytest.raises(CalibrationError, match="expected a JSON array.*got a JSON dict"):
        read_text_file(path)
    path.write_text(json.dumps(["fine", {"text": None}]), encoding="utf-8")
    with pytest.raises(CalibrationError, match='item 1: .*got "text": null'):
        read_text_file(path)
    path.write_text('["unterminated', encoding="utf-8")
    with pytest.raises(CalibrationError, match="line 1, column 2: not valid JSON"):
        read_text_file(path)
    path.write_text('["\\ud800 lone surrogate"]', encoding="utf-8")
    with pytest.raises(CalibrationError, match="item 0: .*unpaired surrogate"):
        read_text_file(path)
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(CalibrationError, match="empty"):
        read_text_file(path)


@pytest.mark.parametrize("name", ["calib.csv", "calib", "calib.txt.gz"])
def test_unknown_suffixes_are_refused_listing_the_supported_ones(tmp_path, name):
    path = tmp_path / name
    path.write_text("some text", encoding="utf-8")
    with pytest.raises(CalibrationError, match=r"unsupported text file type.*\.txt.*\.jsonl.*\.json"):
        read_text_file(path)


def test_missing_file_and_folder_are_refused(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        read_text_file(tmp_path / "missing.txt")
    (tmp_path / "folder.txt").mkdir()
    with pytest.raises(CalibrationError, match="not a file"):
        read_text_file(tmp_path / "folder.txt")


def test_window_sizes_are_refused_below_one_usable_window():
    check_window_sizes(8, calib_samples=1, ppl_tokens=8)
    with pytest.raises(InvalidRequestError, match="--seq-len must be at least 8"):
        check_window_sizes(4)
    with pytest.raises(InvalidRequestError, match="--calib-samples must be at least 1, got 0"):
        check_window_sizes(32, calib_samples=0)
    with pytest.raises(InvalidRequestError, match="--ppl-tokens 16 gives no window of --seq-len 32"):
        check_window_sizes(32, ppl_tokens=16)


def test_text_request_reads_both_files_and_skips_ppl_checks_without_a_text(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("a passage", encoding="utf-8")
    bad.write_bytes(b"\xfe\xff")
    check_text_request(good, 4, 32, str(good), 64)
    check_text_request(None, 4, 32, None, 0)  # no perplexity text: --ppl-tokens is unused
    for builtin in ("mix", "self"):  # built-in sources are never read as files of that name
        check_text_request(builtin, 4, 32, None, 0)
    with pytest.raises(CalibrationError, match="bad.txt: not UTF-8"):
        check_text_request(bad, 4, 32, None, 64)
    with pytest.raises(CalibrationError, match="bad.txt: not UTF-8"):
        check_text_request(good, 4, 32, str(bad), 64)
    with pytest.raises(CalibrationError, match="neither a built-in text .*lambada.* nor an existing file"):
        check_text_request(None, 4, 32, "wikitext", 64)


def test_seq_len_must_fit_the_model_positions():
    config = LlamaConfig(max_position_embeddings=64)
    assert model_positions(config) == 64
    check_seq_len_fits(config, 64)
    with pytest.raises(InvalidRequestError, match="--seq-len 65 exceeds the model's 64 positions"):
        check_seq_len_fits(config, 65)
