"""Randomised requests against `dgemma serve` (fixed seeds): a client's mistake is never a 5xx, and a valid request
gives the same answer streamed and not, whatever runs beside it (rows are batch-invariant), on the chat and
completions endpoints, the Responses API and the Messages API. These found a step that
crashed every row batched with a request that left nothing to sample, and a division by zero on max_tokens 0.
DGEMMA_FUZZ=N runs N times as many requests (N=20 is a few minutes)."""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_serve import NAME, TOOLS, ServerThread, build_checkpoint  # noqa: E402
from dgemma.pipeline import Pipeline  # noqa: E402
from dgemma.serve import ServerSettings, create_app  # noqa: E402

SCALE = int(os.environ.get("DGEMMA_FUZZ", "1"))

# ---------------------------------------------------------------- values that are wrong somewhere
ODD = [None, True, 0, -1, 2, 3.5, 1e300, 2**63, 2**80, "", "x", "0", [], [0], [-1], ["a"], [[]], [None], {},
       {"a": 1}, {"0": "x"}, "\u0000", "a" * 5000, [0] * 2000, float("nan"), float("inf"),
       [{"type": "text", "text": "hi"}], [{"role": "user"}], [{"role": "tool", "content": "x"}],
       [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
       [{"role": "assistant", "content": "x", "tool_calls": [{"function": 3}]}],
       {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}},
       {"type": "json_schema", "json_schema": []},
       {"type": "regex"}, {"regex": "(a"}, {"choice": []}, {"grammar": "start: x"}, {"json": "{"},
       [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"x": {"type": "nope"}}}}}],
       [{"type": "function", "function": {"name": ""}}], [{"type": "function"}], "required",
       {"type": "function", "function": {"name": "g"}}, {"enable_thinking": "yes"}, {"include_usage": True},
       [{"type": "function_call_output", "call_id": "x", "output": "y"}], [{"type": "input_image"}],
       {"format": {"type": "nope"}}, [105, 106], [10**7]]
ENDPOINTS = {
    "/v1/completions": ({"model": NAME, "prompt": "Hello", "max_tokens": 8, "seed": 1}, [
        "prompt", "max_tokens", "n", "seed", "stop", "stream", "stream_options", "temperature", "top_p", "top_k",
        "min_p", "presence_penalty", "frequency_penalty", "logit_bias", "repetition_penalty", "min_tokens",
        "stop_token_ids", "include_stop_str_in_output", "allowed_token_ids", "bad_words", "truncate_prompt_tokens",
        "return_token_ids", "prompt_logprobs", "priority", "skip_special_tokens", "response_format",
        "structured_outputs", "suffix", "echo", "best_of", "logprobs", "steps", "entropy_bound", "t_min", "t_max",
        "stability_threshold", "confidence_threshold", "restarts", "ar", "stream_drafts", "ignore_eos",
        "ar_fallback", "draft", "model"]),
    "/v1/chat/completions": ({"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}, [
        "messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
        "parallel_tool_calls", "chat_template_kwargs", "add_generation_prompt", "continue_final_message",
        "response_format", "stream", "n", "structured_outputs", "stop", "metadata", "prediction"]),
    "/v1/responses": ({"model": NAME, "input": "Hi", "max_output_tokens": 8}, [
        "input", "instructions", "max_output_tokens", "stream", "tools", "tool_choice", "text", "reasoning",
        "temperature", "previous_response_id", "model", "store", "background", "conversation"]),
    "/v1/messages": ({"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}, [
        "messages", "system", "max_tokens", "stream", "stop_sequences", "temperature", "top_k", "tools",
        "tool_choice", "thinking", "model"]),
    "/v1/messages/count_tokens": ({"model": NAME, "messages": [{"role": "user", "content": "Hi"}]}, [
        "messages", "system", "tools", "tool_choice", "thinking", "model"]),
    "/tokenize": ({"model": NAME, "prompt": "Hi"}, ["prompt", "messages", "add_special_tokens", "tools"]),
    "/detokenize": ({"model": NAME, "tokens": [3, 4]}, ["tokens", "model"]),
    "/v1/load_lora_adapter": ({"lora_name": "a", "lora_path": "/nonexistent"}, ["lora_name", "lora_path"]),
    "/v1/unload_lora_adapter": ({"lora_name": "a"}, ["lora_name"]),
    "/v1/batches": ({"input_file_id": "file-0", "endpoint": "/v1/completions", "completion_window": "24h"},
                    ["input_file_id", "endpoint", "completion_window", "metadata"]),
    "/v1/conversations": ({"items": [{"role": "user", "content": "Hi"}], "metadata": {"a": "b"}},
                          ["items", "metadata", "safety_identifier"]),
}

