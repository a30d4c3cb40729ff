"""The ``entropy-callbacks`` console script.

``entropy-callbacks fit --config configs/toy_grpo.yaml`` is LightningCLI's ``fit`` (any
LightningModule by ``class_path``; the EntropyProbe is a ``trainer.callbacks`` entry), with a
closing summary. ``entropy-callbacks probe --config configs/probe.yaml [--ckpt_path PATH]``
runs controlled one-step experiments from a checkpoint (``experiment.py``).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

from .callback import EntropyProbe
from .experiment import ProbeExperiment, results_table, run_experiment


class MetricHistory(pl.Callback):
    """Keeps the first and last values of the training metrics for the closing summary."""

    def __init__(self, names=("train/reward", "train/entropy"), window: int = 10) -> None:
        self.names, self.window = names, window
        self.values: dict[str, list[float]] = {n: [] for n in names}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for name in self.names:
            value = trainer.callback_metrics.get(name)
            if value is not None:
                self.values[name].append(float(value))

    def start_end(self, name: str) -> tuple[float, float]:
        values = self.values.get(name) or []
        if not values:
            return math.nan, math.nan
        head, tail = values[: self.window], values[-self.window:]
        return sum(head) / len(head), sum(tail) / len(tail)


class ConfigError(ValueError):
    """A configuration that cannot be instantiated (bad value, missing file)."""


def _reasons(error: Exception) -> list[str]:
    """The user-facing reasons inside jsonargparse's 'Does not validate against any of the Union
    subtypes' wrapper (it lists one line per candidate type; keep the ones raised by our code)."""
    noise = ("Expected a ", "Not a valid subclass", "Does not validate against")
    return [line[4:].strip() for line in str(error).splitlines()
            if line.startswith("  - ") and not line[4:].startswith(noise)]


class _CLI(LightningCLI):
    """LightningCLI whose config errors name the bad field in one line, before anything runs."""

    def parse_arguments(self, parser, args) -> None:
        # main() always passes the arguments explicitly (sys.argv[1:] from the console script),
        # so LightningCLI's warning about args *and* sys.argv does not apply.
        if isinstance(args, dict):
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args(args)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:
            reasons = _reasons(error)
            raise ConfigError("; ".join(reasons) if reasons else str(error)) from error


class FitCLI(_CLI):
    def before_fit(self) -> None:
        self.history = MetricHistory()
        self.trainer.callbacks.append(self.history)
        for callback in self.trainer.callbacks:
            if isinstance(callback, EntropyProbe):
                callback.print_summary = False  # after_fit prints one combined table

    def after_fit(self) -> None:
        if not self.trainer.is_global_zero:
            return
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        lines = ["", f"Logs: {Path(log_dir).resolve()}",
                 f"Open them with:  tensorboard --logdir {Path(log_dir).resolve()}", "",
                 f"{'':24}{'start':>10}{'end':>10}"]
        for name in ("train/reward", "train/entropy"):
            start, end = self.history.start_end(name)
            lines.append(f"{name:24}{start:>10.3f}{end:>10.3f}")
        probe = next((c for c in self.trainer.callbacks if isinstance(c, EntropyProbe)), None)
        if probe is not None and probe.calibration.history:
            lines += ["", probe.summary_table()]
        print("\n".join(lines))


class ProbeCLI(_CLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(ProbeExperiment, "experiment")
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="Lightning checkpoint to start from (default: the model's initial state)")


def probe_main(args: list[str]) -> Path:
    cli = ProbeCLI(pl.LightningModule, subclass_mode_model=True, run=False, args=args,
                   save_config_callback=None, trainer_defaults={"logger": False},
                   parser_kwargs={"prog": "entropy-callbacks probe", "description": PROBE_HELP})
    experiment = cli.config_init.experiment
    ckpt_path = cli.config.ckpt_path
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path {ckpt_path!r} is not a file; give a Lightning checkpoint (.ckpt)")
    config_text = cli.parser.dump(cli.config, skip_none=False)
    out = run_experiment(cli.model, experiment, ckpt_path, config_text)
    results = json.loads((out / "results.json").read_text())
    print(results_table(results))
    print(f"\nResults: {out.resolve()}")
    return out


FIT_HELP = ("Train any LightningModule with LightningCLI (e.g. `entropy-callbacks fit --config "
            "configs/toy_grpo.yaml`); the run ends with a summary. One-step experiments from a "
            "checkpoint: `entropy-callbacks probe --help`.")
PROBE_HELP = ("Controlled one-step experiments: for each trial the module and optimizer are restored from "
              "--ckpt_path (or the initial state), a fresh update batch is drawn, one real optimizer step is "
              "taken, and the entropy change is predicted and measured on the same held-out batch at every "
              "scale.")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["probe"]:
            probe_main(args[1:])
        else:
            FitCLI(pl.LightningModule, subclass_mode_model=True, args=args,
                   save_config_kwargs={"overwrite": True}, parser_kwargs={"description": FIT_HELP})
    except ConfigError as error:
        print(f"entropy-callbacks: error: invalid configuration: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
