"""`dgemma demo` (what `make demo` runs): the shipped models end to end, diffusion beside autoregressive decoding.

  1. Sudoku: the shipped Sudoku model fills a board it has never seen, the canvas drawn after every denoising
     step, then the same checkpoint decodes it left to right.
  2. Code completion: the shipped code model writes a function body from its signature, the canvas drawn live.
  3. Infill: the same model fills a function body between its signature and the code after it (the suffix is
     fixed at the canvas end); autoregressive decoding infills through a fill-in-the-middle prompt.
  4. Structured output: the same model writes a JSON object held to a JSON schema, diffusion and AR.
  5. Predicted Outputs: the same model rewrites code given its current text as the prediction (OpenAI's
     `prediction`): every canvas starts from the predicted text, so it settles in a few steps.
Each run prints its stats (steps per canvas, tokens per forward pass, tokens/s) next to the other decoder's.
Without a shipped code model it runs a random model with the real Gemma vocabulary and says so.
"""

from __future__ import annotations


import torch

from .assets import shipped_model

PUZZLE = "...7..89......2.5.3.........26...9.....57.2..8....36459.4...18668715..24..2.6.5.."  # 32 clues, unseen

COMPLETION = '''def count_words(text):
    """Return a dict mapping each word of text to the number of times it occurs."""
'''
INFILL_PREFIX = '''def is_palindrome(s):
    """Return True if s reads the same forwards and backwards, ignoring case."""
'''
INFILL_SUFFIX = '''

if __name__ == "__main__":
    print(is_palindrome("Level"))
'''

SETTINGS_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                                    "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                                                    "debug": {"type": "boolean"}},
                   "required": ["name", "port", "debug"], "additionalProperties": False}


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _stats(label: str, done) -> str:
    from .display import describe_stats

    return f"  {label:<15} {describe_stats(done.stats)}"


def _sudoku(steps: int) -> None:
    from .generate import AR, GenerationParams, generate
    from .sampler import SamplerConfig
    from .tasks.sudoku import board_from_ids, prompt_ids
    from .tasks.sudoku_board import is_solution, parse, pretty
    from .tasks.sudoku_eval import print_solve
    from .weights import load_model, read_generation_config

    path = shipped_model("sudoku")
    model = load_model(path, dtype=torch.float32, quiet=True).eval()
    _banner(f"1. Sudoku: {model.num_params() / 1e6:.1f}M-parameter model ({path.name}), all 81 cells denoised at once")
    cells = parse(PUZZLE)
    print(pretty(PUZZLE) + "\n")
    gen = read_generation_config(path)
    params = GenerationParams(max_new_tokens=81, seed=0,
                              sampler=SamplerConfig.from_generation_config(gen).replace(max_denoising_steps=steps))
    done = print_solve(model, PUZZLE, params)
    board = board_from_ids(done.tokens)
    ok = board is not None and is_solution(cells, [int(c) for c in board])
    print(pretty(board) if board else "(the model did not write 81 digits)")
    print(f"diffusion: {'SOLVED' if ok else 'not solved'} in {done.stats['steps_per_canvas'][0]} denoising steps")
    ar = generate(model, [prompt_ids(PUZZLE)], GenerationParams(max_new_tokens=81, mode=AR))[0]
    ar_board = board_from_ids(ar.tokens)
    ar_ok = ar_board is not None and is_solution(cells, [int(c) for c in ar_board])
    print(f"autoregressive (same weights): {'SOLVED' if ar_ok else 'not solved'} in {ar.stats['encoder_passes']} "
          "forward passes")
    print(_stats("diffusion", done))
    print(_stats("autoregressive", ar))


def _code(pipe, steps: int) -> None:
    from .cli import run_one

    _banner(f"2. Code completion: {pipe.model.num_params() / 1e6:.1f}M-parameter code model, canvas "
            f"{pipe.model.cfg.canvas_length}")
    print(COMPLETION, end="")
    print("--- diffusion (the canvas after every step: accepted tokens bright, re-noised dim) ---", flush=True)
    prompt = pipe.encode(COMPLETION)
    results = {}
    for label, ar in (("diffusion", False), ("autoregressive", True)):
        params = pipe.params(ar=ar, steps=steps, seed=0, max_new_tokens=pipe.model.cfg.canvas_length)
        if ar:
            print("--- autoregressive, same weights ---", flush=True)
        results[label] = run_one(pipe, prompt, params, show_canvas=not ar, stream_text=False)
        print(COMPLETION + _body(results[label].text), flush=True)
    for label, done in results.items():
        print(_stats(label, done))

    _banner("3. Infill: the body between a signature and the code after it (suffix fixed at the canvas end)")
    print(INFILL_PREFIX + "    <FILL>" + INFILL_SUFFIX)
    results = {}
    for label, ar in (("diffusion", False), ("autoregressive", True)):
        prompt, params, n = pipe.infill_request(INFILL_PREFIX, INFILL_SUFFIX, ar=ar, steps=steps, seed=0)
        done = run_one(pipe, prompt, params, show_canvas=not ar, stream_text=False)
        done = pipe.trim_infill(done, n)
        results[label] = done
        how = "diffusion (canvas infill)" if not ar else "autoregressive (fill-in-the-middle prompt)"
        print(f"--- {how} ---\n{INFILL_PREFIX}{done.text}{INFILL_SUFFIX}", flush=True)
    for label, done in results.items():
        print(_stats(label, done))


