"""Held-out prompts for E: from a list or a .txt/.jsonl file, as token-id lists."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Union

PromptSource = Union[str, Sequence[str], Sequence[Sequence[int]]]


def load_prompts(source: PromptSource) -> list:
    """A list of prompts (strings or token-id lists) from a list or a file path.

    ``.txt``: one prompt per non-empty line. ``.jsonl``: one JSON value per line, a string, a
    list of token ids, or an object with a ``"prompt"`` field.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix not in (".txt", ".jsonl"):
            raise ValueError(f"prompts file {path} must end in .txt or .jsonl (or pass a list of prompts)")
        if not path.is_file():
            raise ValueError(f"prompts file {path} does not exist")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if path.suffix == ".txt":
            prompts = lines
        else:
            prompts = []
            for number, line in enumerate(lines, 1):
                value = json.loads(line)
                prompts.append(value["prompt"] if isinstance(value, dict) else value)
        if not prompts:
            raise ValueError(f"prompts file {path} holds no prompts; add at least one non-empty line")
        return prompts
    prompts = list(source)
    if not prompts:
        raise ValueError("prompts is empty; pass at least one held-out prompt")
    return prompts


def encode_prompt(text: str, tokenizer, chat_template: bool = False) -> list[int]:
    """Token ids of one prompt; with ``chat_template`` it becomes one user turn of the tokenizer's
    chat template followed by the assistant's header, as a chat model's rollouts are prompted."""
    if not chat_template:
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template=True but the tokenizer has no chat template; set chat_template: false "
                         "or use the model's chat tokenizer")
    formatted = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                              add_generation_prompt=True)
    return list(tokenizer(formatted, add_special_tokens=False)["input_ids"])


def tokenize_prompts(prompts: list, tokenizer=None, chat_template: bool = False) -> list[list[int]]:
    """Token-id lists; strings need a tokenizer (and are chat-formatted with ``chat_template``).
    Token-id lists are taken as they are."""
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("prompts are strings but no tokenizer was found; set `tokenizer` to the attribute "
                                 "path of the tokenizer on your LightningModule, or pass token-id lists")
            ids = encode_prompt(prompt, tokenizer, chat_template)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompt {i} tokenizes to nothing")
        out.append(list(ids))
    return out
