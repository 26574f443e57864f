"""A live terminal view of a canvas while it denoises: accepted positions bright, re-noised ones dim.

On a terminal the canvas is redrawn in place every step; elsewhere (a pipe, a log) each step is one summary line.
"""

from __future__ import annotations

import os
import shutil
import sys

from .generate import Commit, Draft

GREEN, DIM, BOLD, RESET = "\x1b[32m", "\x1b[2m", "\x1b[1m", "\x1b[0m"


def token_text(tok, t: int) -> str:
    """One token as it would print, with whitespace made visible so the canvas keeps its shape."""
    if tok is None:
        return f"[{t}]"
    s = tok.decode([t])
    return s.replace("\n", "⏎").replace("\t", "⇥").replace("\r", "") or "·"


class CanvasView:
    def __init__(self, tok, out=None, live: bool | None = None, width: int | None = None):
        self.tok = tok
        self.out = out or sys.stderr
        self.live = self.out.isatty() if live is None else live
        self.width = width or shutil.get_terminal_size((100, 20)).columns
        self.lines = 0
        self.color = self.live and os.environ.get("NO_COLOR") is None
        self.sent = 0  # tokens of the current canvas that partial Commits (a grammar row's runs) carried

    def _paint(self, text: str, accepted: bool) -> str:
        if not self.color:
            return text
        return f"{GREEN}{text}{RESET}" if accepted else f"{DIM}{text}{RESET}"

    def _wrap(self, cells: list[tuple[str, bool]]) -> list[str]:
        lines, cur, n = [], [], 0
        for text, acc in cells:
            if n + len(text) > self.width and cur:
                lines.append("".join(cur))
                cur, n = [], 0
            cur.append(self._paint(text, acc))
            n += len(text)
        if cur:
            lines.append("".join(cur))
        return lines

    def draft(self, ev: Draft, max_steps: int) -> None:
        acc = sum(ev.accepted)
        restart = f" (restart {ev.attempt})" if ev.attempt else ""
        head = (f"canvas {ev.canvas}{restart} step {ev.step}/{max_steps}  accepted {acc}/{len(ev.tokens)}  "
                f"mean entropy {ev.mean_entropy:.3f}")
        if not self.live:
            print(head, file=self.out, flush=True)
            return
        body = self._wrap([(token_text(self.tok, t), a) for t, a in zip(ev.tokens, ev.accepted)])
        if self.lines:
            self.out.write(f"\x1b[{self.lines}A\r\x1b[J")
        text = "\n".join([(BOLD + head + RESET) if self.color else head, *body])
        self.out.write(text + "\n")
        self.out.flush()
        self.lines = len(body) + 1

    def commit(self, ev: Commit) -> None:
        if ev.partial:  # a grammar row's run, mid-canvas: the canvas goes on denoising in place
            self.sent += len(ev.tokens)
            return
        # The final canvas stays on screen; the next canvas draws below it.
        self.lines = 0
        n, self.sent = self.sent + len(ev.tokens), 0
        if not self.live:
            print(f"canvas {ev.canvas} committed after {ev.steps} steps ({n} tokens)", file=self.out, flush=True)


def describe_stats(stats: dict) -> str:
    """One line: the figures a user compares between diffusion and AR."""
    parts = [f"{stats['completion_tokens']} tokens", f"{stats['wall_s']:.2f} s",
             f"{stats['tokens_per_s']:.1f} tok/s" if stats.get("tokens_per_s") else None]
    if stats["mode"] == "diffusion":
        parts += [f"{stats['canvases']} canvas(es)",
                  f"{stats['mean_steps_per_canvas']:.1f} steps/canvas" if stats["mean_steps_per_canvas"] else None,
                  f"{stats['tokens_per_forward']:.2f} tokens/forward"]
        restarts = sum(stats.get("restarts_per_canvas") or ())
        if restarts:
            parts.append(f"{restarts} restart(s)")
    else:
        parts.append("autoregressive")
    if stats.get("cached_prompt_tokens"):
        parts.append(f"{stats['cached_prompt_tokens']} of {stats['prompt_tokens']} prompt tokens cached")
    return ", ".join(p for p in parts if p)
