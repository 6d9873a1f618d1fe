"""The calibration runner's pieces: the per-sample store and the recorded layer calls."""

import torch

from hywia.calibration import ActivationStore, LayerCall


def test_disk_store_round_trip_and_cleanup(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    store = ActivationStore(on_disk=True)
    first = torch.randn(3, 5, dtype=torch.bfloat16)
    store.put(7, 0, first)
    store.put(7, 1, torch.randn(2, 2))
    torch.testing.assert_close(store.get(7, 0, torch.device("cpu")), first, atol=0, rtol=0)
    replaced = torch.randn(4, 4)  # another size: appended, the index points at it
    store.put(7, 0, replaced)
    torch.testing.assert_close(store.get(7, 0, torch.device("cpu")), replaced, atol=0, rtol=0)
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_equal_call_arguments_are_stored_once():
    """Windows of one length share positions and masks: the stored calls must not grow with the samples."""
    cos, sin = torch.randn(1, 8, 4), torch.randn(1, 8, 4)
    first = LayerCall((), {"position_embeddings": (cos, sin), "attention_mask": None}, True)
    second = LayerCall((), {"position_embeddings": (cos.clone(), sin + 1), "attention_mask": None}, True).sharing(first)
    assert second.kwargs["position_embeddings"][0] is cos
    assert not torch.equal(second.kwargs["position_embeddings"][1], sin)
    assert second.kwargs["attention_mask"] is None and second.positional
