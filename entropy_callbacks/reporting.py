"""What a probe shows the user: TensorBoard charts and text, the JSONL file, the end-of-fit
summary. The callback decides when; this module decides what it looks like."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from .estimators import t_quantile
from .metrics import Calibration
from .step_probe import ProbeRecord


SERIES_DIR = "delta_H"  # under the logger's directory: one TensorBoard run per ΔH series
SMALL_G = 8  # fewer prompt groups than this: the SEs themselves are too uncertain to lean on


def small_g_message(who: str, groups: int) -> str:
    t = t_quantile(groups - 1)
    return (f"{who} has {groups} held-out prompt(s): its standard errors have {groups - 1} degree(s) of freedom, "
            f"so a 95 % band is ± {t:.2f}·SE and each SE is itself uncertain; use {SMALL_G} or more prompts "
            "(docs/method.md §5)")


def custom_scalars_layout(prefix: str) -> dict:
    """TensorBoard's custom-scalars charts. Multiline tags are regexes that TensorBoard matches at
    the start of every tag (``re.match``), so each is escaped and anchored to exactly one tag.
    "ΔH predicted vs measured" draws the one tag ``<prefix>delta`` of the runs ``delta_H/measured``,
    ``/linear`` and ``/quadratic`` (``SeriesRuns``): TensorBoard colours a chart's lines by run."""
    tag = lambda name: f"^{re.escape(prefix + name)}$"  # noqa: E731
    margin = lambda name: [prefix + name, prefix + name + "_lower", prefix + name + "_upper"]  # noqa: E731
    return {prefix.rstrip("/"): {
        "ΔH predicted vs measured": ["Multiline", [tag("delta")]],
        "ΔH measured, 95 % band (± t·SE, G − 1 dof)": ["Margin", margin("delta_measured")],
        "Entropy Ĥ, 95 % band (± t·SE, G − 1 dof)": ["Margin", margin("before")],
        "Relative Taylor error |measured − predicted| / |measured|": ["Multiline", [tag("taylor_error_relative")]],
    }}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or " "


def samples_markdown(batch_e, record: ProbeRecord, count: int, responses_per_prompt: int, decode=str) -> str:
    """A markdown table of ``count`` responses of E from as many different prompts, spread over
    E, each the response of its prompt that carries the most of the predicted change, with its
    contribution a_i to g′(0), its SNIS weight at s = 1 (relative to the mean) and its length.

    Rows of ``record`` are prompt-major with R responses each (also when gathered from DDP
    ranks), so response r of prompt g sits at g·R + r; ``batch_e`` may be one rank's share.
    """
    groups = sorted({int(g) for g in batch_e.group.tolist()})
    picks = min(count, len(groups))
    chosen = dict.fromkeys(groups[round(k * (len(groups) - 1) / max(picks - 1, 1))] for k in range(picks))
    rows = ["| prompt | response | a_i (share of g′) | SNIS weight | tokens |", "|---|---|---|---|---|"]
    for g in chosen:
        index = {i: g * responses_per_prompt + int(batch_e.response_index[i])
                 for i in range(len(batch_e)) if int(batch_e.group[i]) == g}
        best = max(index, key=lambda i: abs(record.per_sequence_linear[index[i]]))
        a = record.per_sequence_linear[index[best]]
        share = f"{a / record.delta_linear:+.0%}" if record.delta_linear else "—"
        weight = record.per_sequence_weight[index[best]] if record.per_sequence_weight else math.nan
        prompt_ids = batch_e.input_ids[best][batch_e.attention_mask[best].bool() & ~batch_e.response_mask[best]]
        response_ids = batch_e.input_ids[best][batch_e.response_mask[best]]
        rows.append(f"| {g}: `{_cell(decode(prompt_ids.tolist()))}` | `{_cell(decode(response_ids.tolist()))}` "
                    f"| {a:+.2e} ({share}) | {weight:.3f} | {len(response_ids)} |")
    return "\n".join(rows)


def summary_table(calibration: Calibration, order: int, probe_errors: int, skipped_steps: int) -> str:
    """The end-of-fit table; "—" where a number is not defined yet (Pearson r below 3 probes)."""
    c = calibration.compute()
    quadratic = order == 2
    number = lambda value, spec: "—" if math.isnan(value) else format(value, spec)  # noqa: E731
    counts = f"errors {probe_errors}, skipped {skipped_steps}, non-finite {int(c['non_finite'])}"
    lines = ["EntropyProbe calibration over the run", f"  probes                 {int(c['count'])}  ({counts})"]
    if not c["count"]:
        lines.append("  no probe gave a usable pair of prediction and measurement"
                     + ("; every probe failed (see the warnings)" if probe_errors else ""))
        return "\n".join(lines)
    lines.append(f"  Pearson r  linear      {number(c['pearson_linear'], '.4f')}")
    if quadratic:
        lines.append(f"  Pearson r  quadratic   {number(c['pearson_quadratic'], '.4f')}")
    lines.append(f"  MAE        linear      {number(c['mae_linear'], '.3e')}")
    if quadratic:
        lines.append(f"  MAE        quadratic   {number(c['mae_quadratic'], '.3e')}")
    lines += [f"  sign agreement         {number(c['sign_agreement'], '.3f')}   "
              f"(of the {'quadratic' if quadratic else 'linear'} prediction)",
              f"  in the 95 % t band     {number(c['coverage_95'], '.3f')}   (|pred - meas| <= t(G-1)·SE)"]
    return "\n".join(lines)


