import copy

import pytest
import torch
import torch.nn.functional as F

from hywia.errors import InvalidRequestError
from hywia.importance.obs import projection_grams
from hywia.models import adapter_for
from hywia.pruning import allocate_global, apply_plan, select
from hywia.pruning.compensate import compensate
from hywia.pruning.methods import parse_allocation
from hywia.pruning.plan import group_cost
from hywia.pruning.search import ProfileSearch, search_profile


def _windows(count, seed=0):
    return torch.randint(0, 300, (count, 24), generator=torch.Generator().manual_seed(seed))


def _scores(adapter, layers, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {(i, s.kind): torch.rand(s.count, generator=generator, dtype=torch.float64)
            for i in layers for s in adapter.group_specs(adapter.layers()[i])}


def _removed(adapter, profile):
    layers = adapter.layers()
    return sum((spec.count - kept) * group_cost(layers[i], spec)
               for (i, kind), kept in profile.items()
               for spec in adapter.group_specs(layers[i]) if spec.kind == kind)


def _kl(dense_model, model, windows):
    with torch.no_grad():
        total = 0.0
        for ids in windows:
            dense = F.log_softmax(dense_model(input_ids=ids[None]).logits[0].float(), -1)
            pruned = F.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)
            total += float((dense.exp() * (dense - pruned)).sum(-1).mean())
        return total / len(windows)


def _search(model, adapter, layers, scores, start, windows, compensation="lstsq", **settings):
    grams = projection_grams(model, adapter, layers, windows) if compensation != "none" else None
    return search_profile(model, adapter, layers, scores, start, windows, compensation,
                          ProfileSearch(**{"windows": 3, "levels": 8, **settings}), grams=grams, seed=1)


@pytest.mark.parametrize("attention", ["heads", "none"])
def test_the_search_keeps_the_share_floor_and_full_widths(tiny_model_factory, attention):
    """Every move is between (layer, kind)s of equal step cost: the removed parameters stay the start's exactly,
    and no (layer, kind) goes below its floor or above its width."""
    model = tiny_model_factory("llama", heads=8, kv_heads=2, layers=6, mlp=128)
    adapter = adapter_for(model, attention)
    layers = [1, 2, 3, 4]
    scores = _scores(adapter, layers)
    start = allocate_global(adapter, layers, 0.3, scores, floor=0.25)
    found, record = _search(model, adapter, layers, scores, start, _windows(4), generations=12, floor=0.25)
    assert _removed(adapter, found) == _removed(adapter, start)
    assert record["moved"], "twelve generations on a random model should move something"
    for (i, kind), kept in found.items():
        spec = next(s for s in adapter.group_specs(adapter.layers()[i]) if s.kind == kind)
        assert spec.count * 0.25 <= kept <= spec.count


def test_the_search_never_ends_further_from_the_dense_model(tiny_model_factory):
    """The parent is replaced only by a closer child: the result's KL on the fitness windows is at most the
    start's, and zero generations return the start itself."""
    model = tiny_model_factory("llama", heads=8, kv_heads=2, layers=6, mlp=128)
    adapter = adapter_for(model, "heads")
    layers = [1, 2, 3, 4]
    scores = _scores(adapter, layers)
    start = allocate_global(adapter, layers, 0.3, scores)
    same, record = _search(model, adapter, layers, scores, start, _windows(4), generations=0)
    assert same == start and record["kl"] == record["start_kl"] and not record["moved"]
    found, record = _search(model, adapter, layers, scores, start, _windows(4), generations=10)
    assert record["kl"] <= record["start_kl"]
    assert record["kl"] < record["start_kl"] or found == start


def test_the_same_seed_finds_the_same_profile(tiny_model_factory):
    model = tiny_model_factory("llama", heads=8, kv_heads=2, layers=6, mlp=128)
    adapter = adapter_for(model, "heads")
    layers = [1, 2, 3, 4]
    scores = _scores(adapter, layers)
    start = allocate_global(adapter, layers, 0.3, scores)
    first = _search(model, adapter, layers, scores, start, _windows(4), generations=6)
    assert _search(model, adapter, layers, scores, start, _windows(4), generations=6) == first


