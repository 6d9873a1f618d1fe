import pytest
import torch

from hywia.importance import ScoringContext, get_criterion
from hywia.importance.obs import greedy_obs_errors, output_grams
from hywia.models import adapter_for
from hywia.pruning import allocate_uniform


def _inputs(tokens=300, columns=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, columns, generator=generator, dtype=torch.float64) + 0.5
    x[:, 4] = 0.9 * x[:, 5] + 0.1 * x[:, 4]  # a column the others nearly predict
    z = torch.cat([x, torch.ones(tokens, 1, dtype=torch.float64)], 1)
    return x, z, z.T @ z / tokens


def _refit_error(x, z, weight, removed):
    """Mean squared output error after removing columns `removed` and refitting the rest and a bias."""
    kept = [c for c in range(z.shape[1]) if c not in removed]
    target = x[:, removed] @ weight[:, removed].T
    fitted = z[:, kept] @ torch.linalg.lstsq(z[:, kept], target).solution
    return float((target - fitted).square().sum() / x.shape[0])


@pytest.mark.parametrize("block", [1, 3])
def test_greedy_errors_are_the_refit_errors_of_the_removal_order(block):
    """One group per step: the k-th removal's error is what removing the first k groups and refitting the rest
    costs beyond the first k - 1 (the closed-form OBS update is exact), and the cheapest group goes first."""
    x, z, gram = _inputs()
    weight = torch.randn(5, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    count = 12 // block
    scores = greedy_obs_errors(weight, gram, block, steps=count, damp=1e-12)
    order = scores.argsort().tolist()
    columns = lambda groups: [g * block + j for g in groups for j in range(block)]  # noqa: E731
    singles = [_refit_error(x, z, weight, columns([g])) for g in range(count)]
    assert order[0] == min(range(count), key=singles.__getitem__)
    assert scores[order[0]] == pytest.approx(singles[order[0]], rel=1e-6)
    total = 0.0
    for k in range(1, count):
        error = _refit_error(x, z, weight, columns(order[:k]))
        assert error >= total - 1e-9
        total = error
    assert (scores[order].diff() >= 0).all()


def test_a_column_the_others_predict_goes_before_an_independent_one_of_the_same_weight():
    x, z, gram = _inputs()
    weight = torch.ones(3, 12, dtype=torch.float64)
    scores = greedy_obs_errors(weight, gram, 1, steps=12, damp=1e-9)
    assert scores[4] < scores[0] and scores[4] < scores[11]


def test_one_batch_ranks_by_each_groups_own_refit_error():
    """steps=1 removes every group in one batch: the ranking is that of the single-removal errors."""
    x, z, gram = _inputs()
    weight = torch.randn(4, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    singles = torch.tensor([_refit_error(x, z, weight, [c]) for c in range(12)])
    scores = greedy_obs_errors(weight, gram, 1, steps=1, damp=1e-12)
    assert scores.argsort().tolist() == singles.argsort().tolist()


def test_output_grams_are_the_inputs_of_each_output_projection(tiny_model_factory):
    model = tiny_model_factory("llama")
    adapter = adapter_for(model, "heads")
    layers = [1, 2]
    batches = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    specs = {i: adapter.group_specs(adapter.layers()[i]) for i in layers}
    ctx = ScoringContext(model, adapter, layers, specs, batches, allocate_uniform(adapter, layers, 0.3),
                         progress=False)
    seen = []
    handle = adapter.layers()[2].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(batches)
    handle.remove()
    grams = dict(output_grams(ctx))
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    z = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(grams[(2, "mlp")], z.T @ z / x.shape[0], rtol=1e-5, atol=1e-6)
    assert grams[(1, "head")].shape[0] == model.config.hidden_size + 1


@pytest.mark.parametrize("steps,damp", [(0, 1e-2), (4, 0.0)])
def test_obs_settings_are_checked(steps, damp):
    with pytest.raises(Exception, match="steps|damp"):
        get_criterion(f"obs:steps={steps}:damp={damp}")
