import pytest

from hywia.errors import InvalidRequestError
from hywia.models import adapter_for
from hywia.pruning import allocate_uniform, apply_plan, check_plan_request, parse_layers, select
from hywia.pruning.plan import (DEFAULT_ROUND_TO, GLOBAL_FLOOR, GLOBAL_TOLERANCE, allocate_global,
                                check_global_reachable, check_round_to, group_cost, max_removable_share,
                                resolve_round_to)
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


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("ratio", [0.1, 0.3])
def test_attention_none_removes_mlp_channels_only(tiny_model_factory, ratio, allocation):
    from hywia.pruning import allocate_global

    model = tiny_model_factory("llama", heads=8, kv_heads=2, layers=6)
    adapter = adapter_for(model, "none")
    layers = parse_layers("1:5", 6)
    assert [s.kind for s in adapter.group_specs(adapter.layers()[1])] == ["mlp"]
    scores = {(i, "mlp"): torch.rand(adapter.group_specs(adapter.layers()[i])[0].count) for i in layers}
    keep = (allocate_uniform(adapter, layers, ratio) if allocation == "uniform"
            else allocate_global(adapter, layers, ratio, scores))
    attention_before = [sum(p.numel() for p in layer.self_attn.parameters()) for layer in adapter.layers()]
    before = adapter.num_decoder_params()
    apply_plan(model, select(adapter, scores, keep))
    assert [sum(p.numel() for p in layer.self_attn.parameters()) for layer in adapter.layers()] == attention_before
    assert abs(1 - adapter_for(model, "none").num_decoder_params() / before - ratio) < 0.01


def test_ratio_that_empties_layers_is_refused(tiny_model_factory):
    adapter = adapter_for(tiny_model_factory("llama", layers=6))
    with pytest.raises(InvalidRequestError, match="empty"):
        allocate_uniform(adapter, [2], 0.5)


@pytest.mark.parametrize("ratio", [0.2, 0.3])
def test_global_allocation_reaches_ratio_and_keeps_a_floor(tiny_model_factory, ratio):
    from hywia.pruning import allocate_global

    model = tiny_model_factory("llama", heads=8, kv_heads=2, layers=6)
    adapter = adapter_for(model)
    layers = parse_layers("1:5", 6)
    generator = torch.Generator().manual_seed(0)
    # Layer 2 matters 100x more than the others: a global ranking must spare it.
    scores = {(i, s.kind): torch.rand(s.count, generator=generator) * (100.0 if i == 2 else 1.0)
              for i in layers for s in adapter.group_specs(adapter.layers()[i])}
    keep = allocate_global(adapter, layers, ratio, scores, floor=0.25)
    counts = {s.kind: s.count for s in adapter.group_specs(adapter.layers()[1])}
    assert keep[(2, "mlp")] == counts["mlp"] and keep[(2, "head")] == counts["head"]
    assert all(keep[(i, k)] >= 0.25 * counts[k] for i in layers for k in counts)
    before = adapter.num_decoder_params()
    apply_plan(model, select(adapter, scores, keep))
    assert abs(1 - adapter_for(model).num_decoder_params() / before - ratio) < 0.01


def test_attention_weight_moves_removals_between_heads_and_channels(tiny_model_factory):
    """Weighting attention scores up removes fewer heads and more channels at the same total; weight 1 is the plain
    global allocation; the achieved share holds either way."""
    model = tiny_model_factory("llama", heads=8, kv_heads=2, layers=6)
    adapter = adapter_for(model)
    layers = parse_layers("1:5", 6)
    generator = torch.Generator().manual_seed(0)
    scores = {(i, s.kind): torch.rand(s.count, generator=generator)
              for i in layers for s in adapter.group_specs(adapter.layers()[i])}
    heads_kept = {}
    for weight in (0.01, 1.0, 100.0):
        keep = allocate_global(adapter, layers, 0.3, scores, attention_weight=weight)
        heads_kept[weight] = sum(n for (_, kind), n in keep.items() if kind == "head")
        pruned = tiny_model_factory("llama", heads=8, kv_heads=2, layers=6)
        before = adapter_for(pruned).num_decoder_params()
        apply_plan(pruned, select(adapter_for(pruned), scores, keep))
        assert abs(1 - adapter_for(pruned).num_decoder_params() / before - 0.3) < 0.01
    assert keep == allocate_global(adapter, layers, 0.3, {k: v * (100.0 if k[1] == "head" else 1.0)
                                                          for k, v in scores.items()})
    assert allocate_global(adapter, layers, 0.3, scores, attention_weight=1.0) == allocate_global(
        adapter, layers, 0.3, scores)
    assert heads_kept[0.01] <= heads_kept[1.0] < heads_kept[100.0]


def test_global_allocation_refuses_an_unreachable_ratio(tiny_model_factory):
    from hywia.pruning import allocate_global

    adapter = adapter_for(tiny_model_factory("llama", layers=6))
    scores = {(i, s.kind): torch.rand(s.count) for i in [2, 3] for s in adapter.group_specs(adapter.layers()[i])}
    with pytest.raises(InvalidRequestError, match="cannot be reached"):
        allocate_global(adapter, [2, 3], 0.3, scores, floor=0.5)


