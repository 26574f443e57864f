"""The code recipe: the embedded default model, a small DiffusionGemma trained here on the Python standard library.

Stages (`dgemma code data | train | eval`, see recipes/code.md):
  data   the stdlib's `.py` files, split by file (a stable hash of the relative path puts ~3% in the held-out split,
         never trained on, the tokenizer included); a byte-level BPE (`tokenizers`) with DiffusionGemma's special
         tokens at their ids (0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4 <mask>), the chat-template markers and three
         fill-in-the-middle markers; every training file tokenized once into a flat uint16 array.
  train  examples drawn on the fly from that array, a fresh one per (index, epoch) so resume is exact:
           completion   prompt = up to PMAX tokens before a line start, response = the next canvas of code
           infill       prompt = the prefix; canvas = middle + EOS padding + the suffix's first tokens at the END of
                        the canvas, kept clean (that is how `--infill` / `suffix` run: the suffix is fixed there)
           FIM          prompt = <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|>, response = middle +
                        EOS: infill that left-to-right decoding can do too (the autoregressive comparison)
  eval   held-out functions: complete the body from its signature, and infill the body between signature and the
         rest of the file; the share that parses in place (`ast.parse`) and first-line exact match, diffusion vs
         autoregressive decoding of the same weights, with tokens/s.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import FULL, SLIDING, ModelConfig
from ..train.data import DataError, Example
from ..train.noise import mix_seed

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|think|>", "<|channel>",
            "<channel|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
PAD, EOS, BOS = 0, 1, 2
TURN_END = SPECIALS.index("<turn|>")
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = (SPECIALS.index(t) for t in ("<|fim_prefix|>", "<|fim_middle|>",
                                                                    "<|fim_suffix|>"))
VOCAB_SIZE = 8192
CANVAS = 128
PMAX = 128  # prompt tokens of left context in training (and evaluation)
HELD_OUT_PERCENT = 3
MAX_FILE_BYTES = 300_000


# ---------------------------------------------------------------- the corpus
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(relpath: str) -> bool:
    return int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def list_files(root: str | Path) -> list[tuple[str, str]]:
    """(relative path, text) of every `.py` file under `root` that reads as UTF-8 and parses, in path order
    (site-packages and oversized files left out)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"source directory not found: {root}")
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel.split("/") or path.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
            ast.parse(text)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        out.append((rel, text))
    if not out:
        raise DataError(f"no Python files under {root}")
    return out


def chat_template() -> str:
    from ..tokenizer import GEMMA4_CHAT_TEMPLATE

    return GEMMA4_CHAT_TEMPLATE