@pytest.mark.parametrize("compensation", ["lstsq", "bias", "none"])
def test_a_profiles_fitness_is_the_kl_of_the_compensated_cut_model(tiny_model_factory, compensation):
    """With one pruned MLP (its inputs are then the dense model's), the fitness of a profile is the KL of the model
    compensated as the pipeline will (fixed ridge) and physically cut."""
    model = tiny_model_factory("llama", heads=8, kv_heads=2, layers=6, mlp=128)
    adapter = adapter_for(model, "none")
    layers = [2]
    scores = _scores(adapter, layers)
    windows = _windows(5)
    start = {(2, "mlp"): 80}
    _, record = _search(model, adapter, layers, scores, start, windows, compensation, generations=0)

    pruned = copy.deepcopy(model)
    plan = select(adapter, scores, start)
    compensate(pruned, adapter_for(pruned, "none"), plan, windows, compensation, ridge=1e-2, holdout=0)
    apply_plan(pruned, plan)
    assert record["start_kl"] == pytest.approx(_kl(model, pruned, windows[:3]), rel=1e-4, abs=1e-7)
    assert record["start_kl"] > 0


def test_search_settings_are_checked():
    assert parse_allocation("search:generations=3:windows=2")[1] == ProfileSearch(generations=3, windows=2)
    for bad in ("search:survivors=9", "search:windows=0", "search:floor=1", "search:generations=-1"):
        with pytest.raises(InvalidRequestError):
            parse_allocation(bad)


def test_a_move_needs_a_donor_and_a_different_receiver():
    """Mutation moves only between two distinct (layer, kind)s of one step cost, never past a bound; with no such
    pair the child is the parent."""
    import random

    from hywia.models import GroupSpec
    from hywia.pruning.search import _mutate, _Slot

    spec = GroupSpec("mlp", 8, (), "mlp.down_proj", 1)
    slots = {(0, "mlp"): _Slot(spec, 2, 2, 10), (1, "mlp"): _Slot(spec, 2, 2, 10), (2, "mlp"): _Slot(spec, 2, 2, 99)}
    rng = random.Random(0)
    seen = set()
    for _ in range(50):  # layer 0 can only give, layer 1 only receive; layer 2 has no partner of its cost
        child = _mutate({(0, "mlp"): 8, (1, "mlp"): 2, (2, "mlp"): 4}, slots, rng)
        assert child[(2, "mlp")] == 4 and child[(0, "mlp")] + child[(1, "mlp")] == 10
        seen.add(child[(0, "mlp")])
    assert seen <= {8, 6, 4, 2} and 6 in seen  # a later move of the same child may undo an earlier one
    assert _mutate({(0, "mlp"): 2, (1, "mlp"): 2, (2, "mlp"): 4}, slots, rng) == {(0, "mlp"): 2, (1, "mlp"): 2,
                                                                                  (2, "mlp"): 4}


def test_a_child_started_from_its_parents_layer_inputs_scores_as_a_whole_run(tiny_model_factory):
    """After `rebase`, a profile that first differs from the parent at layer a runs from the parent's input to
    layer a: its KL is the one a whole forward gives."""
    from hywia.pruning.search import ProfileFitness, _slots

    model = tiny_model_factory("llama", heads=8, kv_heads=2, layers=6, mlp=128)
    adapter = adapter_for(model, "heads")
    layers = [1, 2, 3, 4]
    scores = _scores(adapter, layers)
    parent = allocate_global(adapter, layers, 0.3, scores)
    slots = _slots(adapter, layers, ProfileSearch(levels=8), 1)
    child = dict(parent)
    child[(3, "mlp")] -= 16
    child[(4, "mlp")] += 16

    def fitness():
        return ProfileFitness(model, adapter, scores, slots, _windows(3), {}, "none", 1e-2)

    shortcut = fitness()
    shortcut(parent, 3)
    shortcut.rebase(parent)
    whole = fitness()
    assert shortcut(child, 3) == pytest.approx(whole(child, 3), rel=1e-6, abs=1e-9)
    assert shortcut(child, 3) != pytest.approx(shortcut(parent, 3), rel=1e-4)
    shortcut.rebase(child)  # and the child, now the parent, hands its own inputs on
    grandchild = dict(child)
    grandchild[(2, "head")] -= 2
    grandchild[(4, "head")] += 2
    assert shortcut(grandchild, 3) == pytest.approx(whole(grandchild, 3), rel=1e-6, abs=1e-9)
