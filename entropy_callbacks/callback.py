"""EntropyProbe: the Lightning front end of ``StepProbe``.

The callback finds the policy (and tokenizer) on the LightningModule, shards the prompts over
DDP ranks, calls ``StepProbe.begin`` just before a real optimizer step and ``finish`` right
after it, and logs the record. Everything numerical happens in the framework-free core.
"""

from __future__ import annotations

import collections
import math
import operator
import re
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from .metrics import Calibration
from .model_guard import preserved_rng
from .policy import check_trainable, resolve_policy, sampling_mismatch, special_tokens, token_id
from .prompts import load_prompts, tokenize_prompts
from .reporting import (SMALL_G, JsonlFile, SeriesRuns, custom_scalars_layout, log_to_tensorboard, small_g_message,
                        summary_table)
from .sampling import DecodeOptions, ProbeBatch, SamplingConfig, check_sampling_inputs
from .attribution import attribute_delta_h
from .optimizer_split import split_step
from .rollout_attribution import concatenated_losses, record_fields, rollout_info, supports_attribution
from .step_probe import DEFAULT_DEFENSIVE, ProbeOptions, ProbeRecord, StepProbe

JSONL_NAME = "entropy_probe.jsonl"
RECORDS_KEPT = 1000  # in memory; the JSONL file holds every record