def train_tokenizer(texts: Sequence[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE over `texts`, DiffusionGemma's specials first. Newlines are always a token of their own,
    so every line starts on a token boundary (the examples cut at line starts)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    from ..tokenizer import Tokenizer

    tk = Backend(models.BPE(unk_token=None, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tk.train_from_iterator(texts, trainer=trainer)
    assert [tk.token_to_id(t) for t in SPECIALS] == list(range(len(SPECIALS)))
    return Tokenizer(tk, bos_id=BOS, eos_ids=[EOS, TURN_END], pad_id=PAD, eos_id=EOS, chat_template=chat_template())


def newline_id(tok) -> int:
    ids = tok.encode("\n", add_bos=False)
    assert len(ids) == 1, ids
    return ids[0]


def build_data(out: str | Path, root: str | Path | None = None, vocab_size: int = VOCAB_SIZE) -> dict:
    """Write <out>/tokenizer (tokenizer.json + side files), train.npy (uint16 tokens), train_files.npy (file start
    offsets), heldout.jsonl ({"path", "text"} per held-out file) and manifest.json; returns the manifest."""
    from ..io import atomic_path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(root) if root else stdlib_root()
    t0 = time.perf_counter()
    files = list_files(root)
    train = [(r, t) for r, t in files if not is_held_out(r)]
    held = [(r, t) for r, t in files if is_held_out(r)]
    tok = train_tokenizer([t for _, t in train], vocab_size)
    tok.save(out / "tokenizer")
    encoded = tok.backend.encode_batch([t for _, t in train], add_special_tokens=False)
    lengths = [len(e.ids) for e in encoded]
    flat = np.fromiter((i for e in encoded for i in e.ids), dtype=np.uint16, count=sum(lengths))
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    for name, arr in (("train.npy", flat), ("train_files.npy", starts)):
        with atomic_path(out / name) as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
    with atomic_path(out / "heldout.jsonl") as tmp, open(tmp, "w") as f:
        for r, t in held:
            f.write(json.dumps({"path": r, "text": t}) + "\n")
    manifest = {"source": str(root), "python": sys.version.split()[0], "train_files": len(train),
                "heldout_files": len(held), "train_tokens": int(flat.size),
                "train_bytes": sum(len(t) for _, t in train),
                "vocab_size": tok.vocab_size, "heldout_paths": [r for r, _ in held],
                "seconds": round(time.perf_counter() - t0, 1)}
    with atomic_path(out / "manifest.json") as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# ---------------------------------------------------------------- the model
def model_config(**overrides) -> ModelConfig:
    """The default code model: every DiffusionGemma feature (3:1 sliding/full layers, GQA, V=K full layers with
    their own head size, 8 experts top-2 beside a dense MLP, self-conditioning) at 20M parameters (10.6M active):
    40 MB in bf16. 128-token canvas; sliding window 128."""
    base = dict(vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                num_attention_heads=4, num_key_value_heads=2, num_global_key_value_heads=1, head_dim=64,
                global_head_dim=128, sliding_window=128,
                layer_types=[SLIDING, SLIDING, SLIDING, FULL] * 2,
                num_experts=8, top_k_experts=2, moe_intermediate_size=256, max_position_embeddings=8192,
                canvas_length=CANVAS, eos_token_id=[EOS, TURN_END], pad_token_id=PAD, bos_token_id=BOS,
                vision_soft_tokens_per_image=None)
    return ModelConfig(**{**base, **overrides})


def generation_config(steps: int = 16) -> dict:
    """The model's sampling defaults. Temperature 0.5 -> 0.2 instead of DiffusionGemma's 0.8 -> 0.4: on 40 held-out
    functions (none of the 200 that `code eval` scores) completions parsed 40% of the time against 27.5%."""
    from ..sampler import SamplerConfig

    return {**SamplerConfig(max_denoising_steps=steps, t_min=0.2, t_max=0.5).to_generation_config(),
            "max_new_tokens": CANVAS,
            "eos_token_id": [EOS, TURN_END], "pad_token_id": PAD, "bos_token_id": BOS}


# ---------------------------------------------------------------- examples
@dataclass
class CodeDataset:
    """Training examples drawn from a flat token array (files back to back, `starts` = file offsets).

    `example(index, epoch)` is a pure function of (seed, index, epoch): a random line start in a random place
    (uniform over tokens), then one of the three kinds by `mix` = (completion, infill) shares, FIM the rest.
    """

    tokens: np.ndarray
    starts: np.ndarray
    newline: int
    canvas: int = CANVAS
    pmax: int = PMAX
    seed: int = 0
    mix: tuple[float, float] = (0.5, 0.3)
    stride: int = 64

    def __post_init__(self):
        nl = np.nonzero(self.tokens == self.newline)[0] + 1
        self.line_starts = np.unique(np.concatenate([self.starts[:-1], nl[nl < self.tokens.size]]))

    def __len__(self) -> int:
        return max(1, int(self.tokens.size) // self.stride)

    def _toks(self, a: int, b: int) -> list[int]:
        return self.tokens[a:b].tolist()

    def _line_starts(self, a: int, b: int) -> np.ndarray:
        """Line starts in (a, b]."""
        return self.line_starts[np.searchsorted(self.line_starts, a, "right"):np.searchsorted(self.line_starts, b,
                                                                                               "right")]

    def example(self, index: int, epoch: int) -> Example:
        rng = random.Random(mix_seed(self.seed, index, epoch))
        pos = rng.randrange(int(self.tokens.size))
        f = int(np.searchsorted(self.starts, pos, "right")) - 1
        fs, fe = int(self.starts[f]), int(self.starts[f + 1])
        k = int(np.searchsorted(self.line_starts, pos))
        c = int(self.line_starts[k]) if k < self.line_starts.size and self.line_starts[k] < fe else fs
        prefix = self._toks(max(fs, c - self.pmax), c)
        u = rng.random()
        T = self.canvas
        if u < self.mix[0] or fe - c < 2:
            return self._completion(prefix, c, fe)
        if u < self.mix[0] + self.mix[1]:
            s = rng.randint(1, T // 2)
            e = self._middle_end(rng, c, min(c + T - s, fe - 1))
            s = min(s, fe - e)
            middle, suffix = self._toks(c, e), self._toks(e, e + s)
            canvas = middle + [EOS] * (T - len(middle) - s) + suffix
            return Example(tuple([BOS] + prefix), tuple(canvas), fixed=s)
        e = self._middle_end(rng, c, min(c + T - 1, fe))
        pre = prefix[-(self.pmax // 2):]
        suffix = self._toks(e, min(e + rng.randint(1, self.pmax // 3), fe))
        prompt = [BOS, FIM_PREFIX, *pre, FIM_SUFFIX, *suffix, FIM_MIDDLE]
        return Example(tuple(prompt), tuple(self._toks(c, e) + [EOS]))

    def _middle_end(self, rng: random.Random, c: int, hi: int) -> int:
        """A line start in (c, hi] (a random position there when the span has none)."""
        cand = self._line_starts(c, hi)
        return int(cand[rng.randrange(cand.size)]) if cand.size else rng.randint(c + 1, max(c + 1, hi))

    def _completion(self, prefix: list[int], c: int, fe: int) -> Example:
        T = self.canvas
        resp = self._toks(c, c + T) if fe - c >= T else self._toks(c, fe) + [EOS]
        return Example(tuple([BOS] + prefix), tuple(resp))


def load_dataset(data_dir: str | Path, seed: int = 0, canvas: int = CANVAS) -> CodeDataset:
    from ..tokenizer import Tokenizer

    data_dir = Path(data_dir)
    need = [data_dir / n for n in ("train.npy", "train_files.npy", "tokenizer/tokenizer.json")]
    missing = [str(p) for p in need if not p.is_file()]
    if missing:
        raise DataError(f"{data_dir} is not a code data directory (missing {', '.join(missing)}); "
                        "make one with `dgemma code data --out DIR`")
    tok = Tokenizer.from_dir(data_dir / "tokenizer")
    return CodeDataset(np.load(data_dir / "train.npy"), np.load(data_dir / "train_files.npy"), newline_id(tok),
                       canvas=canvas, seed=seed)


def heldout_files(data_dir: str | Path) -> list[tuple[str, str]]:
    path = Path(data_dir) / "heldout.jsonl"
    if not path.is_file():
        raise DataError(f"no held-out files in {data_dir} (make the data with `dgemma code data`)")
    return [(r["path"], r["text"]) for r in map(json.loads, path.read_text().splitlines()) if r]


def heldout_dataset(data_dir: str | Path, tok, canvas: int = CANVAS, seed: int = 1) -> CodeDataset:
    """The same example mix over the held-out files (for held-out loss)."""
    files = heldout_files(data_dir)
    enc = [tok.encode(t, add_bos=False) for _, t in files]
    flat = np.fromiter((i for e in enc for i in e), dtype=np.uint16, count=sum(map(len, enc)))
    starts = np.concatenate([[0], np.cumsum([len(e) for e in enc])]).astype(np.int64)
    return CodeDataset(flat, starts, newline_id(tok), canvas=canvas, seed=seed)


# ---------------------------------------------------------------- training run
def prepare_training(cfg, source: dict | None, *, resume: bool = False, out: str | None = None, quiet: bool = False):
    """A Trainer for the code recipe (new, or resumed from <out>/train_config.json).

    source: {"task": "code", "data": data dir, "eval_examples": int, "overrides": {model config fields}}
    """
    from ..tokenizer import Tokenizer
    from ..train import state as S
    from ..train.dist import DistEnv
    from ..train.run import task_run
    from ..train.trainer import ListDataset, Trainer, TrainError, build_model
    from ..weights import init_random

    dist = DistEnv.from_env()
    cfg, source, out_dir, ckpt = task_run("code", cfg, source, resume=resume, out=out)
    try:
        mcfg = model_config(**(source.get("overrides") or {}))
    except TypeError as e:
        raise TrainError(f"bad model option: {e}") from None
    train = load_dataset(source["data"], seed=cfg.seed, canvas=mcfg.canvas_length)
    tok = Tokenizer.from_dir(Path(source["data"]) / "tokenizer")
    if tok.vocab_size > mcfg.vocab_size:
        raise TrainError(f"the tokenizer has {tok.vocab_size} tokens but the model only {mcfg.vocab_size}")
    held = heldout_dataset(source["data"], tok, canvas=mcfg.canvas_length)
    evald = ListDataset([held.example(i * 7919 % len(held), 0) for i in range(cfg.eval_examples)])
    if not resume and dist.main:
        S.check_writable(out_dir)
        S.save_run_config(out_dir, {"train": cfg.to_dict(), "source": source})
    model = build_model(cfg, base_model=lambda: init_random(mcfg, seed=cfg.seed), resume_from=ckpt)
    return Trainer(model, train, cfg, eval_data=evald, tokenizer=tok, generation_config=generation_config(),
                   resume_from=ckpt, dist=dist, quiet=quiet)
