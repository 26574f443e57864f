"""Predicted Outputs on diffusion: the shipped code model writing held-out standard-library code with and without
the expected text as its `prediction` (OpenAI's field; `dgemma generate --prediction`), beside AR of the same
weights.

    python bench/prediction.py [--cases 12] [--tokens 512] [--threads 2] [--out bench/results-prediction.json]

Each case is a function of a held-out standard-library file (the code recipe's split: never trained on). The
prompt is up to 256 tokens of the file before the function plus its `def` line; the target is the `--tokens`
tokens after that line. Every setting writes exactly that many tokens (ignore_eos), so tokens/s compare:

  plain    diffusion, no prediction
  exact    prediction = the target itself (a file rewritten unchanged, the best case)
  edited   prediction = the target with every 6th line left out (the model must write what the prediction lacks,
           and the drafts after each gap must be found again)
  ar       autoregressive decoding of the same weights, no prediction

Reported per setting, over the cases: wall seconds and tokens/s (median), steps per canvas (mean), the share of the
target's tokens the output holds in order (difflib's matching blocks over token ids) and, with a prediction, the
share of the prediction's tokens kept where a draft put them (`accepted_prediction_tokens`).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _results import write_results  # noqa: E402
from dgemma.pipeline import Pipeline  # noqa: E402
from dgemma.tasks.code import is_held_out, list_files  # noqa: E402


def cases(pipe, n: int, tokens: int) -> list[tuple[list[int], list[int], str]]:
    """(prompt ids, target ids, where) of `n` functions of held-out stdlib files, one per file."""
    out = []
    for rel, text in list_files(sysconfig.get_paths()["stdlib"]):
        if not is_held_out(rel):
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.parse(text).body:
            if not isinstance(node, ast.FunctionDef):
                continue
            head = "".join(lines[:node.lineno])  # up to and including the def line
            target = pipe.encode("".join(lines[node.lineno:]), add_bos=False)[:tokens]
            if len(target) == tokens:
                out.append((pipe.encode(head)[-256:], target, f"{rel}:{node.lineno}"))
                break
        if len(out) == n:
            break
    return out


def edited(pipe, target: list[int]) -> list[int]:
    lines = pipe.decode(target).splitlines(keepends=True)
    return pipe.encode("".join(line for i, line in enumerate(lines) if i % 6 != 5), add_bos=False)


def matched(out: list[int], target: list[int]) -> float:
    blocks = difflib.SequenceMatcher(None, out, target, autojunk=False).get_matching_blocks()
    return sum(b.size for b in blocks) / len(target)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dgemma/models/code", help="a checkpoint (relative: to the repository)")
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results-prediction.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = Pipeline.load(str(ROOT / args.model), quiet=True)
    todo = cases(pipe, args.cases, args.tokens)
    settings = {"plain": lambda t: {}, "exact": lambda t: {"prediction": t},
                "edited": lambda t: {"prediction": edited(pipe, t)}, "ar": lambda t: {"ar": True}}
    pipe.generate([todo[0][0]], max_new_tokens=32, ignore_eos=True)  # warm-up
    rows = {name: [] for name in settings}
    for prompt, target, where in todo:
        for name, extra in settings.items():
            kw = extra(target)
            ar = kw.pop("ar", False)
            t0 = time.perf_counter()
            [done] = pipe.generate([prompt], ar=ar, seed=1, max_new_tokens=len(target), ignore_eos=True, **kw)
            wall = time.perf_counter() - t0
            st = done.stats
            rows[name].append({
                "case": where, "wall_s": wall, "tokens_per_s": len(done.tokens) / wall,
                "steps_per_canvas": st["mean_steps_per_canvas"], "target_matched": matched(done.tokens, target),
                "prediction_kept": (st["accepted_prediction_tokens"] / len(kw["prediction"])
                                    if "prediction" in kw else None)})
            print(f"{where:<40} {name:<7} {wall:6.2f} s  {rows[name][-1]['tokens_per_s']:7.1f} tok/s  "
                  f"target {rows[name][-1]['target_matched']:.2f}", flush=True)
    summary = {}
    for name, rs in rows.items():
        steps = [r["steps_per_canvas"] for r in rs if r["steps_per_canvas"] is not None]
        kept = [r["prediction_kept"] for r in rs if r["prediction_kept"] is not None]
        summary[name] = {"wall_s": statistics.median(r["wall_s"] for r in rs),
                         "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                         "steps_per_canvas": statistics.mean(steps) if steps else None,
                         "target_matched": statistics.mean(r["target_matched"] for r in rs),
                         "prediction_kept": statistics.mean(kept) if kept else None}
    dtype = str(next(pipe.model.parameters()).dtype).replace('torch.', '')
    print(f"\n{len(todo)} cases, {args.tokens} tokens each, {dtype}, {args.threads} threads")
    print(f"{'setting':<8}{'wall s':>9}{'tok/s':>9}{'steps/canvas':>14}{'target matched':>16}{'prediction kept':>17}")
    for name, s in summary.items():
        steps = "-" if s["steps_per_canvas"] is None else f"{s['steps_per_canvas']:.2f}"
        kept = "-" if s["prediction_kept"] is None else f"{s['prediction_kept']:.1%}"
        print(f"{name:<8}{s['wall_s']:>9.2f}{s['tokens_per_s']:>9.1f}{steps:>14}{s['target_matched']:>16.1%}"
              f"{kept:>17}")
    write_results(args.out, "prediction.py", argv, args.threads, dtype=dtype, model=args.model, tokens=args.tokens,
                  summary=summary, cases=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
