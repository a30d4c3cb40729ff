"""Finding the policy on a user's module, and its special tokens (shared by the callback and
``entropy-callbacks probe``; no Lightning here)."""

from __future__ import annotations

import operator
from typing import Any

import torch


def is_causal_lm(module: Any) -> bool:
    """A Hugging Face model or a peft wrapper of one."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = ()
    from transformers import PreTrainedModel

    return isinstance(module, (PreTrainedModel, PeftModel))


def causal_lms(module: torch.nn.Module) -> list[str]:
    """Attribute paths of the outermost causal LMs inside ``module`` (a peft wrapper, not the
    model it wraps)."""
    found: list[str] = []
    for name, child in module.named_modules():
        if name and is_causal_lm(child) and not any(name.startswith(outer + ".") for outer in found):
            found.append(name)
    return found


def resolve_policy(module: torch.nn.Module, path: str | None, owner: str = "EntropyProbe") -> torch.nn.Module:
    """The HF causal LM being trained: at ``path``, the module itself, or the only one found
    anywhere inside it (several: a ValueError asking for ``policy``)."""
    candidates = causal_lms(module)
    if path is not None:
        try:
            policy = operator.attrgetter(path)(module)
        except AttributeError:
            raise ValueError(f"{owner}(policy={path!r}): {type(module).__name__} has no attribute {path!r}; "
                             f"causal LMs found on it: {candidates or 'none'}") from None
        if not isinstance(policy, torch.nn.Module):
            raise ValueError(f"{owner}(policy={path!r}) is a {type(policy).__name__}, not a torch module")
        return policy
    if is_causal_lm(module):
        return module
    if len(candidates) == 1:
        return operator.attrgetter(candidates[0])(module)
    if not candidates:
        raise ValueError(f"{owner} found no Hugging Face causal LM on {type(module).__name__}; set "
                         "`policy` to the attribute path of the model (e.g. policy='model')")
    raise ValueError(f"{owner} found several causal LMs on {type(module).__name__}: {candidates}; set "
                     "`policy` to the one being trained")


def token_id(value) -> int | list[int] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value] if value else None
    return int(value)


def special_tokens(policy: torch.nn.Module, tokenizer=None, eos_token_id=None,
                   pad_token_id: int | None = None) -> tuple[int | list[int], int]:
    """(eos, pad): the given ids, else the policy's generation config, its config, the tokenizer
    (in that order for EOS; tokenizer first for PAD); PAD falls back to EOS. An id of 0 counts."""
    eos = token_id(eos_token_id)
    for source in (getattr(policy, "generation_config", None), getattr(policy, "config", None), tokenizer):
        if eos is None:
            eos = token_id(getattr(source, "eos_token_id", None))
    if eos is None:
        raise ValueError("could not find an EOS token id on the policy or tokenizer; set eos_token_id")
    pad = pad_token_id
    for source in (tokenizer, getattr(policy, "generation_config", None), getattr(policy, "config", None)):
        if pad is None:
            pad = getattr(source, "pad_token_id", None)
    if pad is None:
        pad = eos if isinstance(eos, int) else eos[0]
    return eos, int(pad)


def check_trainable(policy: torch.nn.Module) -> None:
    """A step of a policy with no trainable parameter moves nothing the probe could see."""
    if not any(p.requires_grad for p in policy.parameters()):
        raise ValueError(f"the policy ({type(policy).__name__}) has no trainable parameters (requires_grad=True); "
                         "the probe measures the step of the parameters being trained — point `policy` at the "
                         "trained model")


# What transformers' generate() uses when do_sample=True and the generation config leaves it unset.
_GENERATE_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}


def sampling_mismatch(policy: torch.nn.Module, sampling) -> str | None:
    """How the policy's own ``generation_config`` (when it samples) differs from ``sampling``, or
    None. E must be drawn the way the rollouts are, or the probe describes another distribution;
    HF's default top_k=50 against our top_k=0 (off) is the usual slip."""
    config = getattr(policy, "generation_config", None)
    if config is None or not getattr(config, "do_sample", False):
        return None
    differs = []
    for name, default in _GENERATE_DEFAULTS.items():
        theirs = getattr(config, name, None)
        theirs = default if theirs is None else theirs
        ours = getattr(sampling, name)
        if name == "top_k" and (theirs or 0) <= 0 and ours <= 0:
            continue  # both off
        if theirs != ours:
            differs.append(f"{name} {theirs!r} there, {ours!r} here")
    if not differs:
        return None
    return ("the policy's generation_config samples differently from the probe's SamplingConfig (" + "; ".join(differs)
            + "): E should be drawn the way your rollouts are; set `sampling` to match (top_k=0 means off)")