@pytest.mark.parametrize("round_to", [8, 32])
def test_round_to_gives_multiples_and_keeps_the_ratio(tiny_model_factory, round_to):
    # a wide MLP so rounding has room: 6 layers x 256 channels
    model = tiny_model_factory("llama", heads=8, kv_heads=2, layers=6, mlp=256)
    adapter = adapter_for(model)
    keep = allocate_uniform(adapter, parse_layers("1:5", 6), 0.3, round_to=round_to)
    assert all(v % round_to == 0 for (i, kind), v in keep.items() if kind == "mlp")
    scores = {(i, s.kind): torch.rand(s.count) for i in range(1, 5) for s in adapter.group_specs(adapter.layers()[i])}
    before = adapter.num_decoder_params()
    apply_plan(model, select(adapter, scores, keep))
    assert abs(1 - adapter_for(model).num_decoder_params() / before - 0.3) < 0.03


@pytest.mark.parametrize("spec", ["1", "2:3:4", "a:", ":b", "1.5:3", "", "-"])
def test_layers_must_be_an_a_colon_b_slice(spec):
    with pytest.raises(InvalidRequestError, match="--layers must look like A:B"):
        parse_layers(spec, 10)


def test_layers_bounds_may_be_empty_or_negative_but_not_outside_the_model():
    assert parse_layers(":", 10) == list(range(10))
    assert parse_layers("7:", 10) == [7, 8, 9] and parse_layers(":2", 10) == [0, 1]
    assert parse_layers("-10:-8", 10) == [0, 1] and parse_layers(" 3 : 10 ", 10) == list(range(3, 10))
    for spec, bound in [("0:99", "99"), ("-11:", "-11"), ("11:12", "11")]:
        with pytest.raises(InvalidRequestError, match=f"bound {bound} is outside the model's 10 layers"):
            parse_layers(spec, 10)
    for spec in ("5:2", "-1:-3", "10:"):
        with pytest.raises(InvalidRequestError, match="selects no layer of the model's 10 layers"):
            parse_layers(spec, 10)


def test_the_default_round_to_is_8_where_every_pruned_mlp_is_wider(tiny_model_factory):
    adapter = adapter_for(tiny_model_factory("llama", layers=6))  # MLP width 96
    assert resolve_round_to(adapter, [1, 2], None) == DEFAULT_ROUND_TO == 8
    assert (resolve_round_to(adapter, [1, 2], 1), resolve_round_to(adapter, [1, 2], 32)) == (1, 32)
    keep = allocate_uniform(adapter, [1, 2, 3, 4], 0.3, round_to=resolve_round_to(adapter, [1, 2, 3, 4], None))
    mlp = [v for (_, kind), v in keep.items() if kind == "mlp"]
    assert all(v % 8 == 0 for v in mlp) and all(v < 96 for v in mlp)


def test_the_default_round_to_leaves_a_narrow_mlp_alone(tiny_model_factory):
    adapter = adapter_for(tiny_model_factory("llama", layers=6, mlp=8))
    assert resolve_round_to(adapter, [1, 2], None) == 1
    with pytest.raises(InvalidRequestError, match="--round-to 8 is not below the MLP width of layer 1 \\(8"):
        check_round_to(adapter, [1, 2], 8)


def test_heads_are_rounded_only_where_head_dim_is_no_multiple_of_n(tiny_model_factory):
    layers = [1, 2, 3, 4]
    # head_dim 16: any head count gives a width that is a multiple of 8 and 16, so heads stay as allocated
    adapter = adapter_for(tiny_model_factory("llama", heads=4, kv_heads=2, layers=6))
    unrounded = allocate_uniform(adapter, layers, 0.3, round_to=1)
    for n in (8, 16):
        keep = allocate_uniform(adapter, layers, 0.3, round_to=n)
        assert [keep[(i, "head")] for i in layers] == [unrounded[(i, "head")] for i in layers]
    # head_dim 8, 2 KV groups: a width that is a multiple of 32 takes a multiple of 4 heads (2 per KV group)
    adapter = adapter_for(tiny_model_factory("llama", heads=8, kv_heads=2, layers=6, mlp=256))
    unrounded = allocate_uniform(adapter, layers, 0.2, round_to=1)
    keep = allocate_uniform(adapter, layers, 0.2, round_to=32)
    assert any(unrounded[(i, "head")] % 4 for i in layers)
    assert all(keep[(i, "head")] % 4 == 0 and keep[(i, "head")] * 8 % 32 == 0 for i in layers)


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_global_allocation_with_rounding_stays_within_a_point_of_the_ratio(tiny_model_factory, ratio):
    adapter = adapter_for(tiny_model_factory("llama", heads=8, kv_heads=2, layers=12, mlp=256))
    layers = parse_layers(None, 12)
    generator = torch.Generator().manual_seed(0)
    scores = {(i, s.kind): torch.rand(s.count, generator=generator)
              for i in layers for s in adapter.group_specs(adapter.layers()[i])}
    keep = allocate_global(adapter, layers, ratio, scores, round_to=8)
    assert all(v % 8 == 0 for (_, kind), v in keep.items() if kind == "mlp")
    removed = sum((s.count - keep[(i, s.kind)]) * group_cost(adapter.layers()[i], s)
                  for i in layers for s in adapter.group_specs(adapter.layers()[i]))
    assert abs(removed / adapter.num_decoder_params() - ratio) < 0.01


