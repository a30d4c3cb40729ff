"""A small Lightning RL-style module for callback tests: a policy-gradient loss on random
sequences with random advantages, dropout in the policy, and global-RNG use in the step."""

from __future__ import annotations

import torch
import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from tiny_models import VOCAB


class TinyPolicyModule(pl.LightningModule):
    def __init__(self, policy, lr: float = 1e-2, optimizer: str = "adamw", scheduler: bool = False):
        super().__init__()
        self.policy = policy
        self.lr = lr
        self.optimizer_name = optimizer
        self.scheduler = scheduler

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        logits = self.policy(input_ids=tokens, use_cache=False).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        advantages = torch.randn(tokens.shape[0], 1, device=tokens.device)  # uses the global RNG
        loss = -(advantages * logp).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        else:
            opt = torch.optim.AdamW(params, lr=self.lr)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def random_token_loader(num: int = 64, length: int = 8, batch_size: int = 8, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, VOCAB, (num, length), generator=gen)
    return DataLoader(TensorDataset(tokens), batch_size=batch_size, shuffle=False)


class SeededAdvantageModule(TinyPolicyModule):
    """TinyPolicyModule whose advantages come from a generator seeded by the optimizer step
    instead of the global RNG, so a run resumed from a checkpoint (which carries neither the
    global RNG nor, for a plain DataLoader, the data position) trains exactly like the
    uninterrupted run when every batch holds the same tokens."""

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        logits = self.policy(input_ids=tokens, use_cache=False).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        gen = torch.Generator().manual_seed(self.trainer.global_step)
        advantages = torch.randn(tokens.shape[0], 1, generator=gen).to(tokens.device)
        loss = -(advantages * logp).mean()
        self.log("train/loss", loss)
        return loss


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call as (step, metrics) in memory, on every rank (no
    rank-zero filtering, so a test can see which rank logged what)."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append((step, {k: float(v) for k, v in metrics.items()}))

    def values(self, tag: str) -> dict[int, float]:
        """{step: value} of one tag (the last value logged at each step)."""
        return {step: m[tag] for step, m in self.logged if tag in m}
