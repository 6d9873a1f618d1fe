"""`--calib self`: windows the model writes itself, seeded, the least likely dropped."""

import torch

from hywia.data.generated import PREFIX_TOKENS, generated_windows, prefix_windows_needed


def _prefixes(count: int) -> torch.Tensor:
    return torch.randint(3, 300, (count, PREFIX_TOKENS), generator=torch.Generator().manual_seed(7))


def _mean_nll(model, window: torch.Tensor) -> float:
    logits = model(input_ids=window[None]).logits[0, :-1]
    return float(torch.nn.functional.cross_entropy(logits, window[1:]))


def test_the_same_seed_writes_the_same_windows_and_leaves_the_callers_random_state(tiny_model_factory,
                                                                                    tiny_tokenizer):
    model, prefixes = tiny_model_factory("llama"), _prefixes(5)
    state = torch.get_rng_state()
    first = generated_windows(model, tiny_tokenizer, prefixes, 4, 24, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.shape == (4, 24)
    assert torch.equal(first, generated_windows(model, tiny_tokenizer, prefixes, 4, 24, seed=0))
    assert not torch.equal(first, generated_windows(model, tiny_tokenizer, prefixes, 4, 24, seed=1))
    starts = [prefixes.tolist().index(window[:PREFIX_TOKENS].tolist()) for window in first]
    assert starts == sorted(starts)  # each window continues a prefix, in the order written


def test_the_least_likely_windows_are_the_ones_dropped(tiny_model_factory, tiny_tokenizer):
    model, prefixes = tiny_model_factory("llama"), _prefixes(prefix_windows_needed(4))
    assert prefixes.shape[0] == 5
    written = generated_windows(model, tiny_tokenizer, prefixes, 5, 24, seed=0)  # every window written is kept
    kept = generated_windows(model, tiny_tokenizer, prefixes, 4, 24, seed=0)
    with torch.no_grad():
        nll = torch.tensor([_mean_nll(model, window) for window in written])
    assert torch.equal(kept, written[torch.arange(5) != nll.argmax()])
