"""The toy task and the reward functions.

Toy task "copy": the prompt is ``"a b ="`` for digits a, b; the right answer is ``b`` followed
by EOS. Reward = ½·[first token is b] + ½·[second token is EOS], so a random policy scores
about 1/15 and a policy that has learnt the task scores 1. A policy that learns it also
becomes nearly deterministic: its token entropy collapses, which is what the probe watches.

Task "arithmetic", for a real instruction-tuned model: "What is a + b? Answer with just the
number." for digits a, b in 1..9; reward "last_number" is 1 when the last integer in the
response is a + b (exact match of the number, whatever words surround it).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

Reward = Callable[[str, list[str], "PromptItem"], float]


@dataclass(frozen=True)
class PromptItem:
    prompt: str
    answer: str | None = None


def copy_task(held_out: int = 20, seed: int = 0) -> tuple[list[PromptItem], list[PromptItem]]:
    """(train, held-out) prompts of the copy task: all 100 digit pairs, split at random."""
    items = [PromptItem(f"{a} {b} =", str(b)) for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(items)
    return items[held_out:], items[:held_out]


def arithmetic_task(held_out: int = 16, seed: int = 0) -> tuple[list[PromptItem], list[PromptItem]]:
    """(train, held-out) prompts of single-digit addition: all 81 pairs, split at random."""
    items = [PromptItem(f"What is {a} + {b}? Answer with just the number.", str(a + b))
             for a in range(1, 10) for b in range(1, 10)]
    random.Random(seed).shuffle(items)
    return items[held_out:], items[:held_out]


TASKS = {"copy": copy_task, "arithmetic": arithmetic_task}


def task_items(name: str) -> tuple[list[PromptItem], list[PromptItem]]:
    if name not in TASKS:
        raise ValueError(f"task {name!r} is unknown; choose one of {sorted(TASKS)} or give a prompt_file")
    return TASKS[name]()


def load_prompt_file(path: str) -> list[PromptItem]:
    """A .jsonl file of {"prompt": ..., "answer": ...} objects, or a .txt file of prompts."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"prompt_file {path!r} does not exist")
    lines = [line for line in file.read_text().splitlines() if line.strip()]
    if file.suffix == ".jsonl":
        items = [PromptItem(str(obj["prompt"]), None if obj.get("answer") is None else str(obj["answer"]))
                 for obj in map(json.loads, lines)]
    else:
        items = [PromptItem(line) for line in lines]
    if not items:
        raise ValueError(f"prompt_file {path!r} holds no prompts")
    return items


def copy_reward(text: str, tokens: list[str], item: PromptItem) -> float:
    first = tokens[0] if tokens else None
    second = tokens[1] if len(tokens) > 1 else None
    return 0.5 * (first == item.answer) + 0.5 * (second == "<eos>")


def exact_match_reward(text: str, tokens: list[str], item: PromptItem) -> float:
    return float(item.answer is not None and text.strip() == item.answer.strip())


def contains_reward(text: str, tokens: list[str], item: PromptItem) -> float:
    return float(item.answer is not None and item.answer.strip() in text)


_INTEGER = re.compile(r"-?\d+")


def last_number_reward(text: str, tokens: list[str], item: PromptItem) -> float:
    numbers = _INTEGER.findall(text)
    return float(item.answer is not None and bool(numbers) and numbers[-1] == item.answer.strip())


REWARDS: dict[str, Reward] = {"copy": copy_reward, "exact_match": exact_match_reward, "contains": contains_reward,
                              "last_number": last_number_reward}


def reward_function(name: str) -> Reward:
    if name not in REWARDS:
        raise ValueError(f"reward {name!r} is unknown; choose one of {sorted(REWARDS)}")
    return REWARDS[name]
