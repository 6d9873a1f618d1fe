"""The pipeline's stages: a variant study runs many methods on one calibration pass, each as a prune of its own."""

import pytest
import torch

import hywia.pipeline as pipeline_module
from conftest import TINY_TEXT
from hywia import prune
from hywia.errors import InvalidRequestError
from hywia.pipeline import Pipeline
from hywia.settings import CalibrationConfig, PruneConfig

VARIANTS = [("hywia:steps=2", "global", "lstsq"), ("taylor-element1", "uniform", "none"),
            ("wanda-sp", "global:floor=0.4", "bias")]


@pytest.fixture
def calibration(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join([TINY_TEXT] * 6))
    return CalibrationConfig(calib=str(path), calib_samples=4, seq_len=32)


def test_variants_share_one_calibration_pass(tiny_model_factory, tiny_tokenizer, calibration, monkeypatch):
    model = tiny_model_factory("llama")
    dense = {name: value.clone() for name, value in model.state_dict().items()}
    passes = []
    collect = pipeline_module.collect_statistics
    monkeypatch.setattr(pipeline_module, "collect_statistics", lambda *a, **k: passes.append(k) or collect(*a, **k))
    pipeline = Pipeline(model, tiny_tokenizer, layers="0:4", calibration=calibration, progress=False)
    configs = [PruneConfig(ratio=0.3, criterion=c, allocation=a, compensate=m, layers="0:4") for c, a, m in VARIANTS]
    runs = [pipeline.prepare(config) for config in configs]
    pipeline.calibrate(runs)
    results = [pipeline.run(run, in_place=False) for run in runs]

    assert len(passes) == 1 and passes[0]["gradients"] and passes[0]["activations"]
    for name, value in model.state_dict().items():  # every variant cut a copy
        torch.testing.assert_close(value, dense[name], atol=0, rtol=0)
    assert set(pipeline.log.stages) == {"calibrate", "score", "plan", "compensate", "cut"}
    for config, result in zip(configs, results):  # the same as pruning with that method alone
        alone = prune(tiny_model_factory("llama"), tokenizer=tiny_tokenizer, ratio=0.3, criterion=config.criterion,
                      allocation=config.allocation, compensate=config.compensate, layers="0:4",
                      calib=calibration.calib, calib_samples=4, seq_len=32, ppl_text=None, progress=False)
        assert alone.plan == result.plan, config.criterion
        for name, value in alone.model.state_dict().items():
            torch.testing.assert_close(result.model.state_dict()[name], value, atol=0, rtol=0)


def test_runs_are_checked_before_any_work(tiny_model_factory, tiny_tokenizer, calibration):
    pipeline = Pipeline(tiny_model_factory("llama"), tiny_tokenizer, layers="0:4", calibration=calibration)
    with pytest.raises(InvalidRequestError, match="share its --attention and --layers"):
        pipeline.prepare(PruneConfig(ratio=0.2, layers="1:3"))
    with pytest.raises(InvalidRequestError, match="empty the pruned layers"):
        pipeline.prepare(PruneConfig(ratio=0.9, layers="0:4"))
    with pytest.raises(InvalidRequestError, match="ridge must be >= 0"):
        pipeline.prepare(PruneConfig(ratio=0.2, layers="0:4", compensate="lstsq:ridge=-1"))
    assert pipeline.stats is None and not pipeline.log.stages


@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_the_fusions_soft_mask_starts_at_the_allocations_attention_share(tiny_model_factory, tiny_tokenizer,
                                                                          calibration, monkeypatch, weight):
    """The learned soft mask ranks attention groups with the allocation's weight, so before any step it closes
    heads where the allocation removes them, about as many (the allocation skips a group that would overshoot,
    the soft mask's threshold does not). Without the weight in the mask, weight 0.3 closes no head at all."""
    from hywia.importance import fusion

    captured = []
    monkeypatch.setattr(fusion.HywiaFusion, "_optimise",
                        lambda self, ctx, params, gates_at, *rest: captured.append((ctx, gates_at)) or [])
    pipeline = Pipeline(tiny_model_factory("llama"), tiny_tokenizer, layers="0:4", calibration=calibration,
                        progress=False)
    run = pipeline.prepare(PruneConfig(ratio=0.3, criterion="hywia:steps=3", layers="0:4",
                                       allocation=f"global:attention_weight={weight}"))
    pipeline.calibrate([run])
    pipeline.score(run)
    ctx, gates_at = captured[0]
    soft, current = gates_at(1e-6, 0)
    keep = ctx.allocate(current)
    closed = sum(int((gate < 0.5).sum()) for (_, kind), gate in soft.items() if kind == "head")
    removed = sum(spec.count - keep[(layer, spec.kind)] for layer, spec in ctx.items() if spec.kind == "head")
    assert (closed == removed == 0) if weight == 1.0 else (removed > 0 and removed / 2 <= closed <= 2 * removed)