# ---------------------------------------------------------------- valid values, combined at random
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
SAMPLING = {
    "max_tokens": [0, 1, 5, 16, 17, 40], "n": [1, 2, 3], "stop": ["a", ["\n", "x"], []],
    "temperature": [0, 0.7, 2], "top_p": [0, 0.5, 1], "top_k": [-1, 0, 1, 5], "min_p": [0, 0.5, 1],
    "presence_penalty": [-2, 2], "frequency_penalty": [-2, 2], "logit_bias": [{"5": 100}, {"106": 100}, {"1": -100}],
    "repetition_penalty": [0.5, 1.2], "min_tokens": [0, 1, 3, 20], "stop_token_ids": [[5], [106], []],
    "include_stop_str_in_output": [True], "allowed_token_ids": [[5, 6], [1], [105, 70]],
    "truncate_prompt_tokens": [-1, 1, 2], "return_token_ids": [True], "skip_special_tokens": [True, False],
    "bad_words": [["y"], ["ab"], []],
    "response_format": [{"type": "json_object"},
                        {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
                        {"type": "text"}],
    "structured_outputs": [{"regex": "[ab]{2,5}"}, {"choice": ["yes", "no"]}, {"json": {"type": "array"}}],
    "steps": [1, 2, 6], "entropy_bound": [0, 0.5, 100], "t_min": [0.1], "t_max": [1.5], "stability_threshold": [0, 1],
    "confidence_threshold": [0, 10], "restarts": [0, 2], "ar": [True, False], "ignore_eos": [True],
    "ar_fallback": [0, 1.0, 100], "draft": ["abc", [5, 6, 7], "x" * 16],
}
COMPLETION = dict(SAMPLING, prompt=["Hello", ["a", "bb"], [5, 6, 7], [[5], [6, 7]], "x" * 300],
                  suffix=["", " end", "z" * 40], logprobs=[0, 3, 20])
CHAT = dict(SAMPLING, logprobs=[True, False], top_logprobs=[0, 3], tools=[TOOLS], parallel_tool_calls=[False],
            tool_choice=["auto", "required", "none", {"type": "function", "function": {"name": "now"}}],
            chat_template_kwargs=[{"enable_thinking": True}], add_generation_prompt=[False],
            continue_final_message=[True], max_completion_tokens=[3, 20],
            prediction=[{"type": "content", "content": "def f(x):\n    return x\n" * 4},
                        {"type": "content", "content": [{"type": "text", "text": "ab"}]}],
            messages=[[{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                       {"role": "assistant", "content": "A"}],
                      [{"role": "user", "content": "w?"},
                       {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function":
                                                                           {"name": "now", "arguments": "{}"}}]},
                       {"role": "tool", "tool_call_id": "c1", "content": "noon"}]])
