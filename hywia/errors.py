"""Errors a user can act on: the CLI prints their message alone, without a traceback."""


class HywiaError(Exception):
    """Base of every user-facing error."""


class UnsupportedModelError(HywiaError):
    pass


class InvalidRequestError(HywiaError):
    """A flag or argument that cannot be honoured (ratio out of range, a ratio that empties a layer, ...)."""


class ModelLoadError(HywiaError):
    pass


class CalibrationError(HywiaError):
    """Calibration text is missing, too short, or produced non-finite gradients."""


class NonFiniteWeightsError(HywiaError):
    """A weight holds NaN or Inf: nothing is computed from it or written."""
