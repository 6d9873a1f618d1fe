"""hywia: structured pruning of LLMs with Hybrid-grained Weight Importance Assessment.

Importing the package registers the pruned-model classes with transformers' Auto classes, so a pruned folder
loads with `AutoModelForCausalLM.from_pretrained`.
"""

from . import models  # noqa: F401  (registers adapters and pruned classes)
from .api import PruneResult, apply, prune
from .errors import HywiaError
from .eval.api import evaluate

__version__ = "0.1.0"
__all__ = ["HywiaError", "PruneResult", "TuneResult", "apply", "evaluate", "prune", "tune", "__version__"]


def __getattr__(name: str):
    """`hywia.tune` (LoRA recovery) and its TuneResult, imported on first use: peft and Trainer add seconds to
    every `import hywia` otherwise."""
    if name in ("tune", "TuneResult"):
        from .recovery import api

        return api.tune_model if name == "tune" else api.TuneResult
    raise AttributeError(f"module 'hywia' has no attribute {name!r}")
