"""The memory-light (layer-by-layer) statistics path gives the plain full-backward statistics, hence the same
scores and the same groups, for every gradient-based criterion."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BloomConfig

from hywia.errors import InvalidRequestError
from hywia.importance import ScoringContext, collect_statistics, get_criterion, layerwise
from hywia.importance.fusion import HywiaFusion
from hywia.models import adapter_for
from hywia.pruning import allocate_uniform, select

GRADIENT_CRITERIA = ["taylor-vector", "taylor-element1", "taylor-element2", "fixed:0.5", "hywia"]
TERMS = ("fine1", "fine2", "coarse1", "coarse2")


def _batches(count=4, length=24, seed=0):
    return torch.randint(0, 300, (count, length), generator=torch.Generator().manual_seed(seed))


def _both(model, layers, attention="heads", **kwargs):
    adapter = adapter_for(model, attention)
    batches = _batches()
    plain = collect_statistics(model, adapter, layers, batches, progress=False, path="plain", **kwargs)
    light = collect_statistics(model, adapter, layers, batches, progress=False, path="layerwise", **kwargs)
    return adapter, batches, plain, light


def _assert_same_statistics(plain, light):
    assert plain.taylor.keys() == light.taylor.keys() and plain.taylor
    for key, terms in plain.taylor.items():
        for term in TERMS:
            torch.testing.assert_close(getattr(light.taylor[key], term), getattr(terms, term), rtol=1e-5, atol=1e-12)
    assert plain.act_sq.keys() == light.act_sq.keys()
    for name in plain.act_sq:
        torch.testing.assert_close(light.act_sq[name], plain.act_sq[name])
        torch.testing.assert_close(light.act_sum[name], plain.act_sum[name])
    assert (light.tokens, light.samples) == (plain.tokens, plain.samples)
    assert light.loss == pytest.approx(plain.loss, rel=1e-6)


@pytest.mark.parametrize("family,shape", [("llama", dict(heads=4, kv_heads=2)), ("mistral", dict(heads=6, kv_heads=2)),
                                          ("qwen2", dict(heads=4, kv_heads=2))])
@pytest.mark.parametrize("attention", ["heads", "kv"])
@pytest.mark.parametrize("store", ["memory", "disk"])
def test_layerwise_statistics_equal_plain(tiny_model_factory, family, shape, attention, store):
    model = tiny_model_factory(family, **shape)
    _, _, plain, light = _both(model, [1, 2], attention, store=store)
    _assert_same_statistics(plain, light)


@pytest.mark.parametrize("layers", [[0, 1, 2, 3], [3], [0, 2]])
def test_any_layer_range(tiny_model_factory, layers):
    """The first layer, the last one (nothing above but the head) and a gap (a layer only passed through)."""
    _, _, plain, light = _both(tiny_model_factory("llama"), layers)
    _assert_same_statistics(plain, light)


def test_bfloat16_weights_with_float32_accumulators(tiny_model_factory):
    model = tiny_model_factory("llama").to(torch.bfloat16)
    _, _, plain, light = _both(model, [1, 2])
    _assert_same_statistics(plain, light)


def test_a_family_whose_layers_return_tuples():
    """Bloom's blocks return (hidden, attentions) and take ALiBi instead of rotary positions."""
    torch.manual_seed(0)
    config = BloomConfig(vocab_size=300, hidden_size=64, n_layer=4, n_head=4)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _, _, plain, light = _both(model, [1, 2])
    _assert_same_statistics(plain, light)


@pytest.mark.parametrize("name", GRADIENT_CRITERIA)
def test_same_scores_and_groups_for_every_gradient_criterion(tiny_model_factory, name):
    model = tiny_model_factory("llama")
    layers = [0, 1, 2, 3]
    adapter, batches, plain, light = _both(model, layers)
    specs = {i: adapter.group_specs(adapter.layers()[i]) for i in layers}
    keep = allocate_uniform(adapter, layers, 0.3)
    scores, plans = [], []
    for stats in (plain, light):
        ctx = ScoringContext(model, adapter, layers, specs, batches, keep, 0, stats, progress=False)
        criterion = HywiaFusion(steps=3, batch_size=2) if name == "hywia" else get_criterion(name)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            scores.append(criterion.score(ctx))
        plans.append(select(adapter, scores[-1], keep))
    for key in scores[0]:
        torch.testing.assert_close(scores[1][key], scores[0][key], rtol=1e-5, atol=1e-12)
    assert plans[0] == plans[1]


def test_parameters_and_mode_are_restored(tiny_model_factory):
    model = tiny_model_factory("llama").train()
    model.lm_head.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    collect_statistics(model, adapter_for(model), [1, 2], _batches(), progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert model.training and all(p.grad is None for p in model.parameters())


def test_unknown_path_or_store(tiny_model_factory):
    model = tiny_model_factory("llama")
    with pytest.raises(InvalidRequestError, match="importance path"):
        collect_statistics(model, adapter_for(model), [1], _batches(), path="fast", progress=False)
    with pytest.raises(InvalidRequestError, match="activation store"):
        collect_statistics(model, adapter_for(model), [1], _batches(), store="ram", progress=False)


@pytest.mark.parametrize("path", ["plain", "layerwise"])
def test_each_folds_terms_are_those_of_its_windows_alone(tiny_model_factory, path):
    """Window i belongs to fold i % folds; a fold's terms equal a pass over its windows alone, and asking for folds
    leaves the terms of all windows as they were."""
    model = tiny_model_factory("llama")
    adapter, batches = adapter_for(model), _batches(count=5)
    whole = collect_statistics(model, adapter, [1, 2], batches, progress=False, path=path)
    folded = collect_statistics(model, adapter, [1, 2], batches, progress=False, path=path, folds=2)
    assert not whole.fold_taylor and len(folded.fold_taylor) == 2
    for key, terms in whole.taylor.items():
        for term in TERMS:
            torch.testing.assert_close(getattr(folded.taylor[key], term), getattr(terms, term), rtol=1e-6, atol=0)
    for fold in range(2):
        alone = collect_statistics(model, adapter, [1, 2], batches[fold::2], progress=False, path=path)
        assert folded.fold_taylor[fold].keys() == alone.taylor.keys()
        for key, terms in alone.taylor.items():
            for term in TERMS:
                torch.testing.assert_close(getattr(folded.fold_taylor[fold][key], term), getattr(terms, term),
                                           rtol=1e-5, atol=1e-12)


def test_more_folds_than_windows_are_refused(tiny_model_factory):
    model = tiny_model_factory("llama")
    with pytest.raises(InvalidRequestError, match="folds"):
        collect_statistics(model, adapter_for(model), [1], _batches(count=2), folds=3, progress=False)


@pytest.mark.parametrize("vocab, hidden, tokens", [
    (262144, 640, 40),  # Gemma-3-270M: 1/16 of the weight, not 4 tokens a chunk
    (49152, 576, 36),  # SmolLM2-135M
    (300, 64, 2**20 // 300),  # a tiny model: the 4 MB floor
])
def test_head_chunks_grow_with_the_head_so_its_weight_is_read_rarely(vocab, hidden, tokens):
    head = nn.Linear(hidden, vocab, bias=False, device="meta")
    assert layerwise.head_chunk_tokens(head) == tokens
    assert tokens * vocab <= max(layerwise.HEAD_CHUNK_ELEMENTS, head.weight.numel() // 16) + vocab
