"""Structured output: what a grammar costs and what it buys, diffusion beside AR decoding of the same weights.

    python bench/structured.py [--seeds 5] [--threads 2] [--vocab-262k | --only-262k] [--out results.json]

1. The shipped code model (8,192-token vocabulary): each case (a JSON schema, any JSON object, a regex, a choice)
   decoded with and without its grammar, diffusion and AR, over `--seeds` seeds. Reported per case and mode: how
   often the text matches (parses and validates), how often it ended by itself (EOS or the grammar's end, not
   max_new_tokens), tokens, forwards (decoder passes for diffusion, encoder passes for AR), tokens per forward,
   wall seconds, seconds to the first text (a grammar row streams each step's committed run; without one, a
   diffusion row's text comes canvas by canvas), and the share of the wall spent in the grammar walk (masks,
   masked softmaxes, draws, matcher updates; `Engine._grammar_walk`, timed around the real call).
2. With --vocab-262k: the `bench-80m` preset (the `small` model at the real 262,144-token vocabulary, random
   weights) with the real Gemma tokenizer, the JSON-schema case and a tool call (a chat prompt declaring two tools,
   `tool_choice: "required"` as the server decodes it: Gemma 4's call syntax with the arguments held to the
   function's schema; "free" is `"auto"`, whatever the model writes, parsed for a call): the walk's cost where each
   masked softmax spans the whole vocabulary. (The code model's tokenizer has no tool-call tokens.)

Every run goes through `dgemma.generate` as users call it; nothing is simulated.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                         "debug": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
          "required": ["name", "port", "debug", "tags"], "additionalProperties": False}
DATE = r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "unit"]}}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "maxLength": 24}},
                                               "required": ["city"]}}}]


def _cases():
    from dgemma.structured import Grammar

    def schema_ok(t):
        try:
            d = json.loads(t)
        except ValueError:
            return False
        return (isinstance(d, dict) and set(d) == set(SCHEMA["properties"]) and isinstance(d["name"], str)
                and isinstance(d["port"], int) and 1 <= d["port"] <= 65535 and isinstance(d["debug"], bool)
                and isinstance(d["tags"], list) and len(d["tags"]) <= 3)

    def object_ok(t):
        try:
            return isinstance(json.loads(t), dict)
        except ValueError:
            return False

    def tool_ok(t):
        from dgemma.tools import parse_tool_calls

        _, calls = parse_tool_calls(t, ["get_weather", "get_time"])
        if len(calls) != 1:
            return False
        args = json.loads(calls[0].arguments)
        if calls[0].name == "get_time":
            return set(args) == {"city"} and isinstance(args["city"], str)
        return ({"city", "unit"} <= set(args) <= {"city", "unit", "days"} and isinstance(args["city"], str)
                and args["unit"] in ("celsius", "fahrenheit") and args.get("days", 1) in range(1, 8))

    def tool_grammar(pipe):
        from dgemma.tools import check_tools, tool_grammar

        return tool_grammar(check_tools(TOOLS), pipe.tokenizer, parallel=False)

    def tool_prompt(pipe):
        return pipe.encode_chat([{"role": "user", "content": "What's the weather in Paris?"}], tools=TOOLS)

    return [
        ("json_schema", "# server settings\nconfig = ", Grammar.json_schema(SCHEMA), schema_ok, 96),
        ("tool_call", tool_prompt, tool_grammar, tool_ok, 64),
        ("json_object", "# a small dict literal\nd = ", Grammar.json_object(), object_ok, 128),
        ("regex (date)", "# release date\nreleased = '", Grammar.regex(DATE),
         lambda t: re.fullmatch(DATE, t) is not None, 16),
        ("choice", "# is it enabled?\nenabled = ", Grammar.choice(["True", "False", "None"]),
         lambda t: t in ("True", "False", "None"), 8),
    ]


class WalkTimer:
    """Wall time inside Engine._grammar_walk (the real method, wrapped)."""

    def __init__(self):
        from dgemma.generate import Engine

        self.total = 0.0
        self.calls = 0
        self._orig = Engine._grammar_walk
        timer = self

        def timed(engine, r, logits):
            t0 = time.perf_counter()
            try:
                return timer._orig(engine, r, logits)
            finally:
                timer.total += time.perf_counter() - t0
                timer.calls += 1

        Engine._grammar_walk = timed

    def take(self) -> float:
        t, self.total = self.total, 0.0
        return t


def run_cases(pipe, cases, seeds: int, timer: WalkTimer) -> list[dict]:
    from dgemma.generate import generate
    from dgemma.structured import ll_tokenizer

    t0 = time.perf_counter()
    ll_tokenizer(pipe.tokenizer)  # once per tokenizer (the server builds it at start): not part of any request
    print(f"grammar token tables built in {time.perf_counter() - t0:.2f} s")
    rows = []
    for name, prompt, grammar, ok, max_new in cases:
        ids = prompt(pipe) if callable(prompt) else pipe.encode(prompt)
        grammar = grammar(pipe) if callable(grammar) else grammar
        for mode in ("diffusion", "ar"):
            for constrained in (True, False):
                valid, stopped, toks, passes, walls, firsts, walk = 0, 0, [], [], [], [], 0.0
                for seed in range(seeds):
                    params = pipe.params(ar=mode == "ar", seed=seed, max_new_tokens=max_new,
                                         grammar=grammar if constrained else None)
                    timer.take()
                    t0 = time.perf_counter()
                    [done] = generate(pipe.model, [ids], params, tokenizer=pipe.tokenizer)
                    walls.append(time.perf_counter() - t0)
                    firsts.append(done.stats["time_to_first_commit_s"] or walls[-1])
                    walk += timer.take()
                    valid += bool(ok(done.text))
                    stopped += done.finish_reason == "stop"
                    toks.append(len(done.tokens))
                    passes.append(done.stats["decoder_passes"] if mode == "diffusion" else
                                  done.stats["encoder_passes"])
                row = {"case": name, "mode": mode, "grammar": constrained, "runs": seeds, "valid": valid,
                       "stopped": stopped,
                       "tokens_mean": statistics.mean(toks), "forwards_mean": statistics.mean(passes),
                       "tokens_per_forward": sum(toks) / max(sum(passes), 1),
                       "wall_s_mean": statistics.mean(walls), "first_text_s_mean": statistics.mean(firsts),
                       "walk_share": walk / sum(walls)}
                rows.append(row)
                print(f"{name:13s} {mode:9s} {'grammar' if constrained else 'free':7s} valid {valid}/{seeds}  "
                      f"ended {stopped}/{seeds}  "
                      f"tokens {row['tokens_mean']:6.1f}  forwards {row['forwards_mean']:6.1f}  "
                      f"tok/fwd {row['tokens_per_forward']:5.2f}  wall {row['wall_s_mean']:6.3f} s  "
                      f"first text {row['first_text_s_mean']:6.3f} s  "
                      f"walk {100 * row['walk_share']:4.1f}%", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab-262k", action="store_true", help="also the 262,144-token bench model (JSON schema)")
    p.add_argument("--only-262k", action="store_true", help="skip the code model (with --vocab-262k)")
    p.add_argument("--out", help="write the rows as JSON")
    a = p.parse_args()
    import torch

    from dgemma.assets import gemma_tokenizer_dir, shipped_model
    from dgemma.pipeline import Pipeline

    torch.set_num_threads(a.threads)
    timer = WalkTimer()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    out = {"machine": {"cpu": cpu, "threads": a.threads, "torch": torch.__version__}}
    pipe = Pipeline.load(str(shipped_model()), device="cpu", quiet=True)
    out["dtype"] = str(pipe.model.dtype)
    print(f"shipped code model ({pipe.model.cfg.vocab_size:,} tokens, {pipe.model.dtype}), {a.seeds} seeds")
    small = [c for c in _cases() if c[0] != "tool_call"]
    out["code_model"] = run_cases(pipe, small, a.seeds, timer) if not a.only_262k else []
    if a.vocab_262k or a.only_262k:
        from dgemma.config import preset
        from dgemma.tokenizer import Tokenizer
        from dgemma.weights import init_random

        tok = Tokenizer.from_dir(gemma_tokenizer_dir())
        cfg = preset("bench-80m")
        model = init_random(cfg, seed=0)
        with torch.no_grad():  # as `dgemma bench` sharpens its random model, so that acceptance happens
            model.embed_tokens.weight.mul_(8.0)
        model = model.to(pipe.model.dtype).eval()
        big = Pipeline(model, tok, {"max_denoising_steps": 16, "max_new_tokens": 96})
        print(f"bench model ({cfg.vocab_size:,} tokens, random weights), {a.seeds} seeds")
        out["vocab_262k"] = run_cases(big, [c for c in _cases() if c[0] in ("json_schema", "tool_call")], a.seeds,
                                      timer)
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