class EntropyProbe(Callback):
    """Predict (JVP) and measure (SNIS) the entropy change of every ``every_n_steps``-th
    optimizer step on a held-out evaluation batch, and log both with standard errors.

    Args:
        prompts: held-out prompts: strings, token-id lists, or a path to a .txt/.jsonl file.
        sampling: how E is sampled (temperature, top-p, top-k, max_new_tokens).
        every_n_steps: probe optimizer steps 0, n, 2n, ...
        responses_per_prompt: R responses per prompt (jackknife groups are prompts).
        order: 1 (linear prediction) or 2 (also curvature and the quadratic prediction).
        scales: step scales to measure; s = 1 (the real step) is always included.
        normalize: "token" (nats per token) or "sequence".
        estimator: "rb" (Rao-Blackwell, full-distribution entropies) or "naive" (−log q).
        microbatch_size: rows per probe pass (None: all of E at once). The default 64 bounds the
            probe's peak memory and keeps its cost linear in the size of E (benchmarks/README.md).
        policy: attribute path of the HF model on the LightningModule (default: autodetect).
        tokenizer: attribute path of the tokenizer, needed for string prompts and samples.
        chat_template: format each string prompt as a user turn of the tokenizer's chat template
            (as a chat model's rollouts are prompted).
        sampler: draws E from your own rollout engine instead of the library's sampler: a
            callable ``(model, prompts, config, *, responses_per_prompt, seed) -> ProbeBatch``
            (``step_probe.Sampler``; in YAML a ``class_path`` of a callable class). Return the
            engine's log-probabilities with the draws (``ProbeBatch.from_sequences(...,
            proposal_log_probs=...)``) so the estimators correct for what it really sampled.
        seed: E at step t is drawn with a seed derived from (seed, t).
        snapshot_device: where θ₀ is kept: "auto" (the parameters' device) or "cpu".
        precision: compute dtype of the probe's passes. "auto" (default) measures in float64
            and differentiates in float32, so the measured ΔH is the step and not rounding at
            any learning rate; "float64", "float32" or "model" (the model's own dtypes: cheapest,
            exact only for float64 models). docs/method.md, Precision, gives what each costs.
        defensive: with top-k/top-p, E is drawn from (1 − ε)·q_θ₀ + ε·(q_θ₀ untruncated) with
            ε = ``defensive`` (default 0.1) and weighted back, so a step that moves tokens into
            the support is still measured without bias; 0: draw from q_θ₀ (docs/method.md §3).
        control_variates: subtract cross-fitted score control variates from every estimate
            (docs/method.md §5): SEs of g′ and the measured ΔH 1.1–1.5× smaller on the toy and
            enumeration models, for a few percent of the probe's time; off by default, because
            late in the default run heavy-tailed features still moved a few estimates by more
            than their SEs.
        decode: how the built-in sampler runs its decoding steps: ``DecodeOptions(cache="static",
            compile=True)`` preallocates the KV cache and compiles the step (CUDA graphs on a
            GPU); the draws are the same.
        attribution: when the LightningModule defines ``entropy_probe_losses(batch) -> Tensor[n]``
            (the per-sample losses of a training batch, summing to its loss), split each probed
            step's linear prediction among the step's samples (docs/method.md §6): a_u per
            sample, the momentum / weight-decay / residual shares, the ``attribution_top_k``
            largest as text (with ``entropy_probe_rollouts(batch)``: text, reward, advantage,
            log_prob per sample) and Pearson r against Cui et al.'s −lr·Cov(log π, A) proxy.
            Single process only (under DDP ∇Ĥ would span the ranks' shares of E).
        on_error: "warn" (count and continue) or "raise".
        log_samples: how many decoded responses of E to log as TensorBoard text.
        jsonl: write every probe to ``entropy_probe.jsonl`` in the logger's directory.
        eos_token_id, pad_token_id: default from the policy's config / tokenizer.
        figure_every: log the calibration and entropy pictures to TensorBoard every this many
            probes (0: never); both are also saved as PNGs in the log directory at the end of fit.
        name: tells several EntropyProbes in one Trainer apart (e.g. one per prompt set): their
            tags go under ``entropy/<name>/``, their records to ``entropy_probe_<name>.jsonl``,
            and their checkpointed state under their own key.
    """

    def __init__(
        self,
        prompts: Union[str, list[str], list[list[int]]],
        sampling: SamplingConfig,
        every_n_steps: int = 10,
        responses_per_prompt: int = 1,
        order: int = 2,
        scales: list[float] = [1.0],  # noqa: B006 - jsonargparse needs a concrete default
        normalize: Literal["token", "sequence"] = "token",
        estimator: Literal["rb", "naive"] = "rb",
        microbatch_size: int | None = 64,
        policy: str | None = None,
        tokenizer: str | None = None,
        chat_template: bool = False,
        sampler: Optional[Callable[..., ProbeBatch]] = None,
        seed: int = 0,
        snapshot_device: Literal["auto", "cpu"] = "auto",
        precision: Literal["auto", "float64", "float32", "model"] = "auto",
        defensive: float = DEFAULT_DEFENSIVE,
        control_variates: bool = False,
        decode: DecodeOptions = DecodeOptions(),
        attribution: bool = True,
        attribution_top_k: int = 5,
        on_error: Literal["warn", "raise"] = "warn",
        log_samples: int = 4,
        jsonl: bool = True,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        figure_every: int = 10,
        name: str | None = None,
    ) -> None:
        self.options = ProbeOptions(
            sampling=sampling, every_n_steps=every_n_steps, responses_per_prompt=responses_per_prompt,
            order=order, scales=tuple(scales), normalize=normalize, estimator=estimator,
            microbatch_size=microbatch_size, seed=seed, snapshot_device=snapshot_device, precision=precision,
            defensive=defensive, control_variates=control_variates, decode=decode)
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        if log_samples < 0:
            raise ValueError(f"log_samples must be >= 0, got {log_samples}")
        if name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"name must be letters, digits, '_', '.' or '-' (it becomes a tag and a file name), "
                             f"got {name!r}")
        if isinstance(figure_every, bool) or not isinstance(figure_every, int) or figure_every < 0:
            raise ValueError(f"figure_every must be an integer >= 0 (0: no figures in TensorBoard), got {figure_every!r}")
        self.figure_every = figure_every
        if isinstance(attribution_top_k, bool) or not isinstance(attribution_top_k, int) or attribution_top_k < 0:
            raise ValueError(f"attribution_top_k must be an integer >= 0, got {attribution_top_k!r}")
        self.attribution = bool(attribution)
        self.attribution_top_k = attribution_top_k
        self._step_batches: list = []  # the training batches since the last optimizer step
        self._probe_optimizer = None
        self._step_split = None  # the optimizer's split of the probed step, taken as it returned
        self._warned_split_batch = False
        self._steps_in_batch = 0  # optimizer steps in the current training batch
        self.name = name
        self.prefix = "entropy/" if name is None else f"entropy/{name}/"
        self.prompts = load_prompts(prompts)
        self.policy_path = policy
        self.tokenizer_path = tokenizer
        self.chat_template = chat_template
        if sampler is not None and not callable(sampler):
            raise ValueError(f"sampler must be callable (model, prompts, config, *, responses_per_prompt, seed) -> "
                             f"ProbeBatch, got {type(sampler).__name__}")
        self.sampler = sampler
        self.on_error = on_error
        self.log_samples = log_samples
        self.jsonl = jsonl
        self.eos_token_id = token_id(eos_token_id)
        self.pad_token_id = pad_token_id
        self.core: StepProbe | None = None
        self.policy: torch.nn.Module | None = None
        self.tokenizer = None
        self.calibration = Calibration()
        self.probe_errors = 0
        self.skipped_steps = 0
        self.records: collections.deque[ProbeRecord] = collections.deque(maxlen=RECORDS_KEPT)
        self.run_id = uuid.uuid4().hex[:12]  # on every JSONL record: tells runs sharing a file apart
        self._layout_written = False
        self.print_summary = True
        self._due_step: int | None = None
        self._last_step = 0  # global_step at the last on_train_batch_end
        self._failure: str | None = None
        self._last_batch = None
        self._capture_handle = None  # the optimizer step hook of a probe in flight
        self._finished: set[int] = set()  # probes finished before their batch ended
        self._series: SeriesRuns | None = None
        self._published = 0  # probes with a record (not skipped); `records` keeps only the last ones

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.policy = resolve_policy(pl_module, self.policy_path)
        if self.tokenizer_path is not None:
            try:
                self.tokenizer = operator.attrgetter(self.tokenizer_path)(pl_module)
            except AttributeError:
                raise ValueError(f"EntropyProbe(tokenizer={self.tokenizer_path!r}): {type(pl_module).__name__} has "
                                 "no such attribute") from None
        else:
            self.tokenizer = getattr(pl_module, "tokenizer", None)
        check_trainable(self.policy)
        mismatch = sampling_mismatch(self.policy, self.options.sampling)
        if mismatch:
            warnings.warn(f"EntropyProbe: {mismatch}", UserWarning, stacklevel=2)
        eos, pad = special_tokens(self.policy, self.tokenizer, self.eos_token_id, self.pad_token_id)
        # Everything a probe would trip over is checked now, not at every probe of the run.
        prompts = check_sampling_inputs(self.policy, tokenize_prompts(self.prompts, self.tokenizer, self.chat_template),
                                        self.options.sampling, eos, pad)
        if len(prompts) < SMALL_G:
            warnings.warn(small_g_message("EntropyProbe", len(prompts)), UserWarning, stacklevel=2)
        world, rank = trainer.world_size, trainer.global_rank
        indices = list(range(rank, len(prompts), world))
        if not indices:
            raise ValueError(f"EntropyProbe has {len(prompts)} prompts for {world} ranks; give at least one per rank")
        self.core = StepProbe(self.options, [prompts[i] for i in indices], eos_token_id=eos, pad_token_id=pad,
                              prompt_indices=indices, sampler=self.sampler)

    # ------------------------------------------------------------------ hooks
    # Protocol: the probe of step t begins in on_before_optimizer_step (θ₀, before the step),
    # takes Δθ when that optimizer's step() returns (a step post-hook), and ends in the first
    # on_train_batch_end after global_step passes t — or at the next step's
    # on_before_optimizer_step when one batch takes several steps (manual optimization), so each
    # real step is probed on its own. Under DDP every rank
    # with a due probe joins one all_gather of its share (or None if it failed), so a failure
    # on one rank makes all ranks skip that probe together instead of hanging.
    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._due_step = None
        if self.jsonl and trainer.is_global_zero:
            JsonlFile(self.jsonl_path(trainer), self.run_id).start(trainer.global_step)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        core, step = self.core, trainer.global_step
        if core is None:
            return
        self._steps_in_batch += 1
        if self._due_step is not None and self._due_step < step:  # a step earlier in this batch
            finished, self._due_step = self._due_step, None
            self._finished.add(finished)
            self._finish_probe(trainer, finished)
        if self._due_step is not None or not core.due(step):
            return
        self._due_step = step
        lr = float(optimizer.param_groups[0]["lr"]) if optimizer.param_groups else math.nan
        self._probe_optimizer = getattr(optimizer, "_optimizer", optimizer)
        self._step_split = None
        self._last_batch = self._contained(step, lambda: core.begin(self.policy, step, lr))
        if core.pending is not None:
            # Δθ is taken the moment this optimizer's step returns, whatever runs before the batch
            # ends. A step skipped by an AMP scaler never returns from step(): Δθ is then read at
            # the batch end, and is 0.
            def captured(*args, **kwargs) -> None:  # removed when the probe finishes, not in here
                if core.pending is not None and core.pending.step == step:
                    self._contained(step, lambda: core.capture(self.policy))
                    if core.pending is not None and self._attributes(trainer):
                        # lr, gradients and moments as this step used them: a scheduler or a
                        # later step in the batch changes them before the probe finishes
                        try:
                            self._step_split = split_step(self._probe_optimizer, {
                                id(p): n for n, p in self.policy.named_parameters()}, core.pending.before)
                        except Exception:  # noqa: BLE001 - attribution then takes it later, or fails on its own
                            self._step_split = None

            torch_optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's own
            self._capture_handle = torch_optimizer.register_step_post_hook(captured)

    def _release_capture(self) -> None:
        if self._capture_handle is not None:
            self._capture_handle.remove()
            self._capture_handle = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._steps_in_batch = 0
        if self.core is not None and self.attribution and supports_attribution(pl_module):
            self._step_batches.append(batch)

    def _attributes(self, trainer: pl.Trainer) -> bool:
        """Whether this probe's step is attributed to the samples of its batches."""
        return (self.attribution and supports_attribution(trainer.lightning_module) and bool(self._step_batches)
                and trainer.world_size == 1 and self._probe_optimizer is not None)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self.core is None:
            return
        stepped = trainer.global_step > self._last_step
        completed = range(self._last_step, trainer.global_step)
        self._last_step = trainer.global_step
        finished, self._finished = self._finished, set()
        for step in completed:  # empty until an optimizer step happens (gradient accumulation)
            if step in finished:
                continue
            if step == self._due_step:
                self._due_step = None
                self._finish_probe(trainer, step)
            elif self.core.due(step):
                # The optimizer step ran without on_before_optimizer_step (e.g. a module that
                # skipped optimizer.step()): nothing moved that the probe saw.
                self._publish(trainer, ProbeRecord(step=step, skipped=True), None)
        if stepped:
            self._step_batches = []

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._series is not None:
            self._series.close()
            self._series = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        attempted = self.calibration.history or self.calibration.non_finite or self.probe_errors or self.skipped_steps
        if self.print_summary and trainer.is_global_zero and attempted:
            rank_zero_info(self.summary_table())
        if trainer.is_global_zero and any(not r.skipped for r in self.records):
            self._reported(lambda: self._save_figures(trainer), "the end-of-fit pictures")

    # ------------------------------------------------------------------ internals
    def _contained(self, step: int, action):
        """Run a probe action; a failure cancels the probe (re-raised with on_error='raise')."""
        try:
            with preserved_rng(next(self.policy.parameters()).device):
                return action()
        except Exception as error:  # noqa: BLE001 - the whole point is containment
            self.core.cancel()
            if self.on_error == "raise":
                raise
            self._failure = f"{type(error).__name__}: {error}"
            return None

    def _finish_probe(self, trainer: pl.Trainer, step: int) -> None:
        self._release_capture()
        step_split, self._step_split = self._step_split, None  # float64 per parameter: not kept past its probe
        core = self.core
        before = core.pending.before if core.pending is not None else None
        local = self._contained(step, lambda: core.measure_local(self.policy)) if core.pending else None
        parts = self._gather(trainer, local)
        batch_e = None if local is None else self._last_batch
        if any(part is None for part in parts):
            self._skip_failed(trainer, step, "it failed on another rank")
            return
        record = self._contained(step, lambda: core.summarize(parts))
        if record is None:  # the summary failed (the same on every rank: it sees the same terms)
            self._last_batch = None
            self._skip_failed(trainer, step, "its summary failed")
            return
        if record is not None and not record.skipped and before is not None and batch_e is not None:
            self._attribute(trainer, record, before, batch_e, step_split)
        self._last_batch = None  # E leaves the device between probes
        if record is not None:
            self._publish(trainer, record, batch_e)

    def _skip_failed(self, trainer: pl.Trainer, step: int, fallback: str) -> None:
        self.probe_errors += 1
        reason = getattr(self, "_failure", None) or fallback
        self._failure = None
        warnings.warn(f"EntropyProbe: the probe at step {step} failed and was skipped ({reason}); training continues",
                      RuntimeWarning, stacklevel=3)
        self._log_metrics(trainer, {f"{self.prefix}probe_errors": float(self.probe_errors)}, step)

    def _attribute(self, trainer: pl.Trainer, record: ProbeRecord, before, batch_e, step_split) -> None:
        """Fill the record's attribution fields; a failure leaves them empty and training going."""
        module = trainer.lightning_module
        if not self._attributes(trainer):
            return
        if self._steps_in_batch > 1:  # each step used part of the batch, and which part is the module's
            if not self._warned_split_batch:
                self._warned_split_batch = True
                warnings.warn("EntropyProbe: a training batch took several optimizer steps, so its samples cannot "
                              "be assigned to one step; attribution is skipped for such steps", RuntimeWarning,
                              stacklevel=2)
            return
        o = self.options
        batches = list(self._step_batches)

        def attribute() -> None:
            found = attribute_delta_h(self.policy, batch_e, before, self._probe_optimizer,
                                      concatenated_losses(module, self.policy, batches), normalize=o.normalize,
                                      estimator=o.estimator, microbatch_size=o.microbatch_size, precision=o.precision,
                                      step_split=step_split)
            info = rollout_info(module, batches)
            for name, value in record_fields(found, info, record.lr, self.attribution_top_k).items():
                setattr(record, name, value)

        try:
            with preserved_rng(next(self.policy.parameters()).device):
                attribute()
        except Exception as error:  # noqa: BLE001 - attribution must not kill or alter training
            if self.on_error == "raise":
                raise
            warnings.warn(f"EntropyProbe: the attribution at step {record.step} failed ({type(error).__name__}: "
                          f"{error}); the probe's other numbers stand and training continues",
                          RuntimeWarning, stacklevel=2)

    @staticmethod
    def _gather(trainer: pl.Trainer, local) -> list:
        if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return [local]
        parts = [None] * trainer.world_size
        torch.distributed.all_gather_object(parts, local)
        return parts

    def _publish(self, trainer: pl.Trainer, record: ProbeRecord, batch_e) -> None:
        self.records.append(record)
        if record.skipped:
            self.skipped_steps += 1
            metrics = {f"{self.prefix}skipped_steps": float(self.skipped_steps)}
        else:
            self._published += 1
            if record.delta_measured_usable:  # a biased measurement would score the prediction wrongly
                self.calibration.update(record.delta_linear, record.delta_quadratic, record.delta_measured,
                                        record.delta_measured_se, record.dof)
            metrics = record.metrics(self.options.sampling.truncates, self.prefix)
            metrics.update({f"{self.prefix}calibration/{k}": v for k, v in self.calibration.compute().items()
                            if k not in ("count", "non_finite") and math.isfinite(v)})
            metrics[f"{self.prefix}probe_errors"] = float(self.probe_errors)
        if not trainer.is_global_zero:
            return
        self._log_metrics(trainer, metrics, record.step)
        if not record.skipped and batch_e is not None:
            self._reported(lambda: self._log_tensorboard(trainer, record, batch_e), "TensorBoard extras")
        if self.jsonl:
            self._reported(lambda: JsonlFile(self.jsonl_path(trainer), self.run_id).append(record), "the JSONL file")

    def _reported(self, action, what: str) -> None:
        """Writing a report (a figure, a file) never ends the training run (on_error='raise' aside)."""
        try:
            action()
        except Exception as error:  # noqa: BLE001 - reporting must not kill training
            if self.on_error == "raise":
                raise
            warnings.warn(f"EntropyProbe: writing {what} failed ({type(error).__name__}: {error}); training continues",
                          RuntimeWarning, stacklevel=2)

    @staticmethod
    def _log_metrics(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def jsonl_path(self, trainer: pl.Trainer) -> Path:
        file = JSONL_NAME if self.name is None else f"entropy_probe_{self.name}.jsonl"
        for logger in trainer.loggers:
            if getattr(logger, "log_dir", None):
                return Path(logger.log_dir) / file
        return Path(trainer.default_root_dir) / file

    def _log_tensorboard(self, trainer: pl.Trainer, record: ProbeRecord, batch_e) -> None:
        decode = self.tokenizer.decode if self.tokenizer is not None else str
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            writer = logger.experiment
            if not self._layout_written:
                writer.add_custom_scalars(custom_scalars_layout(self.prefix))
                self._layout_written = True
            if self._series is None:
                self._series = SeriesRuns(Path(logger.log_dir), self.prefix)
            self._series.log(record)
            log_to_tensorboard(writer, self.prefix, record, batch_e, self.log_samples,
                               self.options.responses_per_prompt, decode)
            if self.figure_every and self._published % self.figure_every == 0:
                from .figures import calibration_figure, entropy_figure

                writer.add_figure(f"{self.prefix}calibration", calibration_figure(self.records), record.step)
                writer.add_figure(f"{self.prefix}entropy_over_run", entropy_figure(self.records), record.step)

    def figure_paths(self, trainer: pl.Trainer) -> tuple[Path, Path]:
        """Where the end-of-fit pictures go: beside the JSONL file."""
        suffix = "" if self.name is None else f"_{self.name}"
        directory = self.jsonl_path(trainer).parent
        return directory / f"entropy_calibration{suffix}.png", directory / f"entropy_over_run{suffix}.png"

    def _save_figures(self, trainer: pl.Trainer) -> None:
        from .figures import calibration_figure, entropy_figure, save

        calibration, entropy = self.figure_paths(trainer)
        calibration.parent.mkdir(parents=True, exist_ok=True)
        save(calibration_figure(self.records), calibration)
        save(entropy_figure(self.records), entropy)

    def summary_table(self) -> str:
        return summary_table(self.calibration, self.options.order, self.probe_errors, self.skipped_steps)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"calibration": self.calibration.state_dict(), "probe_errors": self.probe_errors,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.calibration.load_state_dict(state_dict.get("calibration", {}))
        self.probe_errors = int(state_dict.get("probe_errors", 0))
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