def _structured(pipe, steps: int) -> None:
    import json

    from .cli import run_one
    from .structured import Grammar

    _banner("4. Structured output: a JSON object held to a JSON schema (the code model was trained on Python, "
            "not JSON)")
    print(json.dumps(SETTINGS_SCHEMA))
    grammar = Grammar.json_schema(SETTINGS_SCHEMA)
    prompt = pipe.encode("# server settings\nconfig = ")
    results = {}
    for label, ar in (("diffusion", False), ("autoregressive", True)):
        params = pipe.params(ar=ar, steps=steps, seed=0, max_new_tokens=64, grammar=grammar)
        done = results[label] = run_one(pipe, prompt, params, show_canvas=False, stream_text=False)
        try:
            doc = json.loads(done.text)
            ok = set(doc) == set(SETTINGS_SCHEMA["required"]) and isinstance(doc["port"], int)
        except ValueError:
            ok = False
        print(f"--- {label} ---\n{done.text}\n({'valid' if ok else 'NOT valid'} against the schema)", flush=True)
    for label, done in results.items():
        print(_stats(label, done))


PREDICTED_PROMPT = '''def merge_intervals(intervals):
    """Merge overlapping (start, end) pairs and return them sorted by start."""
'''
PREDICTED_BODY = '''    if not intervals:
        return []
    ordered = sorted(intervals, key=lambda pair: pair[0])
    merged = [list(ordered[0])]
    for start, end in ordered[1:]:
        last = merged[-1]
        if start <= last[1]:
            last[1] = max(last[1], end)
        else:
            merged.append([start, end])
    return [tuple(pair) for pair in merged]


def total_length(intervals):
    """Return the total length covered by the intervals, counting overlaps once."""
    return sum(end - start for start, end in merge_intervals(intervals))


def gaps(intervals, lo, hi):
    """Return the sub-intervals of (lo, hi) that no interval covers."""
    out = []
    cursor = lo
    for start, end in merge_intervals(intervals):
        if start > cursor:
            out.append((cursor, min(start, hi)))
        cursor = max(cursor, end)
        if cursor >= hi:
            break
    if cursor < hi:
        out.append((cursor, hi))
    return out
'''


def _predicted(pipe, steps: int) -> None:
    from .cli import run_one

    _banner("5. Predicted Outputs: rewriting code whose current text is given as the prediction (every canvas "
            "starts from it)")
    print(PREDICTED_PROMPT + PREDICTED_BODY)
    prompt, predicted = pipe.encode(PREDICTED_PROMPT), pipe.encode(PREDICTED_BODY, add_bos=False)
    results = {}
    for label, extra in (("from noise", {}), ("with prediction", {"prediction": predicted}),
                         ("autoregressive", {"ar": True})):
        params = pipe.params(steps=steps, seed=0, max_new_tokens=len(predicted), ignore_eos=True, **extra)
        done = results[label] = run_one(pipe, prompt, params, show_canvas=label == "with prediction",
                                        stream_text=False)
        same = sum(a == b for a, b in zip(done.tokens, predicted))
        print(f"--- {label}: {same} of {len(predicted)} tokens as predicted ---", flush=True)
    for label, done in results.items():
        print(_stats(label, done))


def _body(text: str | None) -> str:
    from .tasks.code_eval import completion_body

    return completion_body(text or "", 0)


def run_demo(args) -> int:
    from .pipeline import Pipeline

    steps = 12 if args.fast else 16
    try:
        code = shipped_model("code")
    except FileNotFoundError:
        return _random_demo(args)
    try:
        shipped_model("sudoku")
        _sudoku(12)
    except FileNotFoundError:
        _banner("1. Sudoku: skipped, this checkout has no dgemma/models/sudoku (recipes/sudoku.md trains one; "
                "`dgemma sudoku solve MODEL PUZZLE` runs it)")
    pipe = Pipeline.load(str(code), dtype=torch.float32, device="cpu", quiet=True)
    _code(pipe, steps)
    _structured(pipe, steps)
    _predicted(pipe, steps)
    return 0


def _random_demo(args) -> int:
    """No shipped models: the engine on a random model with the real Gemma vocabulary (its words are noise)."""
    from .assets import gemma_tokenizer_dir
    from .cli import run_one
    from .config import preset
    from .pipeline import Pipeline
    from .tokenizer import Tokenizer
    from .weights import init_random

    _banner("no trained models are shipped in this checkout: a RANDOMLY INITIALISED DiffusionGemma (output is noise)")
    cfg = preset("bench-80m")
    pipe = Pipeline(init_random(cfg, seed=0), Tokenizer.from_dir(gemma_tokenizer_dir()))
    prompt = pipe.encode_chat([{"role": "user", "content": "Write a haiku about parallel decoding."}])
    results = {}
    for label, ar in (("diffusion", False), ("autoregressive", True)):
        params = pipe.params(ar=ar, max_new_tokens=cfg.canvas_length if not ar else 64, steps=8 if args.fast else 16,
                             ignore_eos=True)
        results[label] = run_one(pipe, prompt, params, show_canvas=not ar, stream_text=True)
    for label, done in results.items():
        print(_stats(label, done))
    return 0
