"""The embedded default: a tiny tokenizer and policy, a toy task, and a GRPO module."""

from .grpo import GRPOModule, Rollouts
from .policy import LoraOptions, TinyModelOptions
from .task import PromptItem, arithmetic_task, copy_task

__all__ = ["GRPOModule", "Rollouts", "LoraOptions", "TinyModelOptions", "PromptItem", "copy_task", "arithmetic_task"]
