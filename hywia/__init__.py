"""hywia: structured pruning of LLMs with Hybrid-grained Weight Importance Assessment.

Importing the package registers the pruned-model classes with transformers' Auto classes, so a pruned folder
loads with `AutoModelForCausalLM.from_pretrained`.
"""

from . import models  # noqa: F401  (registers adapters and pruned classes)
from .api import PruneResult, prune
from .errors import HywiaError

__version__ = "0.1.0"
__all__ = ["HywiaError", "PruneResult", "prune", "__version__"]
