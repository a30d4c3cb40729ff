"""Calibration of the prediction over a run, with torchmetrics.

Every probe adds one (predicted, measured) pair. Records are already combined across DDP ranks
before they arrive here (every rank holds the same pairs), so the metrics compute locally.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import MeanAbsoluteError, MeanMetric, PearsonCorrCoef

from .estimators import t_quantile


class Calibration:
    """Pearson r and MAE of linear and quadratic predictions against measured ΔH, the share
    of probes where the sign agrees, and the share where the prediction lies in the measurement's
    95 % band, ± t_{0.975, G−1}·SE (``coverage_95``)."""

    def __init__(self) -> None:
        self.history: list[tuple[float, float | None, float, float, int]] = []
        self.non_finite = 0  # pairs left out: a NaN would poison every later value
        self._reset()

    def _reset(self) -> None:
        kw = dict(sync_on_compute=False)
        self.pearson_linear = PearsonCorrCoef(**kw).double()
        self.pearson_quadratic = PearsonCorrCoef(**kw).double()
        self.mae_linear = MeanAbsoluteError(**kw).double()
        self.mae_quadratic = MeanAbsoluteError(**kw).double()
        self.sign_agreement = MeanMetric(**kw).double()
        self.coverage_95 = MeanMetric(**kw).double()
        self._quadratic_count = 0

    def update(self, linear: float, quadratic: float | None, measured: float, measured_se: float,
               dof: int) -> bool:
        """Add one probe (``dof``: its SE's degrees of freedom); False, and counted in
        ``non_finite``, when a value is not finite."""
        if not all(math.isfinite(v) for v in (linear, measured, 0.0 if quadratic is None else quadratic)):
            self.non_finite += 1
            return False
        self.history.append((linear, quadratic, measured, measured_se, dof))
        t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
        self.pearson_linear.update(t(linear), t(measured))
        self.mae_linear.update(t(linear), t(measured))
        best = linear if quadratic is None else quadratic
        if quadratic is not None:
            self.pearson_quadratic.update(t(quadratic), t(measured))
            self.mae_quadratic.update(t(quadratic), t(measured))
            self._quadratic_count += 1
        self.sign_agreement.update(t(float(math.copysign(1, best) == math.copysign(1, measured))))
        band = t_quantile(dof) * measured_se
        if math.isfinite(band):
            self.coverage_95.update(t(float(abs(best - measured) <= band)))
        return True

    def compute(self) -> dict[str, float]:
        n = len(self.history)
        nan = float("nan")
        out = {"count": float(n), "non_finite": float(self.non_finite)}
        # Pearson r of two points is ±1 whatever they are: reported from three on.
        out["pearson_linear"] = float(self.pearson_linear.compute()) if n >= 3 else nan
        out["mae_linear"] = float(self.mae_linear.compute()) if n >= 1 else nan
        q = self._quadratic_count
        out["pearson_quadratic"] = float(self.pearson_quadratic.compute()) if q >= 3 else nan
        out["mae_quadratic"] = float(self.mae_quadratic.compute()) if q >= 1 else nan
        out["sign_agreement"] = float(self.sign_agreement.compute()) if n >= 1 else nan
        out["coverage_95"] = float(self.coverage_95.compute()) if self.coverage_95.update_count else nan
        return out

    def state_dict(self) -> dict:
        return {"history": [list(h) for h in self.history], "non_finite": self.non_finite}

    def load_state_dict(self, state: dict) -> None:
        self.history = []
        self._reset()
        for linear, quadratic, measured, se, *dof in state.get("history", []):
            # a checkpoint from before SEs carried their dof: its bands were ± 2 SE, i.e. dof ≈ 50
            self.update(linear, quadratic, measured, se, dof[0] if dof else 50)
        self.non_finite = int(state.get("non_finite", 0))
