"""The calibration runner below both scoring and pruning: stored layer inputs and the calls that replay them."""

from .capture import LayerCall, capture_layer_inputs, replay_start
from .store import STORES, ActivationStore

__all__ = ["STORES", "ActivationStore", "LayerCall", "capture_layer_inputs", "replay_start"]
