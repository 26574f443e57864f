"""Held-out evaluation of the code model: loss, and completing / infilling the bodies of held-out functions.

A task is one function from a held-out file (never trained on) whose body is 4 .. canvas-32 tokens:
    prefix = the file up to the body (the signature included), middle = the body, suffix = the rest of the file.
  completion  the prompt is the prefix's last PMAX tokens; one canvas is generated and the body is its lines up to
              the first non-blank line indented no deeper than the `def`.
  infill      diffusion: the prefix as prompt and the suffix's first canvas/4 tokens fixed at the canvas end (what
              `--infill` and the server's `suffix` do); the middle is everything before the first EOS.
              FIM prompt: <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|>, decoded by diffusion and by
              autoregression (left-to-right decoding has no other way to see the suffix).
Scores: `parses`, the share of files that `ast.parse` accepts with the generated part in place of the body;
`first_line`, the share whose first non-blank generated line equals the body's (trailing spaces ignored); tokens/s
at batch 1.
"""

from __future__ import annotations

import ast
import random
import sys
import time
from dataclasses import dataclass

import torch

from ..generate import Done, generate
from .code import BOS, EOS, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, PMAX, heldout_dataset, heldout_files


@dataclass(frozen=True)
class Task:
    path: str
    line: int
    indent: int
    prefix: str
    middle: str
    suffix: str


def functions(files: list[tuple[str, str]], tok, n: int, canvas: int, seed: int = 0) -> list[Task]:
    """`n` held-out functions (a fixed random choice among those whose body fits the canvas with room to spare)."""
    cands = []
    for path, text in files:
        lines = text.splitlines(keepends=True)
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.body[0].lineno <= node.lineno:
                continue
            b0, end = node.body[0].lineno - 1, node.end_lineno
            prefix, middle, suffix = "".join(lines[:b0]), "".join(lines[b0:end]), "".join(lines[end:])
            if not suffix.strip() or not middle.endswith("\n"):
                continue
            if 4 <= len(tok.encode(middle, add_bos=False)) <= canvas - 32:
                cands.append(Task(path, node.lineno, node.col_offset, prefix, middle, suffix))
    cands.sort(key=lambda t: (t.path, t.line))
    return random.Random(seed).sample(cands, min(n, len(cands)))


def completion_body(text: str, indent: int) -> str:
    """The generated lines that belong to the function: up to the first non-blank line at or left of the `def`."""
    out = []
    for line in text.splitlines(keepends=True):
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        out.append(line)
    return "".join(out)


def first_line(text: str) -> str:
    return next((ln.rstrip() for ln in text.splitlines() if ln.strip()), "")


def parses(task: Task, body: str) -> bool:
    if not body.strip():
        return False
    try:
        ast.parse(task.prefix + body + task.suffix)
        return True
    except (SyntaxError, ValueError):
        return False


def _prefix_ids(tok, text: str, n: int) -> list[int]:
    return tok.encode(text, add_bos=False)[-n:] if n else []


