"""Sudoku evaluation: exact whole-board solve rate and denoising steps, diffusion vs autoregressive decoding.

A puzzle counts as solved only if the 81 tokens before the first EOS are exactly its (unique) solution. For the
diffusion sampler, `steps` is the number of denoising steps the canvas used (the budget N, or fewer with the
stable-and-confident early stop), summed over a board's restarts (`SamplerConfig.restarts`); for AR decoding
it is the number of encoder passes (one per token).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..generate import AR, DIFFUSION, Draft, Done, GenerationParams, generate
from ..sampler import SamplerConfig
from .sudoku import ID_CHAR, allowed_tokens, board_from_ids, prompt_ids


@dataclass(frozen=True)
class Setting:
    name: str
    params: GenerationParams
    constrain: bool = False  # decode each puzzle under its `allowed_tokens`


def settings(budgets: Sequence[int] = (12, 24, 48), *, early: bool = True, fixed: bool = True, ar: bool = True,
             seed: int = 0, sampler: SamplerConfig | None = None, constrain: bool = False) -> list[Setting]:
    """The comparison grid: each step budget with early stopping and/or run to the end, plus AR greedy.
    `sampler` gives the temperature schedule, entropy bound and early-stop thresholds (default: SamplerConfig's);
    each budget replaces its step count; its `restarts` apply to the early-stop settings (a fixed run has no
    early stop to miss). constrain=True decodes every setting under `allowed_tokens` (names get a "constrained"
    suffix)."""
    base = sampler or SamplerConfig()
    out = []
    for n in budgets:
        if early:
            again = f", {base.restarts} restart{'s' * (base.restarts > 1)}" if base.restarts else ""
            out.append(Setting(f"diffusion N={n} early-stop{again}",
                               GenerationParams(max_new_tokens=81, seed=seed,
                                                sampler=base.replace(max_denoising_steps=n))))
        if fixed:
            # confidence 0 can never be undercut, so the canvas runs all N steps
            params = GenerationParams(max_new_tokens=81, seed=seed,
                                      sampler=base.replace(max_denoising_steps=n, confidence_threshold=0.0,
                                                           restarts=0))
            out.append(Setting(f"diffusion N={n} fixed", params))
    if ar:
        out.append(Setting("autoregressive (greedy)", GenerationParams(max_new_tokens=81, mode=AR)))
    if constrain:
        out = [Setting(s.name + ", constrained", s.params, constrain=True) for s in out]
    return out


@torch.no_grad()
def evaluate(model, pairs: Sequence[tuple[str, str]], setting: Setting, batch: int = 250) -> dict:
    """Solve rate, blank-cell accuracy and mean steps of one setting over (puzzle, solution) pairs."""
    solved = cells_ok = blanks = 0
    steps: list[int] = []
    restarted = 0
    t0 = time.perf_counter()
    for lo in range(0, len(pairs), batch):
        chunk = pairs[lo:lo + batch]
        # each puzzle gets its own seed so results do not depend on the batch size
        params = [setting.params.replace(seed=setting.params.seed + lo + j) for j in range(len(chunk))]
        if setting.constrain:
            T = model.cfg.canvas_length
            params = [prm.replace(allowed=allowed_tokens(p, T)) for prm, (p, _) in zip(params, chunk)]
        done = generate(model, [prompt_ids(p) for p, _ in chunk], params)
        for (p, s), d in zip(chunk, done):
            board = board_from_ids(d.tokens) or ""
            solved += board == s
            for i, c in enumerate(p):
                if c == ".":
                    blanks += 1
                    cells_ok += i < len(board) and board[i] == s[i]
            steps.append(d.stats["steps_per_canvas"][0] if setting.params.mode == DIFFUSION
                         else d.stats["encoder_passes"])
            restarted += bool(d.stats["restarts_per_canvas"] and d.stats["restarts_per_canvas"][0])
    wall = time.perf_counter() - t0
    n = len(pairs)
    sampler = setting.params.sampler.to_generation_config() if setting.params.mode == DIFFUSION else None
    return {"setting": setting.name, "sampler": sampler, "puzzles": n, "solve_rate": solved / n,
            "cell_accuracy": cells_ok / max(blanks, 1),
            "mean_steps": sum(steps) / n, "max_steps": max(steps), "restarted": restarted / n,
            "wall_s": round(wall, 2)}


def solve_frames(model, puzzle: str, params: GenerationParams
                 ) -> Iterator[tuple[int, str, float, int] | Done]:
    """Yield (step, board so far, mean entropy, restart) per denoising step, then the `Done`. Steps count on
    over restarts; the board shows the cells accepted at that step (the canvas keeps them) and '.' where the
    step renoised."""
    total = 0
    for ev in generate(model, [prompt_ids(puzzle)], params, drafts=True, events=True):
        if isinstance(ev, Draft):
            total += 1
            cells = "".join(ID_CHAR.get(tok, "?") if ok else "." for tok, ok in zip(ev.tokens[:81], ev.accepted))
            yield total, "".join(c if c in "123456789" else "." for c in cells), ev.mean_entropy, ev.attempt
        elif isinstance(ev, Done):
            yield ev


def print_solve(model, puzzle: str, params: GenerationParams, out=None) -> Done:
    """Draw the board after every denoising step (redrawn in place on a terminal); returns the final `Done`."""
    import sys

    from .sudoku_board import pretty

    out = out or sys.stdout
    tty, shown_lines = out.isatty(), 0
    for item in solve_frames(model, puzzle, params):
        if isinstance(item, Done):
            return item
        step, shown, h, attempt = item
        restart = f"  restart {attempt} (not sure: fresh noise)" if attempt else ""
        frame = (f"step {step:2d}{restart}  accepted {81 - shown.count('.'):2d}/81 cells  mean entropy {h:.4f}\n"
                 f"{pretty(shown)}\n")
        if tty and shown_lines:
            print(f"\033[{shown_lines}A\033[J", end="", file=out)
        print(frame, file=out, flush=True)
        shown_lines = frame.count("\n") + 1
    raise RuntimeError("generation ended without a result")
