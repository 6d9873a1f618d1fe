"""Settings objects and method specs: every setting reachable, each mistake one line that says what to fix."""

import pytest

from hywia.errors import InvalidRequestError
from hywia.importance import get_criterion
from hywia.pruning.methods import parse_allocation, parse_compensation
from hywia.settings import Recipe


def test_a_criterion_spec_sets_its_own_settings():
    fusion = get_criterion("hywia:steps=48:lr=0.1:temperature_end=0.02")
    assert (fusion.settings.steps, fusion.settings.lr, fusion.settings.temperature_end) == (48, 0.1, 0.02)
    assert fusion.settings.batch_size == 4  # the rest keep their defaults
    assert get_criterion("fixed:0.3").settings.alpha == 0.3
    assert get_criterion("fixed:alpha=0.7").settings.alpha == 0.7


def test_a_spec_written_out_reads_back_equal():
    for spec in ("hywia:steps=8", "fixed:0.25", "taylor-element1"):
        criterion = get_criterion(spec)
        assert get_criterion(criterion.spec).settings == criterion.settings
    assert get_criterion("taylor-vector").spec == "taylor-vector"


@pytest.mark.parametrize("spec, message", [
    ("hywia:8", "give settings as key=value"),
    ("hywia:step=8", "no setting 'step'"),
    ("hywia:steps=eight", "steps must be int"),
    ("hywia:steps=-1", "steps must be >= 0"),
    ("hywia:steps=2:steps=3", "twice"),
    ("fixed:2", "alpha must lie in"),
    ("magnitude:1", "takes no settings"),
    ("nope", "unknown criterion"),
])
def test_bad_criterion_specs_fail_in_one_line(spec, message):
    with pytest.raises(InvalidRequestError, match=message) as caught:
        get_criterion(spec)
    assert "\n" not in str(caught.value)


def test_allocation_and_compensation_settings():
    assert parse_allocation("global:floor=0.1")[1].floor == 0.1
    assert parse_compensation("lstsq:ridge=0.001")[1].ridge == 0.001
    assert parse_compensation("bias")[0] == "bias"
    with pytest.raises(InvalidRequestError, match="floor must lie"):
        parse_allocation("global:floor=1.5")
    with pytest.raises(InvalidRequestError, match="uniform.*takes no settings"):
        parse_allocation("uniform:floor=0.1")
    with pytest.raises(InvalidRequestError, match="unknown compensation"):
        parse_compensation("ols")


def test_recipe_round_trip_and_overrides():
    recipe = Recipe(model="m").replace(ratio="0.3", criterion="fixed:0.5", seed=3, ppl_text="none", calib_samples=8)
    assert (recipe.prune.ratio, recipe.runtime.seed, recipe.eval.ppl_text) == (0.3, 3, None)
    again = Recipe.from_dict(recipe.to_dict())
    assert again == recipe
    assert Recipe.from_dict({"recipe": recipe.to_dict(), "ratio_achieved": 0.3}) == recipe  # a report.json
    with pytest.raises(InvalidRequestError, match="unknown setting 'ratios'"):
        recipe.replace(ratios=0.2)
    with pytest.raises(InvalidRequestError, match="seed must be int"):
        recipe.replace(seed="x")
    with pytest.raises(InvalidRequestError, match="not a recipe"):
        Recipe.from_dict({"prune": {}, "colour": 1})