def test_the_default_round_to_is_resolved_per_model_and_recorded(tiny_model_factory, tiny_tokenizer, calibration):
    wide = Pipeline(tiny_model_factory("llama"), tiny_tokenizer, layers="0:4", calibration=calibration)
    prepared = wide.prepare(PruneConfig(ratio=0.3, allocation="uniform", layers="0:4"))
    assert prepared.resolved().round_to == 8  # the recipe holds the value used, not "default"
    assert all(v % 8 == 0 for (_, kind), v in prepared.keep.items() if kind == "mlp")
    # an MLP of 8 channels: the default rounds nothing there instead of refusing; a given 8 is refused
    narrow = Pipeline(tiny_model_factory("llama", mlp=8), tiny_tokenizer, layers="0:4",
                      calibration=calibration)
    assert narrow.prepare(PruneConfig(ratio=0.2, layers="0:4")).resolved().round_to == 1
    with pytest.raises(InvalidRequestError, match="--round-to 8 is not below the MLP width of layer 0"):
        narrow.prepare(PruneConfig(ratio=0.2, layers="0:4", round_to=8))


def test_a_profile_search_moves_the_global_profile_at_the_same_share(tiny_model_factory, tiny_tokenizer,
                                                                     calibration):
    """`--allocation search` starts from the global allocation's counts and removes exactly as many parameters;
    the report says what the search found, and the kept MLP widths stay multiples of --round-to."""
    model = tiny_model_factory("llama", heads=8, kv_heads=2, layers=6, mlp=128)
    pipeline = Pipeline(model, tiny_tokenizer, layers="1:5", calibration=calibration, progress=False)
    searched, start = (pipeline.prepare(PruneConfig(ratio=0.3, criterion="magnitude", allocation=allocation,
                                                    layers="1:5"))
                       for allocation in ("search:generations=8:windows=2:levels=4", "global"))
    pipeline.calibrate([searched, start])
    found, reference = pipeline.run(searched, in_place=False), pipeline.run(start, in_place=False)
    before = pipeline.adapter.num_decoder_params()
    params = model.num_parameters()
    record, global_record = (pipeline.summary(r, before, params) for r in (found, reference))
    assert record["decoder_params_after"] == global_record["decoder_params_after"]
    search = record["profile_search"]
    assert search["kl"] <= search["start_kl"] and search["evaluations"] > 0
    assert (found.plan != reference.plan) == bool(search["moved"])
    assert all(len(kept) % 8 == 0 for kinds in found.plan.layers.values() for kind, kept in kinds.items()
               if kind == "mlp")
    assert "profile_search" not in global_record


def test_self_calibration_continues_the_mix_sources_windows(tiny_model_factory, tiny_tokenizer):
    from hywia.data.generated import PREFIX_TOKENS
    from hywia.data.text import GENERATED_DESCRIPTION, calibration_source, calibration_windows

    result = prune(tiny_model_factory("llama"), tokenizer=tiny_tokenizer, ratio=0.3, calib="self", calib_samples=3,
                   seq_len=24, ppl_text=None, progress=False, layers="0:4", criterion="magnitude")
    assert result.report["calibration"]["text"] == GENERATED_DESCRIPTION
    pipeline = Pipeline(tiny_model_factory("llama"), tiny_tokenizer, layers="0:4", progress=False,
                        calibration=CalibrationConfig(calib="self", calib_samples=3, seq_len=24))
    windows = pipeline.windows()
    mix = calibration_windows(tiny_tokenizer, calibration_source("mix")[1], 4, 24, 0)
    assert windows.shape == (3, 24)
    assert all(window[:PREFIX_TOKENS].tolist() in mix[:, :PREFIX_TOKENS].tolist() for window in windows)
    assert not torch.equal(windows, mix[:3])  # the rest is the model's own
