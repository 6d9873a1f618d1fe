"""A saved pruned folder loads with transformers alone (trust_remote_code=True), and still without remote code where
hywia is imported."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM

import hywia  # noqa: F401  (registers the pruned classes)
from hywia.io import save_model
from hywia.io.remote_code import MODEL_TYPES
from hywia.models import mark_pruned, pruned_classes
from hywia.models.surgery import add_bias
from test_save_load import _pruned

# Runs with `python -I` (no cwd, no PYTHONPATH) and a meta-path hook that refuses hywia, whose editable install
# would otherwise still be importable from site-packages. Arguments: ids.npy, then folder/logits.npy pairs.
CHILD = r"""
import sys

class NoHywia:
    def find_spec(self, name, path=None, target=None):
        if name == "hywia" or name.startswith("hywia."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, NoHywia())
try:
    import hywia
except ModuleNotFoundError:
    pass
else:
    sys.exit("hywia is importable")

import numpy as np
import torch
from transformers import AutoModelForCausalLM

ids = torch.from_numpy(np.load(sys.argv[1]))
for folder, logits_file in zip(sys.argv[2::2], sys.argv[3::2]):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    print(type(model).__name__, model.config.model_type)
    with torch.no_grad():
        np.save(logits_file, model(input_ids=ids).logits.numpy())
assert not any(name == "hywia" or name.startswith("hywia.") for name in sys.modules)
"""


def _compensated(model):
    """A pruned model whose layer-1 output projection got a bias its config does not declare (--compensate)."""
    with torch.no_grad():
        add_bias(model.model.layers[1].self_attn.o_proj)
        model.model.layers[1].self_attn.o_proj.bias.normal_(0, 0.1)
    mark_pruned(model)
    return model


def test_pruned_folders_load_with_transformers_alone(tiny_model_factory, tmp_path):
    dense = tiny_model_factory("llama", heads=4, kv_heads=2)
    dense.save_pretrained(tmp_path / "dense")  # pruned after loading, as `hywia prune` does
    models = {
        "llama": _pruned(AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()),
        "mistral": _pruned(tiny_model_factory("mistral", heads=4, kv_heads=2), attention="kv"),
        "qwen2": _pruned(tiny_model_factory("qwen2", heads=4, kv_heads=2)),
        "compensated": _compensated(_pruned(tiny_model_factory("llama", heads=4, kv_heads=2))),
    }
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "ids.npy", ids.numpy())
    args = []
    for name, model in models.items():
        save_model(model, None, tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["auto_map"] == {"AutoConfig": f"configuration_hywia.{type(model.config).__name__}",
                                      "AutoModelForCausalLM": f"modeling_hywia.{type(model).__name__}"}
        args += [str(tmp_path / name), str(tmp_path / f"{name}.npy")]
    child = subprocess.run([sys.executable, "-I", "-c", CHILD, str(tmp_path / "ids.npy"), *args],
                           capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.splitlines() == [f"{type(m).__name__} {type(m.config).model_type}" for m in models.values()]
    for name, model in models.items():
        with torch.no_grad():
            expected = model(input_ids=ids).logits.numpy()
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), expected, atol=1e-5, rtol=0)
        # with hywia imported, its registered class loads the folder: no trust_remote_code, no remote code run
        local = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        assert type(local) is type(model)


def test_dense_folder_gets_no_remote_code(tiny_model_factory, tmp_path):
    save_model(tiny_model_factory("llama"), None, tmp_path / "out")
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert not list((tmp_path / "out").glob("*.py"))


def test_remote_classes_mirror_the_registered_ones():
    from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    from hywia.io.remote_code import configuration_hywia, modeling_hywia

    model_types = set()
    for family in (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM):
        config_cls, model_cls = pruned_classes(family)
        remote_model = getattr(modeling_hywia, model_cls.__name__)
        assert remote_model.__bases__ == (family,)
        assert remote_model.config_class is getattr(configuration_hywia, config_cls.__name__)
        assert remote_model.config_class.model_type == config_cls.model_type
        model_types.add(config_cls.model_type)
    assert model_types == MODEL_TYPES
