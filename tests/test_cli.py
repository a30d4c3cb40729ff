"""The ``entropy-callbacks`` console script: ``fit`` (LightningCLI) and ``probe`` (one-step experiments).

Runs are shortened through ordinary CLI overrides; everything is written under tmp paths. Most
tests call ``entropy_callbacks.cli.main`` in-process; one runs the installed console script.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from entropy_callbacks import experiment as experiment_module
from entropy_callbacks.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
FIT_TAGS = {"entropy/before", "entropy/delta_measured", "entropy/delta_linear", "entropy/delta_quadratic",
            "entropy/ess", "entropy/step_norm", "train/reward", "train/entropy"}
SCALES = [0.25, 0.5, 1.0, 2.0, 4.0]


def _run(args: list[str]) -> str:
    """main(args) in-process; returns what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(args)
    return out.getvalue()


def _shortened_fit(root: Path) -> list[str]:
    return ["fit", "--config", str(CONFIGS / "toy_grpo.yaml"),
            "--trainer.max_steps", "12",  # probes at steps 0 and 10
            "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.callbacks.responses_per_prompt", "4"]  # reaches the EntropyProbe (last callback)


def _probe_args(out_root: Path, *extra: str) -> list[str]:
    return ["probe", "--config", str(CONFIGS / "probe.yaml"), "--experiment.output_root", str(out_root),
            "--experiment.trials", "2", "--experiment.responses_per_prompt", "2", *extra]


def _scalar_tags(log_dir: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: accumulator.Scalars(tag) for tag in accumulator.Tags()["scalars"]}


