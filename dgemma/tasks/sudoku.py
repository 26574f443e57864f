"""The Sudoku recipe: text format, a 16-token tokenizer, datasets, the model to train from scratch, evaluation.

Format (one puzzle = one prompt/response pair, the response fits one canvas):
    prompt    <bos> + 81 cells row by row, '1'-'9' or '.' for a blank           (82 tokens)
    response  81 digits of the solution + <eos>, EOS-padded to the canvas (96)
Vocabulary: DiffusionGemma's specials at their ids (0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4 <mask>), then '.',
'1'-'9' and '|' (a separator for display). Uniform noise draws from all 16 tokens, as inference does.

Training data: `generate_file` writes JSONL records {"prompt": puzzle, "response": solution, "clues": n} (valid
input for the generic `dgemma train` too). `SudokuDataset` serves them with a fresh validity-preserving symmetry
per (puzzle, epoch): digit relabelling, band/stack and row/column-within-band permutations, transposition (about
1.2e12 variants per puzzle), so a 100k-puzzle file never repeats an example in practice.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import FULL, SLIDING, ModelConfig
from ..train.data import DataError, Example, iter_jsonl
from ..train.noise import mix_seed
from .sudoku_board import BoardError, make_puzzle, parse, to_string

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
SYMBOLS = [".", *"123456789", "|"]
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + SYMBOLS)}  # 16 tokens
PAD, EOS, BOS = 0, 1, 2
CANVAS = 96
CELL_IDS = {c: VOCAB[c] for c in ".123456789"}
ID_CHAR = {i: c for c, i in VOCAB.items() if len(c) == 1}


# ---------------------------------------------------------------- the model and tokenizer
def model_config(**overrides) -> ModelConfig:
    """The recipe's model: every DiffusionGemma feature (sliding + full layers, GQA, V=K full layers, MoE top-2,
    self-conditioning) at 8.3M parameters (6.7M active). The window (256) exceeds prompt + canvas (178), so
    sliding layers attend everything: Sudoku constraints link any cell to any other."""
    base = dict(vocab_size=len(VOCAB), hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2, num_global_key_value_heads=1, head_dim=32,
                global_head_dim=64, sliding_window=256,
                layer_types=[SLIDING, SLIDING, SLIDING, FULL, SLIDING, SLIDING, SLIDING, FULL],
                num_experts=4, top_k_experts=2, moe_intermediate_size=128, max_position_embeddings=512,
                canvas_length=CANVAS, eos_token_id=[EOS], pad_token_id=PAD, bos_token_id=BOS,
                vision_soft_tokens_per_image=None)
    return ModelConfig(**{**base, **overrides})


def tokenizer():
    """The 16-token character tokenizer as a dgemma `Tokenizer` (saved with checkpoints as tokenizer.json)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from ..tokenizer import Tokenizer

    tk = Backend(models.WordLevel(dict(VOCAB), unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.add_special_tokens(SPECIALS)
    tk.decoder = decoders.Fuse()
    return Tokenizer(tk, bos_id=BOS, eos_ids=[EOS], pad_id=PAD, eos_id=EOS,
                     chat_template="{{ bos_token }}{{ messages[-1]['content'] }}")


def sampler_config(steps: int = 12):
    """The recipe's decoding settings, saved with every checkpoint: the target's budget of 12 steps (the shipped
    model stops after 8.5 on average; 24 adds 0.4 points for 6.7 more steps, recipes/sudoku.md). Much warmer than
    SamplerConfig's 0.4-0.8: the entropy bound applies to the tempered distribution, so a cold schedule accepts
    many cells per step, wrong ones included, and the early stop freezes them. Chosen on the validation set at step 500 of the GPU run; on the
    1,000 test boards at N = 12: 29.3% solved, against 24.5% at 0.8-1.0 and 20.4% at 0.4-0.8 (recipes/sudoku.md)."""
    from ..sampler import SamplerConfig

    return SamplerConfig(max_denoising_steps=steps, t_min=1.0, t_max=1.5)


# Restarts saved with checkpoints (not used by the solve check during training, which measures the model's single
# attempt): a board that spends all 12 steps without the early stop is one the model is unsure of. On the shipped
# model every failed board is such a board, and 3 restarts lift the solve rate from 92.7% to 95.6% at 10.6 steps
# on average, every attempt counted (recipes/sudoku.md).
RESTARTS = 3


def generation_config(steps: int = 12, restarts: int = RESTARTS) -> dict:
    return {**sampler_config(steps).replace(restarts=restarts).to_generation_config(), "max_new_tokens": 81,
            "eos_token_id": [EOS], "pad_token_id": PAD, "bos_token_id": BOS}


def prompt_ids(puzzle: str) -> list[int]:
    return [BOS] + [CELL_IDS[c] for c in puzzle]


def allowed_tokens(puzzle: str, canvas: int) -> dict[int, list[int]]:
    """The format and the givens as a constraint on the canvas (`GenerationParams.allowed`): a given cell allows
    its digit, a blank one the digits that no given in its row, column or box holds, every later position EOS.
    Static: what the puzzle alone rules out, not what the model has written (no propagation)."""
    from .sudoku_board import BOX, COL, ROW

    out: dict[int, list[int]] = {}
    for i, c in enumerate(puzzle):
        if c in "123456789":
            out[i] = [CELL_IDS[c]]
        else:
            seen = {puzzle[j] for j in range(81) if ROW[j] == ROW[i] or COL[j] == COL[i] or BOX[j] == BOX[i]}
            out[i] = [CELL_IDS[d] for d in "123456789" if d not in seen]
    out.update({i: [EOS] for i in range(81, canvas)})
    return out


def board_from_ids(ids: Sequence[int]) -> str | None:
    """The 81-digit board a model wrote, or None if it is not 81 digits."""
    s = "".join(ID_CHAR.get(int(i), "?") for i in ids)
    return s if len(s) == 81 and s.isdigit() and "0" not in s else None


# ---------------------------------------------------------------- data files
def _chunk(args) -> list[dict]:
    seed, n, lo, hi = args
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        clues = rng.randint(lo, hi)
        p, s = make_puzzle(clues, rng)
        out.append({"prompt": to_string(p), "response": to_string(s), "clues": clues})
    return out


def generate(n: int, clues: tuple[int, int], seed: int, workers: int = 1, chunk: int = 500,
             progress: bool = False) -> Iterator[dict]:
    """`n` records in a fixed order that depends only on (n, clues, seed): chunk i uses seed mix(seed, i), whatever
    the number of worker processes."""
    lo, hi = clues
    if not 17 <= lo <= hi <= 81:
        raise ValueError(f"clue range must satisfy 17 <= lo <= hi <= 81, got {lo}-{hi}")
    if lo < 22:
        print(f"note: random removal rarely reaches {lo} clues; generation will be slow", file=sys.stderr)
    jobs = [(mix_seed(seed, i), min(chunk, n - i * chunk), lo, hi) for i in range(-(-n // chunk))]
    t0, done = time.perf_counter(), 0
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_chunk, jobs) if pool else map(_chunk, jobs)
        for recs in results:
            done += len(recs)
            if progress:
                dt = time.perf_counter() - t0
                print(f"\r{done}/{n} puzzles  {done / dt:,.0f}/s", end="", file=sys.stderr, flush=True)
            yield from recs
    finally:
        if pool:
            pool.terminate()
        if progress:
            print(file=sys.stderr)


def read_puzzles(path: str | Path, limit: int | None = None) -> list[tuple[str, str]]:
    """(puzzle, solution) pairs of a Sudoku JSONL file; a bad line is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Sudoku file not found: {path}")
    out = []
    for where, rec in iter_jsonl(path):
        if not isinstance(rec, dict) or "prompt" not in rec or "response" not in rec:
            raise DataError(f"{where}: expected an object with 'prompt' (puzzle) and 'response' (solution)")
        try:
            p = to_string(parse(rec["prompt"]))
            s = to_string(parse(rec["response"], what="solution"))
        except BoardError as e:
            raise DataError(f"{where}: {e}") from None
        if "." in s or any(a != "." and a != b for a, b in zip(p, s)):
            raise DataError(f"{where}: the solution is incomplete or does not keep the puzzle's givens")
        out.append((p, s))
        if limit and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path} holds no puzzles")
    return out


# ---------------------------------------------------------------- symmetry augmentation
def symmetry(rng: random.Random) -> tuple[list[int], list[str]]:
    """A random validity-preserving map: (new cell -> old cell, old digit char -> new digit char table)."""
    def line_perm():
        bands = rng.sample(range(3), 3)
        return [3 * b + r for b in bands for r in rng.sample(range(3), 3)]

    rows, cols = line_perm(), line_perm()
    cells = [rows[i // 9] * 9 + cols[i % 9] for i in range(81)]
    if rng.random() < 0.5:
        cells = [cells[(i % 9) * 9 + i // 9] for i in range(81)]
    digits = rng.sample("123456789", 9)
    return cells, ["."] + digits  # table indexed by int(char) ('.' -> 0)


def apply_symmetry(board: str, sym) -> str:
    cells, table = sym
    return "".join(table[0 if board[j] == "." else int(board[j])] for j in cells)


@dataclass
class SudokuDataset:
    """The trainer's Dataset over (puzzle, solution) pairs, optionally with a fresh symmetry per (index, epoch)."""

    pairs: list[tuple[str, str]]
    augment: bool = True
    seed: int = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def example(self, index: int, epoch: int) -> Example:
        p, s = self.pairs[index]
        if self.augment:
            sym = symmetry(random.Random(mix_seed(self.seed, index, epoch)))
            p, s = apply_symmetry(p, sym), apply_symmetry(s, sym)
        return Example(tuple(prompt_ids(p)), tuple(CELL_IDS[c] for c in s) + (EOS,))


# ---------------------------------------------------------------- training run
def prepare_training(cfg, source: dict | None, *, resume: bool = False, out: str | None = None, quiet: bool = False):
    """A Trainer for the Sudoku recipe (new, or resumed from <out>/train_config.json).

    source: {"task": "sudoku", "data": train.jsonl, "eval_data": held-out.jsonl | None, "eval_puzzles": int,
             "eval_steps": int, "augment": bool, "overrides": {model config fields},
             "init_from": a Sudoku checkpoint to continue from (None: a new model from `model_config`)}
    """
    from ..train import state as S
    from ..train.dist import DistEnv
    from ..train.run import task_run
    from ..train.trainer import ListDataset, Trainer, TrainError, build_model
    import torch

    from ..weights import init_random, load_config, load_model, resolve
    from .sudoku_eval import evaluate, settings

    dist = DistEnv.from_env()
    cfg, source, out_dir, ckpt = task_run("sudoku", cfg, source, resume=resume, out=out)
    init_from = source.get("init_from")
    if init_from and source.get("overrides"):
        raise TrainError("--set changes the config of a new model; it cannot be used with --init-from")
    try:
        mcfg = load_config(resolve(init_from)) if init_from else model_config(**(source.get("overrides") or {}))
    except TypeError as e:
        raise TrainError(f"bad model option: {e}") from None
    if mcfg.vocab_size < len(VOCAB) or mcfg.canvas_length < 82:
        raise TrainError("the Sudoku model needs vocab_size >= 16 and canvas_length >= 82")
    train = SudokuDataset(read_puzzles(source["data"]), augment=source.get("augment", True), seed=cfg.seed)
    held = read_puzzles(source["eval_data"]) if source.get("eval_data") else []
    if not resume and dist.main:
        S.check_writable(out_dir)
        S.save_run_config(out_dir, {"train": cfg.to_dict(), "source": source})
    if init_from:  # continue training a Sudoku model (a new schedule and optimizer)
        def base():
            return load_model(init_from, dtype=torch.float32, quiet=True)
    else:
        def base():
            return init_random(mcfg, seed=cfg.seed)
    model = build_model(cfg, base_model=base, resume_from=ckpt)
    n_solve = int(source.get("eval_puzzles", 0))
    setting = settings((int(source.get("eval_steps", 12)),), fixed=False, ar=False, sampler=sampler_config())[0]

    def solve_check(m) -> dict:
        r = evaluate(m, held[:n_solve], setting, batch=n_solve)
        return {"solve_rate": r["solve_rate"], "solve_mean_steps": r["mean_steps"],
                "solve_cell_acc": r["cell_accuracy"]}

    evald = ListDataset([Example(tuple(prompt_ids(p)), tuple(CELL_IDS[c] for c in s) + (EOS,))
                         for p, s in held[:cfg.eval_examples]]) if held else None
    return Trainer(model, train, cfg, eval_data=evald, tokenizer=tokenizer(), generation_config=generation_config(),
                   eval_hook=solve_check if held and n_solve else None, resume_from=ckpt, dist=dist, quiet=quiet)
