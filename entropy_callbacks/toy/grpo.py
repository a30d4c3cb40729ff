"""GRPO as an ordinary LightningModule: the reference for users' own RL modules.

Each training step takes a batch of prompts, samples ``group_size`` rollouts per prompt from
the current policy, scores them with a verifiable reward, normalises rewards within each group
into advantages, and minimises the clipped policy-gradient surrogate averaged over each
rollout's tokens (Shao et al. 2024). One optimizer step per rollout batch (on-policy), so the
ratio is 1 at the step; the clipped form is kept so the module extends to several epochs.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from ..distribution import entropy as token_entropy
from ..model_guard import forward_kwargs, left_padded_positions
from ..sampling import ProbeBatch, SamplingConfig, sample_batch
from ..pretrained import load_pretrained
from ..prompts import encode_prompt
from .policy import LoraOptions, TinyModelOptions, tiny_policy, with_lora
from .task import load_prompt_file, reward_function, task_items


@dataclass
class Rollouts:
    """An update batch U: sampled sequences with their rewards and advantages."""

    batch: ProbeBatch
    rewards: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N]


def _seed(*parts) -> int:
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


class GRPOModule(pl.LightningModule):
    """Group Relative Policy Optimisation on a causal LM.

    Args:
        pretrained_path: local HF model directory, or ``package:NAME`` for an installed package
            that ships weights; default: a tiny random Llama (``model``). Never downloads.
        gguf_file: a GGUF file in ``pretrained_path``; dequantised once and cached as
            safetensors (``cache_dir``, default ``~/.cache/entropy-callbacks/models``).
        model: shape of the tiny random Llama.
        lora: LoRA adapter options (None: full fine-tuning).
        task: built-in prompts when no ``prompt_file``: "copy" (toy) or "arithmetic" (a + b).
        prompt_file: .jsonl ({"prompt", "answer"}) or .txt prompts, instead of ``task``.
        chat_template: format each prompt as a user turn of the tokenizer's chat template.
        reward: "copy" (toy task), "exact_match", "contains" or "last_number" (against each
            prompt's answer).
        sampling: rollout sampling (temperature, top-p, top-k, max_new_tokens).
        group_size: rollouts per prompt (G).
        prompts_per_step: prompts per optimizer step.
        lr, weight_decay: AdamW.
        clip_eps: PPO-style ratio clipping.
        kl_coef: weight of the k3 KL estimate to the initial policy (0: no reference model).
        entropy_coef: weight of an entropy bonus (0 by default, so collapse is visible).
        seed: rollouts at step t are drawn with a seed derived from (seed, t).
    """

    def __init__(
        self,
        pretrained_path: str | None = None,
        gguf_file: str | None = None,
        cache_dir: str | None = None,
        model: TinyModelOptions = TinyModelOptions(),
        lora: LoraOptions | None = None,
        task: str = "copy",
        prompt_file: str | None = None,
        chat_template: bool = False,
        reward: str = "copy",
        sampling: SamplingConfig = SamplingConfig(max_new_tokens=3),
        group_size: int = 16,
        prompts_per_step: int = 8,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        clip_eps: float = 0.2,
        kl_coef: float = 0.0,
        entropy_coef: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        for name, value in (("group_size", group_size), ("prompts_per_step", prompts_per_step)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        if group_size < 2:
            raise ValueError("group_size must be >= 2: GRPO normalises rewards within each group")
        for name, value in (("kl_coef", kl_coef), ("entropy_coef", entropy_coef), ("weight_decay", weight_decay),
                            ("clip_eps", clip_eps)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        self.save_hyperparameters()
        self.reward_fn = reward_function(reward)
        if prompt_file is None:
            self.train_items, self.held_out_items = task_items(task)
        else:
            self.train_items, self.held_out_items = load_prompt_file(prompt_file), []
        if gguf_file is not None and pretrained_path is None:
            raise ValueError("gguf_file needs pretrained_path: the directory (or package:NAME) that holds it")
        if pretrained_path is None:
            self.policy, self.tokenizer = tiny_policy(model)
        else:
            self.policy, self.tokenizer = load_pretrained(pretrained_path, gguf_file, cache_dir)
        if lora is not None:
            self.policy = with_lora(self.policy, lora)
        self.reference = None
        if kl_coef > 0:
            import copy

            self.reference = copy.deepcopy(self.policy).requires_grad_(False).eval()
        self.sampling = sampling
        self.train_prompt_ids = [self._encode(item.prompt) for item in self.train_items]

    def _encode(self, text: str) -> list[int]:
        return encode_prompt(text, self.tokenizer, self.hparams.chat_template)

    # ---------------------------------------------------------------- data
    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(range(len(self.train_items)), batch_size=self.hparams.prompts_per_step, shuffle=True,
                          generator=generator, drop_last=len(self.train_items) > self.hparams.prompts_per_step)

    # ---------------------------------------------------------------- RL
    @torch.no_grad()
    def rollouts(self, prompt_indices: list[int], seed: int) -> Rollouts:
        """Sample G responses per prompt at the current policy and score them."""
        batch = sample_batch(self.policy, [self.train_prompt_ids[i] for i in prompt_indices], self.sampling,
                             eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                             responses_per_prompt=self.hparams.group_size, seed=seed)
        rewards = []
        for row in range(len(batch)):
            ids = batch.input_ids[row][batch.response_mask[row]].tolist()
            item = self.train_items[prompt_indices[int(batch.group[row])]]
            tokens = self.tokenizer.convert_ids_to_tokens(ids)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            rewards.append(self.reward_fn(text, tokens, item))
        rewards = torch.tensor(rewards, dtype=torch.float32, device=batch.input_ids.device)
        grouped = rewards.view(-1, self.hparams.group_size)
        advantages = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
        return Rollouts(batch, rewards, advantages.reshape(-1))

    def update_batch(self, seed: int) -> Rollouts:
        """A fresh update batch U drawn with ``seed`` (used by ``entropy-callbacks probe``)."""
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.train_items), generator=generator)[: self.hparams.prompts_per_step]
        return self.rollouts(order.tolist(), seed)

    def _token_log_probs(self, model, batch: ProbeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(log q of each response token, entropy of each response position) in train mode."""
        position_ids = left_padded_positions(batch.attention_mask)
        kwargs = forward_kwargs(model, batch.input_ids, batch.attention_mask, position_ids)
        logits = model(**kwargs, use_cache=False).logits[:, batch.prompt_length - 1:-1].float()
        log_q = torch.log_softmax(logits / self.sampling.temperature, -1)
        targets = batch.input_ids[:, batch.prompt_length:]
        return log_q.gather(-1, targets[..., None]).squeeze(-1), token_entropy(log_q, None)

    def policy_loss(self, rollouts: Rollouts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        per_rollout, stats = self._per_rollout_losses(rollouts)
        return per_rollout.mean(), stats

    def entropy_probe_losses(self, batch) -> torch.Tensor:
        """The per-rollout losses L_u whose sum is the loss (the attribution protocol of
        ``EntropyProbe`` and ``entropy-callbacks probe``, docs/method.md §6). ``batch``: the
        training batch of the step (its rollouts, drawn in ``training_step``) or the Rollouts."""
        per_rollout, _ = self._per_rollout_losses(self._rollouts_for(batch))
        return per_rollout / len(per_rollout)

    def entropy_probe_rollouts(self, batch) -> dict[str, list]:
        """What the probe shows of each rollout: its text, reward, advantage, log q (at θ₀) and length."""
        rollouts = self._rollouts_for(batch)
        probe = rollouts.batch
        width = probe.prompt_length
        texts = [self.tokenizer.decode(probe.input_ids[i, width:][probe.response_mask[i, width:]].tolist())
                 for i in range(len(probe))]
        log_prob = probe.sampler_log_probs.double().sum(-1)
        return {"text": texts, "reward": rollouts.rewards.tolist(), "advantage": rollouts.advantages.tolist(),
                "log_prob": log_prob.tolist(), "length": probe.response_lengths.tolist()}

    def _rollouts_for(self, batch) -> Rollouts:
        if isinstance(batch, Rollouts):
            return batch
        found = getattr(self, "_rollouts_of", {}).get(id(batch))
        if found is None:
            raise ValueError("no rollouts were drawn for this batch in training_step")
        return found

    def _per_rollout_losses(self, rollouts: Rollouts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = rollouts.batch
        mask = batch.response_mask[:, batch.prompt_length:].float()
        log_q, entropy = self._token_log_probs(self.policy, batch)
        ratio = torch.exp(log_q - log_q.detach())  # on-policy: 1, with the gradient of log q
        advantage = rollouts.advantages[:, None]
        clipped = torch.clamp(ratio, 1 - self.hparams.clip_eps, 1 + self.hparams.clip_eps)
        per_token = -torch.minimum(ratio * advantage, clipped * advantage)
        if self.reference is not None:
            with torch.no_grad():
                ref_log_q, _ = self._token_log_probs(self.reference, batch)
            log_ratio = ref_log_q - log_q
            per_token = per_token + self.hparams.kl_coef * (torch.exp(log_ratio) - log_ratio - 1)
        per_token = per_token - self.hparams.entropy_coef * entropy
        lengths = mask.sum(1).clamp(min=1)
        stats = {"reward": rollouts.rewards.mean(), "entropy": (entropy * mask).sum() / mask.sum(),
                 "response_length": lengths.mean()}
        return (per_token * mask).sum(1) / lengths, stats

    def training_step(self, prompt_indices, batch_idx: int):
        rollouts = self.rollouts(prompt_indices.tolist(), _seed(self.hparams.seed, "rollouts", self.global_step))
        # EntropyProbe's attribution asks for this batch's per-rollout losses after the step (all
        # micro-batches of the step under accumulation: the last few batches are kept).
        recent = list(getattr(self, "_rollouts_of", {}).items())[-63:]
        self._rollouts_of = dict(recent + [(id(prompt_indices), rollouts)])
        loss, stats = self.policy_loss(rollouts)
        self.log("train/loss", loss, prog_bar=False)
        self.log("train/reward", stats["reward"], prog_bar=True)
        self.log("train/entropy", stats["entropy"], prog_bar=True)
        self.log("train/response_length", stats["response_length"])
        return loss

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # ---------------------------------------------------------------- artefacts
    def on_fit_start(self) -> None:
        # The tokenizer and model config are saved beside the run so it can be reloaded.
        log_dir = self.trainer.log_dir if self.trainer.log_dir else self.trainer.default_root_dir
        if self.trainer.is_global_zero and log_dir:
            target = Path(log_dir) / "policy"
            self.tokenizer.save_pretrained(target)
            config = getattr(self.policy, "config", None)
            if config is not None:
                config.save_pretrained(target)
