"""entropy-callbacks: predict (JVP) and measure (SNIS) the policy-entropy change of RL steps."""

from .attribution import attribute_delta_h
from .engine import entropy_estimate, measure_delta_h, predict_delta_h
from .results import Attribution, Estimate, Measurement, Prediction
from .sampling import DecodeOptions, ProbeBatch, SamplingConfig, sample_batch

__all__ = [
    "SamplingConfig", "ProbeBatch", "sample_batch", "DecodeOptions",
    "entropy_estimate", "predict_delta_h", "measure_delta_h", "attribute_delta_h",
    "Estimate", "Prediction", "Measurement", "Attribution",
    "EntropyProbe",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The Lightning callback is imported on first use, so the math and the functions work (and
    # import fast) without Lightning.
    if name == "EntropyProbe":
        from .callback import EntropyProbe

        return EntropyProbe
    raise AttributeError(f"module 'entropy_callbacks' has no attribute {name!r}")