VALID = {"/v1/completions": ({"model": NAME, "prompt": "Hello", "max_tokens": 8}, COMPLETION),
         "/v1/chat/completions": ({"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
                                  CHAT)}


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    ckpt = build_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny")
    settings = ServerSettings(model_name=NAME, max_concurrency=3, max_queue=32, max_tokens_limit=512,
                              max_context=1024, max_body_bytes=64 * 1024, allow_runtime_lora=True,
                              batch_dir=str(tmp_path_factory.mktemp("batches")), prefill_chunk=8)
    # bf16, the default on CUDA and native-bf16 CPUs, is the dtype whose rows are batch-invariant bit for bit (on
    # this CPU fp32 matmuls pick kernels by row count, README's Randomness), which the agreement tests rely on, and
    # chunked prefill cuts expert groups small enough to meet those kernels
    pipe = Pipeline.load(str(ckpt), device="cpu", dtype=torch.bfloat16, quiet=True)
    with ServerThread(create_app(pipe, settings)) as s:
        with httpx.Client(base_url=s.url, timeout=120) as c:
            yield c


def _post(http, path: str, body) -> httpx.Response:
    # json.dumps writes NaN / Infinity, which Python's JSON parser (and so the server's) reads
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def test_odd_fields_are_client_errors(http):
    """Each field of each endpoint set to values of the wrong type or range, and bodies that are not JSON
    objects: every answer is a 2xx or a 4xx with the endpoint's error shape, never a 5xx."""
    rnd = random.Random(0)
    failures = []
    for path, (base, fields) in ENDPOINTS.items():
        for raw in ("", "[", "[]", "1", '"x"', "null", '{"a":'):
            r = http.post(path, content=raw, headers={"content-type": "application/json"})
            if r.status_code != 400:
                failures.append((path, raw, r.status_code, r.text[:200]))
        for field in fields:
            for value in rnd.sample(ODD, min(len(ODD), 8 * SCALE)):
                r = _post(http, path, dict(base, **{field: value}))  # a 200 may be a stream: not JSON
                body = r.json() if r.status_code >= 400 else {"type": "error"}
                shape = set(body) == {"error"} or body.get("type") == "error"  # OpenAI's, Anthropic's
                if r.status_code >= 500 or not shape:
                    failures.append((path, field, value, r.status_code, r.text[:200]))
    assert not failures, failures[:5]


def _answer(http, path: str, body: dict, stream: bool):
    """(status, {choice: (text, finish_reason, tool calls, token ids)}) of a request, streamed or not."""
    if not stream:
        r = http.post(path, json=body)
        if r.status_code != 200:
            return r.status_code, r.text
        out = {}
        for c in r.json()["choices"]:
            m = c.get("message") or {}
            calls = [(t["function"]["name"], t["function"]["arguments"]) for t in m.get("tool_calls") or []]
            out[c["index"]] = (c["text"] if "text" in c else m.get("content") or "", c["finish_reason"], calls,
                               c.get("token_ids"))
        return 200, out
    parts: dict[int, list] = {}
    with http.stream("POST", path, json=dict(body, stream=True)) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.text
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return 500, chunk
            for c in chunk["choices"]:
                p = parts.setdefault(c["index"], ["", None, [], None])
                delta = c.get("delta") or {}
                p[0] += c.get("text") or delta.get("content") or ""
                p[1] = c["finish_reason"] or p[1]
                p[2] += [(t["function"]["name"], t["function"]["arguments"]) for t in delta.get("tool_calls") or []]
                if "token_ids" in c:
                    p[3] = (p[3] or []) + c["token_ids"]
    return 200, {i: tuple(p) for i, p in parts.items()}


def test_random_valid_requests_agree_streamed_and_not(http):
    """Random combinations of valid fields, four clients at a time: never a 5xx; a request the server takes
    answers the same text, finish reasons, tool calls and token ids streamed as not (rows are batch-invariant,
    and the stream's pieces add up to the answer); a request it refuses is refused both ways."""
    rnd = random.Random(1)
    jobs = []
    for _ in range(100 * SCALE):
        path = rnd.choice(list(VALID))
        base, pool = VALID[path]
        body = dict(base, seed=rnd.randrange(100))
        for field in rnd.sample(list(pool), rnd.randint(1, 6)):
            body[field] = rnd.choice(pool[field])
        jobs.append((path, body))

    def both(job):
        path, body = job
        return job, _answer(http, path, body, stream=False), _answer(http, path, body, stream=True)

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(both, jobs))
    crashed = [(job, a, b) for job, a, b in results if a[0] >= 500 or b[0] >= 500]
    assert not crashed, crashed[:3]
    differ = [(job, a, b) for job, a, b in results if (a[0], b[0]) != (400, 400) and a != b]
    assert not differ, differ[:3]
    assert sum(a[0] == 200 for _, a, _ in results) > len(results) // 2  # most combinations run


# ---------------------------------------------------------------- the other APIs' streams
RESPONSES = {"input": ["Hi", [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]],
             "max_output_tokens": [1, 8, 40], "instructions": ["Be brief"], "temperature": [0, 1], "top_p": [0.5],
             "tools": [[{"type": "function", "name": "now", "parameters": {"type": "object", "properties": {}}}]],
             "tool_choice": ["auto", "required", "none"], "text": [{"format": {"type": "json_object"}}],
             "reasoning": [{"effort": "low"}]}
