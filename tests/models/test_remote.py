"""The modeling files pruned folders carry (hywia.models.remote): self-contained, and the classes hywia registers.

Loading each family's pruned folder without hywia is checked in test_families; here, what makes that possible."""

from __future__ import annotations

import ast
import importlib
import json

import pytest

import hywia  # noqa: F401  (registers the pruned classes)
from family_checks import tiny_family_configs, tiny_family_model
from hywia.io import save_model
from hywia.models import adapter_for
from hywia.models.pruned import base_class, pruned_classes
from hywia.models.remote import DIR, module_files


def test_dense_folder_gets_no_remote_code(tiny_model_factory, tmp_path):
    save_model(tiny_model_factory("llama"), None, tmp_path / "out")
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert not list((tmp_path / "out").glob("*.py"))


@pytest.mark.parametrize("path", sorted(DIR.glob("hywia_*.py")), ids=lambda p: p.name)
def test_remote_files_import_only_torch_transformers_and_each_other(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 or isinstance(node, ast.Import):
            roots = {(node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
                     for alias in node.names}
            assert roots <= {"__future__", "collections", "math", "torch", "transformers", "huggingface_hub"}, roots
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 1 and (DIR / f"{node.module}.py").is_file(), node.module


@pytest.mark.parametrize("case", list(tiny_family_configs()))
def test_remote_classes_mirror_the_registered_ones(case):
    model = tiny_family_model(case)
    family = base_class(type(model))
    config_cls, model_cls = pruned_classes(family)
    module_name = adapter_for(model).remote_module
    remote = importlib.import_module(f"hywia.models.remote.{module_name}")
    remote_model = getattr(remote, model_cls.__name__)
    assert remote_model.__bases__ == (family,)
    assert remote_model.config_class is getattr(remote, config_cls.__name__)
    assert remote_model.config_class.model_type == config_cls.model_type
    assert module_files(module_name)[0] == DIR / f"{module_name}.py"
