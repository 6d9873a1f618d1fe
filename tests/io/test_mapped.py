"""Pages of memory-mapped weights that surgery replaced are handed back, and nothing still in use is touched."""

import mmap

import pytest
import torch
from transformers import AutoModelForCausalLM

from hywia.io import mapped
from hywia.pipeline import Pipeline
from hywia.settings import CalibrationConfig, PruneConfig

pytestmark = pytest.mark.skipif(mapped.private_file_mappings() == [] or mapped._MADVISE is None,
                                reason="needs /proc/self/maps and madvise (Linux)")


def _mapped_model(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    weight = model.model.layers[1].mlp.down_proj.weight
    start = weight.untyped_storage().data_ptr()
    if not any(low <= start < high for low, high in mapped.private_file_mappings()):
        pytest.skip("this transformers version does not memory-map safetensors weights")
    return model


def test_released_pages_read_the_file_again(tiny_folder):
    """Releasing drops the process's pages: an in-place edit is gone and the file's values are back."""
    model = _mapped_model(tiny_folder)
    weight = model.model.layers[1].mlp.down_proj.weight.detach()
    original = weight.clone()
    weight += 1.0  # the edited pages become private copies
    start = weight.data_ptr()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only: the partial ones at both ends stay
    released = mapped.release_pages(weight, mapped.private_file_mappings())
    assert released >= mmap.PAGESIZE
    begin = (first - start) // weight.element_size()
    end = begin + released // weight.element_size()
    flat, before = weight.flatten(), original.flatten()
    assert torch.equal(flat[begin:end], before[begin:end])
    assert torch.equal(flat[:begin], before[:begin] + 1.0) and torch.equal(flat[end:], before[end:] + 1.0)


def test_memory_of_the_process_is_never_released():
    tensor = torch.randn(64, 1024)
    copy = tensor.clone()
    assert mapped.release_pages(tensor, mapped.private_file_mappings()) == 0
    assert torch.equal(tensor, copy)


def test_only_replaced_tensors_that_nobody_holds_are_released(tiny_folder, monkeypatch):
    model = _mapped_model(tiny_folder)
    mlp = model.model.layers[1].mlp
    held = mlp.up_proj.weight  # a user's reference: it must keep what was written to it
    untouched = mlp.gate_proj.weight
    calls = []
    monkeypatch.setattr(mapped, "release_pages", lambda tensor, spans: calls.append(tuple(tensor.shape)) or 0)
    with mapped.released_when_replaced(mlp):
        for name in ("up_proj", "down_proj"):
            linear = getattr(mlp, name)
            linear.weight = torch.nn.Parameter(linear.weight.detach()[:, :8].clone())
    assert calls == [(model.config.hidden_size, model.config.intermediate_size)]  # down_proj's old weight only
    assert mlp.gate_proj.weight is untouched


def test_a_held_replaced_tensor_keeps_its_values(tiny_folder):
    model = _mapped_model(tiny_folder)
    mlp = model.model.layers[1].mlp
    held = mlp.up_proj.weight
    with torch.no_grad():
        held += 1.0
    edited = held.detach().clone()
    with mapped.released_when_replaced(mlp):
        mlp.up_proj.weight = torch.nn.Parameter(held.detach()[:, :8].clone())
    assert torch.equal(held, edited)


def test_a_cut_of_a_memory_mapped_model_equals_the_cut_of_a_copy(tiny_folder):
    """Compensation edits mapped pages in place and the cut releases them: the result is unchanged."""
    windows = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    logits = []
    for copy in (False, True):
        model = _mapped_model(tiny_folder)
        if copy:  # every weight in the process's own memory
            for param in model.parameters():
                param.data = param.data.clone()
        pipeline = Pipeline(model, None, layers="0:4", calibration=CalibrationConfig(calib_samples=8, seq_len=32),
                            windows=windows, progress=False)
        run = pipeline.prepare(PruneConfig(ratio=0.1, layers="0:4", criterion="magnitude", compensate="lstsq"))
        pipeline.calibrate([run])
        pipeline.run(run, in_place=True)
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    assert torch.equal(logits[0], logits[1])