class SeriesRuns:
    """ΔH measured, linear and quadratic as one tag in three runs under ``<log_dir>/delta_H``, so
    that one chart shows them in three colours (the main run keeps its own tags too)."""

    def __init__(self, log_dir: Path, prefix: str) -> None:
        self.root, self.prefix, self.writers = Path(log_dir) / SERIES_DIR, prefix, {}

    def log(self, record: ProbeRecord) -> None:
        from torch.utils.tensorboard import SummaryWriter

        for series, value in (("measured", record.delta_measured), ("linear", record.delta_linear),
                              ("quadratic", record.delta_quadratic)):
            if value is None or not math.isfinite(value):
                continue
            if series not in self.writers:
                self.writers[series] = SummaryWriter(str(self.root / series))
            self.writers[series].add_scalar(f"{self.prefix}delta", value, record.step)
            self.writers[series].flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


class JsonlFile:
    """Every probe record as one strict-JSON line, tagged with the run that wrote it."""

    def __init__(self, path: Path, run_id: str) -> None:
        self.path, self.run_id = Path(path), run_id

    def start(self, step: int) -> None:
        """A fresh run (step 0) starts the file anew; a resumed one keeps the records before the
        step it resumes from and drops the abandoned branch's later ones."""
        if not self.path.exists():
            return
        kept = [] if step == 0 else [line for line in self.path.read_text().splitlines()
                                     if line.strip() and json.loads(line)["step"] < step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def append(self, record: ProbeRecord) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"run_id": self.run_id, **record.to_json()}, allow_nan=False) + "\n")


def log_to_tensorboard(writer, prefix: str, record: ProbeRecord, batch_e, samples: int, responses_per_prompt: int,
                       decode=str) -> None:
    """The per-probe extras beyond scalars: a histogram of the a_i and the text samples.

    The histogram holds each a_i as a percentage of |g′(0)| (they sum to ±100): raw a_i of
    1e-7…1e-4 nats give TensorBoard axis labels too long to read."""
    if record.delta_linear:
        shares = torch.tensor(record.per_sequence_linear, dtype=torch.float64) * (100 / abs(record.delta_linear))
        writer.add_histogram(f"{prefix}per_sequence_share_pct", shares, record.step)
    if samples and batch_e is not None:
        writer.add_text(f"{prefix}samples", samples_markdown(batch_e, record, samples, responses_per_prompt, decode),
                        record.step)
    if record.rollout_a and record.attribution_linear:
        # In % of Σ|a_u|, not of the linear prediction: GRPO's advantages cancel within each group,
        # so the prediction can be a small remainder of large a_u (shares of ±40000 % of it seen).
        a = torch.tensor(record.rollout_a, dtype=torch.float64)
        if float(a.abs().sum()) > 0:  # all 0 when every advantage is 0
            writer.add_histogram(f"{prefix}attribution/rollout_share_of_abs_pct", a * (100 / a.abs().sum()),
                                 record.step)
        writer.add_text(f"{prefix}attribution/top_rollouts", top_rollouts_markdown(record), record.step)


def top_rollouts_markdown(record: ProbeRecord) -> str:
    """The update batch's samples that carried most of the predicted change (docs/method.md §6)."""
    rows = [f"momentum {record.attribution_momentum / record.attribution_linear:+.0%}, weight decay "
            f"{record.attribution_weight_decay / record.attribution_linear:+.0%}, residual "
            f"{record.attribution_residual / record.attribution_linear:+.1%} of the linear prediction "
            f"{record.attribution_linear:+.3e}", "",
            "| rollout | text | a_u (share) | reward | advantage |", "|---|---|---|---|---|"]
    number = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    for row in record.top_rollouts:
        text = "—" if row["text"] is None else f"`{_cell(row['text'])}`"
        rows.append(f"| {row['rollout']} | {text} | {row['a']:+.2e} ({row['a'] / record.attribution_linear:+.0%}) "
                    f"| {number(row['reward'], '.3f')} | {number(row['advantage'], '+.3f')} |")
    return "\n".join(rows)