MESSAGES = {"messages": [[{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                          {"role": "assistant", "content": "Hey"}, {"role": "user", "content": "More"}]],
            "max_tokens": [1, 8, 40], "system": ["S", [{"type": "text", "text": "S"}]], "stop_sequences": [["a"], []],
            "temperature": [0, 1], "top_k": [1, 5], "top_p": [0.5],
            "tools": [[{"name": "now", "input_schema": {"type": "object", "properties": {}}}]],
            "tool_choice": [{"type": "auto"}, {"type": "any"}, {"type": "tool", "name": "now"}, {"type": "none"}],
            "thinking": [{"type": "enabled", "budget_tokens": 1024}]}


def _events(r: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def _response_summary(resp: dict) -> tuple:
    """(status, text, function calls, reasoning) of a Responses API response object."""
    text = "".join(p["text"] for item in resp["output"] if item["type"] == "message" for p in item["content"])
    calls = [(i["name"], i["arguments"]) for i in resp["output"] if i["type"] == "function_call"]
    thought = "".join(p["text"] for i in resp["output"] if i["type"] == "reasoning" for p in i.get("content") or [])
    return resp["status"], text, calls, thought


def _message_summary(msg: dict) -> tuple:
    """(stop reason, text, tool uses, thinking) of an Anthropic message."""
    blocks = msg["content"]
    return (msg["stop_reason"], "".join(b["text"] for b in blocks if b["type"] == "text"),
            [(b["name"], b["input"]) for b in blocks if b["type"] == "tool_use"],
            "".join(b["thinking"] for b in blocks if b["type"] == "thinking"))


def _both(http, path: str, body: dict, summary):
    """The unstreamed answer's summary and the status and events of the same request streamed; (status,) twice
    when the server refuses it."""
    r = http.post(path, json=body)
    if r.status_code != 200:
        return (r.status_code,), (r.status_code,), []
    with http.stream("POST", path, json=dict(body, stream=True)) as s:
        events = _events(s)
    return summary(r.json()), (s.status_code,), events


def _responses_both(http, body: dict):
    plain, status, events = _both(http, "/v1/responses", body, _response_summary)
    done = [e for e in events if e["type"] in ("response.completed", "response.failed")]
    if status != (200,) or len(done) != 1 or done[0]["type"] != "response.completed":
        return plain, (status, events[-1:]) if events else status
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    final = _response_summary(done[0]["response"])
    return plain, final if deltas == final[1] else (final, "deltas", deltas)


def _messages_both(http, body: dict):
    plain, status, events = _both(http, "/v1/messages", body, _message_summary)
    if status != (200,) or events[-1]["type"] != "message_stop":
        return plain, (status, events[-1:]) if events else status
    text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    thought = "".join(e["delta"].get("thinking", "") for e in events if e["type"] == "content_block_delta")
    tools = [(e["content_block"]["name"], json.loads(d["delta"]["partial_json"]))
             for e, d in zip(events, events[1:]) if e["type"] == "content_block_start"
             and e["content_block"]["type"] == "tool_use"]
    stop = next(e["delta"]["stop_reason"] for e in events if e["type"] == "message_delta")
    return plain, (stop, text, tools, thought)


def test_responses_and_messages_streams_agree(http):
    """Random valid Responses and Messages requests: the stream's deltas add up to the answer the same request
    gets unstreamed (text, calls, thought, how it ended), and neither is ever a 5xx."""
    rnd = random.Random(2)
    jobs = []
    for _ in range(40 * SCALE):
        kind = rnd.choice(["responses", "messages"])
        pool = RESPONSES if kind == "responses" else MESSAGES
        body = {"model": NAME, "input": "Hi", "max_output_tokens": 8} if kind == "responses" else \
            {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        body["seed"] = rnd.randrange(100)  # both APIs take dgemma's seed
        for field in rnd.sample(list(pool), rnd.randint(1, 4)):
            body[field] = rnd.choice(pool[field])
        jobs.append((kind, body))

    def both(job):
        kind, body = job
        return job, *(_responses_both if kind == "responses" else _messages_both)(http, body)

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(both, jobs))
    bad = [x for x in results if x[1] != x[2] or x[1][0] in range(500, 600)]
    assert not bad, bad[:3]
    assert sum(len(a) > 1 for _, a, _ in results) > len(results) // 2
