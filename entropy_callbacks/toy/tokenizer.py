"""A tiny word-level tokenizer for the toy task, built locally (no download)."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<eos>", "<bos>"]
WORDS = [str(d) for d in range(10)] + ["=", "+"]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace-separated words: ids 0 <pad>, 1 <eos>, 2 <bos>, then digits and symbols."""
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", padding_side="left")
    return tokenizer
