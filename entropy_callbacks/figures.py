"""Pictures of a run and of a probe experiment (matplotlib, drawn off-screen)."""

from __future__ import annotations

import math
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display; figures go to PNG files and TensorBoard

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from .estimators import t_quantile  # noqa: E402
from .step_probe import ProbeRecord  # noqa: E402


def _usable(records: Sequence[ProbeRecord]) -> list[ProbeRecord]:
    return [r for r in records if not r.skipped and math.isfinite(r.delta_measured) and math.isfinite(r.delta_linear)]


def calibration_figure(records: Sequence[ProbeRecord]):
    """Predicted against measured ΔH per probe, the measurement's 95 % band (± t·SE), y = x,
    coloured by step."""
    usable = _usable(records)
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    if usable:
        predicted = [r.delta_quadratic if r.delta_quadratic is not None else r.delta_linear for r in usable]
        measured = [r.delta_measured for r in usable]
        ax.errorbar(predicted, measured, yerr=[t_quantile(r.dof) * r.delta_measured_se for r in usable], fmt="none",
                    ecolor="0.75", elinewidth=0.8, zorder=1)
        points = ax.scatter(predicted, measured, c=[r.step for r in usable], cmap="viridis", s=18, zorder=2)
        fig.colorbar(points, ax=ax, label="optimizer step")
        low, high = min(predicted + measured), max(predicted + measured)
        pad = 0.05 * (high - low or abs(high) or 1.0)
        ax.plot([low - pad, high + pad], [low - pad, high + pad], color="crimson", lw=1, label="y = x")
        ax.legend(loc="upper left", frameon=False)
    kind = "quadratic" if usable and usable[0].delta_quadratic is not None else "linear"
    ax.set_xlabel(f"predicted ΔH ({kind}, nats/token)")
    ax.set_ylabel("measured ΔH, 95 % band (nats/token)")
    ax.set_title(f"EntropyProbe calibration ({len(usable)} probes)")
    ax.ticklabel_format(style="sci", scilimits=(-2, 3))
    fig.tight_layout()
    return fig


def entropy_figure(records: Sequence[ProbeRecord]):
    """Ĥ(θ₀) on E at each probe with its 95 % band (± t·SE)."""
    usable = [r for r in records if not r.skipped and math.isfinite(r.entropy_before)]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    if usable:
        steps = [r.step for r in usable]
        value = [r.entropy_before for r in usable]
        half = [t_quantile(r.dof) * r.entropy_before_se for r in usable]
        half = [h if math.isfinite(h) else 0.0 for h in half]
        ax.fill_between(steps, [v - h for v, h in zip(value, half)], [v + h for v, h in zip(value, half)],
                        color="tab:blue", alpha=0.25, lw=0, label="95 % band")
        ax.plot(steps, value, color="tab:blue", lw=1.5, label="Ĥ on E")
        ax.legend(frameon=False)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("entropy (nats/token)")
    ax.set_title("Policy entropy on the held-out batch E")
    fig.tight_layout()
    return fig


def scale_figure(scales: Sequence[float], measured: Sequence[float], measured_se: Sequence[float],
                 linear: Sequence[float], quadratic: Sequence[float | None]):
    """|ΔH| against the step scale s on log–log axes: measured (± SE band), linear, quadratic."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=110)
    ok = [k for k, m in enumerate(measured) if math.isfinite(m) and m != 0]
    if ok:
        s = [scales[k] for k in ok]
        m = [abs(measured[k]) for k in ok]
        se = [measured_se[k] if math.isfinite(measured_se[k]) else 0.0 for k in ok]
        ax.fill_between(s, [max(v - e, v * 1e-3) for v, e in zip(m, se)], [v + e for v, e in zip(m, se)],
                        color="tab:blue", alpha=0.25, lw=0, label="measured ± SE")
        ax.plot(s, m, "o-", color="tab:blue", label="measured")
    ax.plot(scales, [abs(v) for v in linear], "--", color="tab:orange", label="linear  s·g′")
    if all(q is not None for q in quadratic):
        ax.plot(scales, [abs(q) for q in quadratic], ":", color="tab:green", lw=2, label="quadratic")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(list(scales), [f"{x:g}" for x in scales])  # the sweep's scales, not log minor ticks
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("step scale s")
    ax.set_ylabel("|ΔH| (nats/token)")
    ax.set_title("Entropy change against step scale")
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    fig.savefig(path)
    plt.close(fig)
