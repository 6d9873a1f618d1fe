import pytest

from hywia.data.text import (BUILTIN_TEXTS, CALIBRATION_SOURCES, DIALOGUE_CONVERSATIONS, HELDOUT_PASSAGES,
                             WIKI_HELDOUT_PASSAGES, calibration_source, heldout_passages)
from hywia.errors import CalibrationError


@pytest.mark.parametrize("name", sorted(BUILTIN_TEXTS))
def test_every_builtin_text_loads_distinct_passages(name):
    description, passages = heldout_passages(name)
    assert description and passages
    assert all(p.strip() for p in passages)
    assert len(set(passages)) == len(passages)


@pytest.mark.parametrize("source, held_out", [("lambada", HELDOUT_PASSAGES), ("wiki", WIKI_HELDOUT_PASSAGES)])
def test_calibration_sources_never_share_a_passage_with_their_held_out_part(source, held_out):
    _, calibration = calibration_source(source)
    _, evaluation = heldout_passages(source)
    assert len(evaluation) == held_out
    assert not set(calibration) & set(evaluation)


def test_no_held_out_text_shares_a_passage_with_a_calibration_source():
    calibration = {p for source in CALIBRATION_SOURCES for p in calibration_source(source)[1]}
    for name in BUILTIN_TEXTS:
        assert not calibration & set(heldout_passages(name)[1]), name


def test_mix_is_half_fiction_half_wikipedia_and_no_evaluation_passage(tiny_tokenizer):
    """The mix source: LAMBADA's calibration part and SQuAD's Wikipedia paragraphs in equal characters; none of
    it is a BoolQ passage (a zero-shot task) or held-out text."""
    from hywia.data.text import boolq_passages, calibration_windows, squad_passages

    _, mixed = calibration_source("mix")
    fiction = set(calibration_source("lambada")[1])
    wikipedia = [p for p in mixed if p not in fiction]
    assert wikipedia == squad_passages() and len(wikipedia) > 500
    share = sum(map(len, wikipedia)) / sum(map(len, mixed))
    assert 0.45 < share < 0.55
    assert not set(mixed) & set(boolq_passages())
    assert calibration_windows(tiny_tokenizer, mixed, 4, 32, seed=0).shape == (4, 32)


def test_dialogue_is_mostly_latin_conversations_with_both_roles():
    _, conversations = heldout_passages("dialogue")
    assert 0.9 * DIALOGUE_CONVERSATIONS <= len(conversations) <= DIALOGUE_CONVERSATIONS
    assert all(c.startswith(("User: ", "System: ")) for c in conversations)
    assert sum("\nAssistant: " in c for c in conversations) >= 0.9 * len(conversations)
    assert all(sum(ch.isascii() for ch in c) >= 0.95 * len(c) for c in conversations)


def test_default_calibration_source_is_the_models_own_old_recipes_keep_lambada_and_files_still_work(tmp_path):
    from hywia.settings import CalibrationConfig

    assert CalibrationConfig().calib == "self"
    assert calibration_source(None) == calibration_source("lambada")  # a recipe written before mix was the default
    text = tmp_path / "calib.txt"
    text.write_text("first passage\n\nsecond passage\n")
    assert calibration_source(text) == (str(text), ["first passage", "second passage"])
    with pytest.raises(CalibrationError):
        calibration_source(tmp_path / "missing.txt")