def _finite_numbers(value, path="") -> list[str]:
    """Paths of the numbers in a JSON value that are missing (None) or not finite."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _finite_numbers(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _finite_numbers(v, f"{path}[{i}]")]
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return [path]
    return []


def _reject(constant: str):
    raise AssertionError(f"{constant} in a JSON file (write null for undefined numbers)")


def _only_child(directory: Path) -> Path:
    children = [p for p in directory.iterdir() if p.is_dir()]
    assert len(children) == 1, children
    return children[0]


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory):
    """One shortened run of the default config (12 GRPO steps, probes at 0 and 10)."""
    root = tmp_path_factory.mktemp("fit")
    cwd = os.getcwd()
    os.chdir(root)  # nothing may land in the working directory
    try:
        printed = _run(_shortened_fit(root / "runs"))
    finally:
        os.chdir(cwd)
    return root / "runs" / "version_0", printed


# ---------------------------------------------------------------------------- fit
def test_fit_default_config_end_to_end(fit_run):
    log_dir, printed = fit_run
    # a checkpoint, the resolved config, the tokenizer and model config beside the run
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    assert (log_dir / "config.yaml").is_file()
    assert (log_dir / "policy" / "tokenizer.json").is_file() and (log_dir / "policy" / "config.json").is_file()

    # event files with the probe's tags at the probed steps
    assert list(log_dir.glob("events.out.tfevents.*"))
    scalars = _scalar_tags(log_dir)
    assert FIT_TAGS <= set(scalars), sorted(FIT_TAGS - set(scalars))
    assert [e.step for e in scalars["entropy/delta_measured"]] == [0, 10]
    assert all(math.isfinite(e.value) for tag in FIT_TAGS for e in scalars[tag])
    assert "hp_metric" not in scalars  # no meaningless -1 card
    assert (log_dir / "entropy_calibration.png").exists() and (log_dir / "entropy_over_run.png").exists()
    records = [json.loads(line) for line in (log_dir / "entropy_probe.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 10]
    assert all(r["num_sequences"] == 20 * 4 for r in records)  # E = 20 held-out prompts x 4 (override)

    # closing summary: where the logs are, how to open them, start/end table, calibration
    assert f"Logs: {log_dir.resolve()}" in printed
    assert f"tensorboard --logdir {log_dir.resolve()}" in printed
    for name in ("train/reward", "train/entropy"):
        (line,) = [line for line in printed.splitlines() if line.startswith(name)]
        start, end = map(float, line.split()[1:])
        assert math.isfinite(start) and math.isfinite(end)
    assert "calibration" in printed and "Pearson r" in printed


# ---------------------------------------------------------------------------- probe
def test_probe_from_the_fit_checkpoint(fit_run, tmp_path):
    log_dir, _ = fit_run
    ckpt = log_dir / "checkpoints" / "last.ckpt"
    printed = _run(_probe_args(tmp_path / "probe", "--ckpt_path", str(ckpt)))
    out = _only_child(tmp_path / "probe")  # one timestamped directory
    assert f"Results: {out.resolve()}" in printed
    assert "measured ΔH" in printed and "slope" in printed

    # the resolved config, loadable, with the overrides applied
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["experiment"]["trials"] == 2 and config["ckpt_path"] == str(ckpt)
    assert config["model"]["class_path"] == "entropy_callbacks.toy.GRPOModule"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["ckpt_path"] == str(ckpt) and plan["scales"] == SCALES and len(plan["trial_seeds"]) == 2
    assert plan["num_sequences"] == 20 * 2

    results = json.loads((out / "results.json").read_text(), parse_constant=_reject)
    assert not _finite_numbers(results), _finite_numbers(results)  # every field filled and finite
    trials = results["trials"]
    assert [t["trial"] for t in trials] == [0, 1]
    assert trials[0]["step_norm"] != trials[1]["step_norm"]  # a fresh update batch per trial
    for record in trials + [results["aggregate"]]:
        assert [row["scale"] for row in record["per_scale"]] == SCALES
        for row in record["per_scale"]:
            for name in ("measured", "measured_se", "linear", "quadratic", "linear_relative_error",
                         "quadratic_relative_error", "ess_fraction", "outside_support"):
                assert name in row, name
            assert 0 < row["ess_fraction"] <= 1
        for name in ("loglog_slope", "loglog_r2", "linear", "curvature", "step_norm", "entropy_before"):
            assert name in record, name
    for trial in trials:
        assert trial["per_scale"][2]["linear"] == pytest.approx(trial["linear"])  # s = 1 is the real step
        assert 0.5 < trial["loglog_slope"] < 2.5 and 0 <= trial["loglog_r2"] <= 1
        # attribution to U's 8 x 16 rollouts: the split adds up, and the decoded top rollouts are there
        split = trial["attribution"]
        assert len(split["per_rollout"]["a"]) == len(split["per_rollout"]["a_jacobian"]) == 8 * 16
        assert abs(split["residual"]) <= 1e-4 * abs(split["linear"])  # float32 derivative passes
        assert split["linear"] == pytest.approx(trial["per_scale"][2]["linear"], rel=0.05)  # controls aside
        assert len(split["top"]) == 5 and all(isinstance(row["text"], str) for row in split["top"])
        assert len(split["per_rollout"]["a_se"]) == 8 * 16 and all(row["a_se"] > 0 for row in split["top"])
    check = results["leave_one_out"]
    assert len(check["rollouts"]) == 8 and len(set(check["rollouts"])) == 8
    fits = check["fits"]
    print({name: round(fit["pearson_r"], 4) for name, fit in fits.items()})
    # Both influences track the leave-one-out change of the linear prediction (r 0.999 both,
    # measured); they differ in slope, which results.json reports
    assert fits["a_vs_linear_effect"]["pearson_r"] > 0.9
    assert fits["a_jacobian_vs_linear_effect"]["pearson_r"] > 0.9
    assert "attribution vs leave-one-out" in printed
    aggregate = results["aggregate"]
    assert aggregate["num_trials"] == 2 and "measured_across_trials_se" in aggregate["per_scale"][0]
    for row in aggregate["per_scale"]:  # relative errors of the mean prediction against the mean measured ΔH
        want = abs(row["linear"] - row["measured"]) / abs(row["measured"])
        assert row["linear_relative_error"] == pytest.approx(want)
        assert "quadratic_relative_error_trial_median" in row
    assert "loglog_slope_trial_mean" in aggregate
    lines = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert lines == trials
    assert (out / "delta_vs_scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_scale = set(_scalar_tags(out))
    assert {"probe/by_scale/measured", "probe/by_scale/linear", "probe/by_scale/scale"} <= by_scale

    # TensorBoard events, one point per trial
    scalars = _scalar_tags(out)
    for scale in ("0.25", "1", "4"):
        for kind in ("measured", "linear", "quadratic"):
            assert [e.step for e in scalars[f"probe/{kind}@{scale}"]] == [0, 1]

    # it really started from the checkpoint: E (same seed, same R) drawn from the initial state differs
    assert trials[0]["entropy_before"] == trials[1]["entropy_before"]  # the same E in every trial
    _run(_probe_args(tmp_path / "initial", "--experiment.trials", "1", "--experiment.scales", "[1.0, 2.0]"))
    initial = json.loads((_only_child(tmp_path / "initial") / "results.json").read_text())["trials"][0]
    assert initial["entropy_before"] != trials[0]["entropy_before"]


def test_probe_trials_with_the_same_seed_give_identical_records(fit_run, tmp_path, monkeypatch):
    """Module and optimizer are restored exactly between trials: give every trial the seed of
    trial 0 (E keeps its own seed) and all records must agree bit for bit."""
    log_dir, _ = fit_run
    original = experiment_module.trial_seed
    monkeypatch.setattr(experiment_module, "trial_seed",
                        lambda seed, trial: original(seed, 0 if trial >= 0 else trial))
    _run(_probe_args(tmp_path / "probe", "--ckpt_path", str(log_dir / "checkpoints" / "last.ckpt"),
                     "--experiment.trials", "3", "--experiment.scales", "[1.0, 2.0]"))
    results = json.loads((_only_child(tmp_path / "probe") / "results.json").read_text())
    records = [{k: v for k, v in t.items() if k != "trial"} for t in results["trials"]]
    assert len(records) == 3
    assert records[1] == records[0] and records[2] == records[0]
    assert records[0]["step_norm"] > 0


def test_console_script_probe_from_the_initial_state(fit_run, tmp_path):
    """The installed entry point; without --ckpt_path the probe starts from the module's initial state."""
    script = Path(sys.executable).parent / "entropy-callbacks"
    command = [str(script)] if script.exists() else [shutil.which("entropy-callbacks") or "entropy-callbacks"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run(command + _probe_args(tmp_path / "probe", "--experiment.trials", "1",
                                                  "--experiment.scales", "[1.0, 2.0]"),
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = _only_child(tmp_path / "probe")
    assert f"Results: {out.resolve()}" in result.stdout
    assert "probe trials" in result.stderr  # the progress bar
    assert "args parameter is intended" not in result.stderr  # no spurious LightningCLI warning
    results = json.loads((out / "results.json").read_text(), parse_constant=_reject)  # strict JSON
    assert json.loads((out / "plan.json").read_text())["ckpt_path"] is None
    # one trial: spreads across trials are undefined, written as null
    assert results["aggregate"]["step_norm_across_trials_se"] is None
    assert not _finite_numbers(results["trials"]), _finite_numbers(results["trials"])
    # the initial random policy is near uniform over the 15-token vocabulary; the trained one is not
    initial = results["trials"][0]["entropy_before"]
    assert initial == pytest.approx(math.log(15), abs=0.05)
    trained = [json.loads(line) for line in (fit_run[0] / "entropy_probe.jsonl").read_text().splitlines()][-1]
    assert initial != trained["entropy_before"]


# ---------------------------------------------------------------------------- print_config
@pytest.mark.parametrize("command", ["fit", "probe"])
def test_print_config(command, capsys):
    config = CONFIGS / ("toy_grpo.yaml" if command == "fit" else "probe.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    section = yaml.safe_load(capsys.readouterr().out)
    assert section["model"]["class_path"] == "entropy_callbacks.toy.GRPOModule"
    if command == "fit":
        callbacks = [c["class_path"] for c in section["trainer"]["callbacks"]]
        assert "entropy_callbacks.EntropyProbe" in callbacks
        assert section["trainer"]["max_steps"] == yaml.safe_load(config.read_text())["trainer"]["max_steps"]
    else:
        assert section["experiment"]["trials"] == 8
        assert section["experiment"]["scales"] == SCALES
        assert section["ckpt_path"] is None


def test_help_names_both_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "entropy-callbacks probe --help" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["probe", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: entropy-callbacks probe") and "--experiment.trials" in text and "--ckpt_path" in text


# ---------------------------------------------------------------------------- bad configs
def _bad_fit_config(tmp_path: Path, field: str) -> Path:
    config = yaml.safe_load((CONFIGS / "toy_grpo.yaml").read_text())
    runs = str(tmp_path / "runs")
    config["trainer"]["default_root_dir"] = config["trainer"]["logger"]["init_args"]["save_dir"] = runs
    model = config["model"]["init_args"]
    if field == "prompt_file":
        model["prompt_file"] = str(tmp_path / "missing.jsonl")
    elif field == "reward":
        model["reward"] = "bogus"
    elif field == "lr":
        model["lr"] = -1.0e-3
    elif field == "every_n_steps":
        (probe,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("EntropyProbe")]
        probe["init_args"]["every_n_steps"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("field, message", [
    ("prompt_file", r"prompt_file '.*missing\.jsonl' does not exist"),
    ("reward", r"reward 'bogus' is unknown; choose one of"),
    ("lr", r"lr must be a positive number, got -0\.001"),
    ("every_n_steps", r"every_n_steps must be an integer >= 1, got 0"),
])
def test_bad_fit_config_fails_before_training(field, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _bad_fit_config(tmp_path, field)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err[-2000:]
    assert "invalid configuration" in err
    assert "Given value" not in err and "Namespace(" not in err  # one clear line, not jsonargparse's dump
    assert not (tmp_path / "runs").exists()  # no logger directory, no checkpoint: training never started


@pytest.mark.parametrize("extra, message", [
    (["--experiment.trials", "0"], r"trials must be >= 1, got 0"),
    (["--ckpt_path", "nowhere.ckpt"], r"ckpt_path 'nowhere\.ckpt' is not a file"),
], ids=["trials=0", "missing-ckpt"])
def test_bad_probe_config_fails_before_any_trial(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(_probe_args(tmp_path / "probe", *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err[-2000:]
    assert not (tmp_path / "probe").exists()


# ---------------------------------------------------------------------------- local HF model + LoRA
@pytest.fixture
def hf_model_dir(tmp_path) -> Path:
    """A tiny Llama saved with save_pretrained, with the toy tokenizer saved beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from entropy_callbacks.toy.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    directory = tmp_path / "tiny-llama"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_hf_lora_example_with_a_local_model(hf_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "train.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"{a} {b} =", "answer": str(b)})
                                 for a in range(4) for b in range(4)) + "\n")
    held_out = tmp_path / "heldout.txt"
    held_out.write_text("7 8 =\n9 9 =\n8 7 =\n")
    root = tmp_path / "runs"
    shared = ["--config", str(CONFIGS / "hf_lora_example.yaml"),
              "--model.init_args.pretrained_path", str(hf_model_dir), "--model.init_args.prompt_file", str(prompts),
              "--model.init_args.sampling.max_new_tokens", "4", "--model.init_args.group_size", "4",
              "--model.init_args.prompts_per_step", "2", "--model.init_args.lora.r", "4",
              "--trainer.callbacks.prompts", str(held_out), "--trainer.callbacks.sampling.max_new_tokens", "4",
              "--trainer.callbacks.responses_per_prompt", "2", "--trainer.callbacks.every_n_steps", "1"]
    printed = _run(["fit", *shared, "--trainer.max_steps", "2", "--trainer.accelerator", "cpu",
                    "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
                    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    log_dir = root / "version_0"
    assert f"Logs: {log_dir.resolve()}" in printed
    records = [json.loads(line) for line in (log_dir / "entropy_probe.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    # a step whose groups all tie on reward has zero advantages and changes nothing: recorded as skipped
    probed = [r for r in records if not r["skipped"]]
    assert probed, records
    assert all(math.isfinite(r["delta_measured"]) and math.isfinite(r["delta_linear"]) for r in probed)
    assert all(r["num_sequences"] == 3 * 2 for r in probed)
    scalars = _scalar_tags(log_dir)
    assert {"entropy/delta_measured", "entropy/delta_linear", "train/reward"} <= set(scalars)
    (ckpt,) = (log_dir / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert any("lora_A" in name for name in state)  # LoRA was on

    # the same config drives a probe of that checkpoint
    printed = _run(["probe", *shared, "--ckpt_path", str(ckpt), "--experiment.prompts", str(held_out),
                    "--experiment.sampling.max_new_tokens", "4", "--experiment.trials", "2",
                    "--experiment.responses_per_prompt", "2", "--experiment.scales", "[1.0, 2.0]",
                    "--experiment.output_root", str(tmp_path / "probe")])
    results = json.loads((_only_child(tmp_path / "probe") / "results.json").read_text())
    trials = [t for t in results["trials"] if t["step_norm"] > 0]
    assert trials, results["trials"]
    for trial in trials:
        assert math.isfinite(trial["linear"]) and math.isfinite(trial["curvature"])
        assert all(math.isfinite(row["measured"]) for row in trial["per_scale"])


def test_probe_with_an_own_sampler_and_a_static_cache(fit_run, tmp_path):
    """`probe` takes the callback's sampler (by class_path) and decode options: with HF generate
    as the rollout engine E carries its proposal (ESS at θ₀ from the weights q_θ₀/p), and the
    built-in sampler with a static cache draws the same E as with a dynamic one."""
    log_dir, _ = fit_run
    ckpt = ["--ckpt_path", str(log_dir / "checkpoints" / "last.ckpt"), "--experiment.trials", "1",
            "--experiment.scales", "[1.0]"]
    sampler = '{"class_path": "entropy_callbacks.hf_sampler.HFGenerateSampler"}'
    _run(_probe_args(tmp_path / "own", *ckpt, "--experiment.sampler", sampler))
    own = json.loads((_only_child(tmp_path / "own") / "results.json").read_text())
    assert "HFGenerateSampler" in json.dumps(json.loads((_only_child(tmp_path / "own") / "plan.json").read_text()))
    assert math.isfinite(own["trials"][0]["per_scale"][0]["measured"])

    results = {}
    for cache in ("dynamic", "static"):
        _run(_probe_args(tmp_path / cache, *ckpt, "--experiment.decode.cache", cache))
        results[cache] = json.loads((_only_child(tmp_path / cache) / "results.json").read_text())["trials"][0]
    assert results["static"]["entropy_before"] == pytest.approx(results["dynamic"]["entropy_before"], abs=1e-12)
    assert own["trials"][0]["entropy_before"] != results["dynamic"]["entropy_before"]  # another E