def test_round_to_must_be_below_every_pruned_mlp_width(tiny_model_factory):
    adapter = adapter_for(tiny_model_factory("llama", layers=6))  # MLP width 96
    check_round_to(adapter, [1, 2], 32)
    with pytest.raises(InvalidRequestError, match="--round-to 96 is not below the MLP width of layer 1 \\(96"):
        check_round_to(adapter, [1, 2], 96)
    with pytest.raises(InvalidRequestError, match="--round-to must be >= 1"):
        check_round_to(adapter, [1, 2], 0)


def test_the_largest_reachable_share_is_what_each_allocation_reaches(tiny_model_factory):
    from hywia.pruning import allocate_global

    model = tiny_model_factory("llama", heads=8, kv_heads=2, layers=6)
    adapter = adapter_for(model)
    layers = [2, 3]
    scores = {(i, s.kind): torch.rand(s.count) for i in layers for s in adapter.group_specs(adapter.layers()[i])}
    global_most = max_removable_share(adapter, layers, GLOBAL_FLOOR)
    uniform_most = max_removable_share(adapter, layers, 0.0)
    assert 0 < global_most < uniform_most < len(layers) / 6
    keep = allocate_global(adapter, layers, global_most, scores)
    counts = {s.kind: s.count for s in adapter.group_specs(adapter.layers()[2])}
    assert all(keep[(i, kind)] == counts[kind] // 4 for i in layers for kind in counts)  # everything to the floor
    check_global_reachable(adapter, layers, global_most + GLOBAL_TOLERANCE)
    beyond = global_most + 2 * GLOBAL_TOLERANCE
    with pytest.raises(InvalidRequestError, match="cannot be reached"):
        allocate_global(adapter, layers, beyond, scores)
    message = f"--layers 2:4 can give at most {global_most:.3f} .*--allocation uniform \\(up to {uniform_most:.3f}\\)"
    with pytest.raises(InvalidRequestError, match=message):
        check_global_reachable(adapter, layers, beyond)
    before = adapter.num_decoder_params()
    apply_plan(model, select(adapter, scores, allocate_uniform(adapter, layers, uniform_most)))
    widths = adapter_for(model).widths(model.model.layers[2])
    assert widths["num_attention_heads"] == 2 and widths["intermediate_size"] == 1  # one unit of each kept
    assert abs(1 - adapter_for(model).num_decoder_params() / before - uniform_most) < 1e-9
    with pytest.raises(InvalidRequestError, match=f"would empty the pruned layers: --layers 2:4 .*{uniform_most:.3f}"):
        allocate_uniform(adapter_for(tiny_model_factory("llama", heads=8, kv_heads=2, layers=6)), layers,
                         uniform_most + 0.001)


def test_plan_request_checks_layers_round_to_and_the_allocation(tiny_model_factory):
    adapter = adapter_for(tiny_model_factory("llama", layers=6))
    assert check_plan_request(adapter, "1:5", 0.3, 8, GLOBAL_FLOOR) == [1, 2, 3, 4]
    with pytest.raises(InvalidRequestError, match="--layers"):
        check_plan_request(adapter, "1", 0.3, 1, GLOBAL_FLOOR)
    with pytest.raises(InvalidRequestError, match="--round-to 128"):
        check_plan_request(adapter, "1:5", 0.3, 128, GLOBAL_FLOOR)
    assert check_plan_request(adapter, "2:4", 0.2, 1, None) == [2, 3]
    with pytest.raises(InvalidRequestError, match="--allocation global"):
        check_plan_request(adapter, "2:4", 0.2, 1, GLOBAL_FLOOR)


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_log_allocation_removes_more_from_deeper_layers_and_keeps_the_ratio(tiny_model_factory, ratio):
    from hywia.pruning.plan import log_depth_weights

    model = tiny_model_factory("llama", heads=8, kv_heads=2, layers=8)
    adapter = adapter_for(model, "heads")
    layers = parse_layers("1:7", 8)
    weights = log_depth_weights(layers)
    assert sum(weights.values()) / len(weights) == pytest.approx(1.0)
    keep = allocate_uniform(adapter, layers, ratio, depth_weights=weights)
    mlp_kept = [keep[(i, "mlp")] for i in layers]
    assert mlp_kept == sorted(mlp_kept, reverse=True) and mlp_kept[0] > mlp_kept[-1]
    scores = {(i, s.kind): torch.rand(s.count) for i in layers for s in adapter.group_specs(adapter.layers()[i])}
    before = adapter.num_decoder_params()
    apply_plan(model, select(adapter, scores, keep))
    assert abs(1 - adapter_for(model, "heads").num_decoder_params() / before - ratio) < 0.01
