import pytest

from hywia.errors import InvalidRequestError
from hywia.models import adapter_for
from hywia.pruning import allocate_uniform, apply_plan, parse_layers, select
import torch


def test_parse_layers_default_keeps_first_and_last():
    assert parse_layers(None, 30) == list(range(3, 28))
    assert parse_layers("2:-1", 10) == list(range(2, 9))
    with pytest.raises(InvalidRequestError):
        parse_layers("5:5", 10)
    with pytest.raises(InvalidRequestError):
        parse_layers("a:b", 10)


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.35, 0.5])
@pytest.mark.parametrize("attention", ["heads", "kv"])
def test_achieved_ratio_matches_request(tiny_model_factory, ratio, attention):
    model = tiny_model_factory("llama", heads=8, kv_heads=2, layers=6)
    adapter = adapter_for(model, attention)
    layers = parse_layers("1:5", 6)
    keep = allocate_uniform(adapter, layers, ratio)
    scores = {(i, s.kind): torch.rand(s.count) for i in layers for s in adapter.group_specs(adapter.layers()[i])}
    before = adapter.num_decoder_params()
    apply_plan(model, select(adapter, scores, keep))
    achieved = 1 - adapter_for(model, attention).num_decoder_params() / before
    assert abs(achieved - ratio) < 0.01


def test_ratio_that_empties_layers_is_refused(tiny_model_factory):
    adapter = adapter_for(tiny_model_factory("llama", layers=6))
    with pytest.raises(InvalidRequestError, match="empty"):
        allocate_uniform(adapter, [2], 0.5)