def run_setting(pipe, tasks: list[Task], name: str, steps: int, seed: int) -> dict:
    """One (mode, prompt format) over all tasks, one request at a time."""
    tok, T = pipe.tokenizer, pipe.model.cfg.canvas_length
    ok = first = gen_tokens = fell_back = 0
    wall, passes, step_counts, samples = 0.0, 0, [], []
    kind, mode = name.split(":")
    fallback = top_p = None
    refine = mode == "ar-draft"  # AR's own (greedy) answer as the first canvas's draft, refined by diffusion
    changed = 0
    if refine:
        mode = "diffusion"
    if mode.startswith("fallback@"):  # diffusion, with canvases above this mean entropy decoded AR instead
        mode, fallback = "diffusion", float(mode.split("@", 1)[1])
    elif mode.startswith("top_p@"):  # diffusion, each step cut to its nucleus
        mode, top_p = "diffusion", float(mode.split("@", 1)[1])
    for i, task in enumerate(tasks):
        opts = dict(max_new_tokens=T, seed=seed + i, steps=steps, ar_fallback=fallback, top_p=top_p)
        if kind == "infill-canvas":
            suffix = tok.encode(task.suffix, add_bos=False)[:T // 4]
            prompt = [BOS, *_prefix_ids(tok, task.prefix, PMAX)]
            params = pipe.params(fixed={T - len(suffix) + j: t for j, t in enumerate(suffix)}, **opts)
        elif kind == "infill-fim":
            prompt = [BOS, FIM_PREFIX, *_prefix_ids(tok, task.prefix, PMAX // 2), FIM_SUFFIX,
                      *tok.encode(task.suffix, add_bos=False)[:PMAX // 3], FIM_MIDDLE]
            params = pipe.params(ar=mode == "ar", **opts)
        else:
            prompt = [BOS, *_prefix_ids(tok, task.prefix, PMAX)]
            draft = None
            if refine:
                first_pass = generate(pipe.model, [prompt], pipe.params(ar=True, max_new_tokens=T, seed=seed + i),
                                      tokenizer=tok)[0]
                draft = first_pass.tokens + ([EOS] if len(first_pass.tokens) < T else [])
                wall += first_pass.stats["wall_s"]
                passes += first_pass.stats["encoder_passes"]
            params = pipe.params(ar=mode == "ar", init_canvas=draft, **opts)
        done: Done = generate(pipe.model, [prompt], params, tokenizer=tok)[0]
        ids = list(done.tokens)
        if kind == "infill-canvas":
            ids = ids[:T - len(suffix)]
        if EOS in ids:
            ids = ids[:ids.index(EOS)]
        if refine:
            changed += ids != first_pass.tokens
        text = tok.decode(ids)
        body = completion_body(text, task.indent) if kind == "completion" else text
        good = parses(task, body)
        ok += good
        first += first_line(body) == first_line(task.middle)
        gen_tokens += len(done.tokens)
        fell_back += bool(done.stats.get("ar_fallback_canvases"))
        wall += done.stats["wall_s"]
        passes += done.stats["decoder_passes"] or done.stats["encoder_passes"]
        if done.stats["mean_steps_per_canvas"]:
            step_counts.append(done.stats["mean_steps_per_canvas"])
        if len(samples) < 3:
            samples.append({"path": task.path, "line": task.line, "generated": body, "reference": task.middle,
                            "parses": good})
    n = max(len(tasks), 1)
    return {"setting": name, "functions": len(tasks), "parses": ok / n, "first_line": first / n,
            "tokens_per_s": gen_tokens / wall if wall else None, "tokens_per_forward": gen_tokens / max(passes, 1),
            "mean_steps_per_canvas": sum(step_counts) / len(step_counts) if step_counts else None,
            "ar_fallback_share": fell_back / n if fallback is not None else None,
            "draft_changed_share": changed / n if refine else None,  # ar-draft: outputs that differ from the draft
            "wall_s": round(wall, 1), "samples": samples}


SETTINGS = ("completion:diffusion", "completion:ar", "infill-canvas:diffusion", "infill-fim:diffusion",
            "infill-fim:ar")
# also accepted by --settings, not run by default: completion from AR's answer as the draft, refined by diffusion
EXTRA_SETTINGS = ("completion:ar-draft",)


def heldout_loss(pipe, data_dir, n: int) -> dict:
    """Held-out loss of the DiffusionGemma objective (canvas CE with self-conditioning as in training, encoder
    next-token CE), nats per token, with fixed noise."""
    from ..train.loss import ObjectiveConfig
    from ..train.trainer import LossModule, heldout_stats

    ds = heldout_dataset(data_dir, pipe.tokenizer, canvas=pipe.model.cfg.canvas_length)
    exs = [ds.example(i * 7919 % len(ds), 0) for i in range(n)]
    return {**heldout_stats(LossModule(pipe.model, ObjectiveConfig()), exs), "examples": n}


def run_eval(model: str, data_dir: str, *, n: int = 200, steps: int = 16, seed: int = 0, loss_examples: int = 256,
             settings=SETTINGS, progress: bool = False) -> dict:
    from ..pipeline import Pipeline

    pipe = Pipeline.load(model, dtype=torch.float32, device="cpu", quiet=True)
    if pipe.tokenizer is None:
        raise ValueError(f"{model} has no tokenizer.json")
    tasks = functions(heldout_files(data_dir), pipe.tokenizer, n, pipe.model.cfg.canvas_length, seed=seed)
    report = {"model": str(model), "data": str(data_dir), "steps": steps, "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    if loss_examples:
        report["heldout_loss"] = heldout_loss(pipe, data_dir, loss_examples)
    report["results"] = []
    for name in settings:
        r = run_setting(pipe, tasks, name, steps, seed)
        report["results"].append(r)
        if progress:
            print(format_row(r), file=sys.stderr, flush=True)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    return report


def format_row(r: dict) -> str:
    steps = f"{r['mean_steps_per_canvas']:5.1f}" if r["mean_steps_per_canvas"] else "    -"
    share = r.get("ar_fallback_share")
    return (f"{r['setting']:<26} parses {100 * r['parses']:5.1f}%  first line {100 * r['first_line']:5.1f}%  "
            f"{r['tokens_per_s']:7.1f} tok/s  {r['tokens_per_forward']:5.2f} tok/forward  steps {steps}"
            + (f"  AR fallback {100 * share:5.1f}%" if share is not None else "")
            + (f"  draft changed {100 * r['draft_changed_share']:5.1f}%" if r.get("draft_changed_share") is not None
               else ""))


def format_report(report: dict) -> str:
    lines = []
    if "heldout_loss" in report:
        h = report["heldout_loss"]
        lines.append(f"held-out loss ({h['examples']} examples): diffusion {h['diffusion_loss']:.3f}  "
                     f"autoregressive {h['ar_loss']:.3f} nats/token")
    lines += [format_row(r) for r in report["results"]]
    return "\n".join(lines)

