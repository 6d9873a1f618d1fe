"""The cross-domain summary judges every bench on the texts foreign to all of their calibration sources."""

import math

from benchmarks.crossdomain_summary import foreign_texts, render, summarise


def _record(source: str, runs: dict[str, dict[str, float]]) -> dict:
    texts = ["lambada", "wiki", "coqa", "pydoc"]

    def evaluation(ppl: dict[str, float]) -> dict:
        return {"params": 1e6, "zero_shot": None, "perplexity": {t: {"ppl": v} for t, v in ppl.items()}}

    return {"settings": {"ppl_texts": texts, "tasks": [], "calibration": {"source": source, "samples": 64, "seq_len": 128, "text": source}},
            "dense": evaluation(dict.fromkeys(texts, 10.0)),
            "runs": [{"label": label, "ratio": 0.2, "prune_seconds": 1.0, "memory": {"peak_rss_mb": 1.0},
                      "report": {"ratio_achieved": 0.2}, "eval": evaluation(ppl)} for label, ppl in runs.items()]}


def test_sources_are_compared_on_the_texts_foreign_to_all_of_them():
    fiction = _record("lambada", {"hywia": {"lambada": 11.0, "wiki": 90.0, "coqa": 20.0, "pydoc": 80.0}})
    mixed = _record("mix", {"hywia": {"lambada": 15.0, "wiki": 30.0, "coqa": 20.0, "pydoc": 20.0}})
    assert foreign_texts([fiction, mixed]) == ["coqa", "pydoc"]
    summary = summarise([fiction, mixed], ["lambada", "mix"])
    row = next(r for r in summary["rows"] if r["label"] == "hywia")
    assert math.isclose(row["gm"]["lambada"], 40.0) and math.isclose(row["gm"]["mix"], 20.0)
    text = render([fiction, mixed], summary, ["a.json", "b.json"])
    assert "| `hywia` | 0.2 | 40.00 | 20.00 |" in text and "ppl wiki (in-domain)" in text


def test_benches_of_one_source_are_ranked_together():
    first = _record("mix", {"hywia": {"lambada": 11.0, "wiki": 90.0, "coqa": 20.0, "pydoc": 80.0}})
    second = _record("mix", {"flap": {"lambada": 11.0, "wiki": 90.0, "coqa": 10.0, "pydoc": 40.0}})
    summary = summarise([first, second], ["a", "b"])
    text = render([first, second], summary, ["a.json", "b.json"])
    assert "| 0.2 | `flap` | 20.00 | `b` |\n| 0.2 | `hywia` | 40.00 | `a` |" in text and "(dense: 10.00)" in text


def test_a_fusion_run_is_named_with_its_views_and_learning_steps():
    """A bare `hywia` does not say which views it blended or whether its blend was learned: the summary adds the
    views and steps the run recorded, unless its label gives them, right after the criterion's name."""
    old = _record("mix", {"hywia": {"lambada": 11.0, "wiki": 90.0, "coqa": 20.0, "pydoc": 80.0},
                          "hywia:steps=8:lr=0.1@allocation=search": {"lambada": 11.0, "wiki": 90.0,
                                                                     "coqa": 20.0, "pydoc": 8.0},
                          "hywia:lr=0.1:views=fine+obs": {"lambada": 11.0, "wiki": 90.0, "coqa": 20.0, "pydoc": 9.0},
                          "flap": {"lambada": 11.0, "wiki": 90.0, "coqa": 20.0, "pydoc": 20.0}})
    old["runs"][0]["report"]["fusion"] = {"steps": 24, "views": ["fine", "coarse", "fluctuation"]}
    old["runs"][1]["report"]["fusion"] = {"steps": 8, "views": ["fine", "fluctuation"]}
    old["runs"][2]["report"]["fusion"] = {"steps": 24, "views": ["fine", "obs"]}
    labels = [row["label"] for row in summarise([old], ["a"])["rows"]]
    assert labels == ["dense", "hywia:views=fine+coarse+fluctuation:steps=24",
                      "hywia:views=fine+fluctuation:steps=8:lr=0.1@allocation=search",
                      "hywia:views=fine+obs:steps=24:lr=0.1", "flap"]
