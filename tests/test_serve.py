"""`dgemma serve`: the OpenAI-compatible server, driven through the official `openai` client (and raw httpx for
the error cases) on a tiny random model with a byte-level tokenizer. Servers run in-process (uvicorn in a thread).
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from conftest import randomize, tiny_config  # noqa: E402
from dgemma.model import DiffusionGemma  # noqa: E402
from dgemma.pipeline import Pipeline  # noqa: E402
from dgemma.serve import ServerSettings, create_app  # noqa: E402
from dgemma.tokenizer import Tokenizer, byte_level  # noqa: E402
from dgemma.weights import save_model  # noqa: E402

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"]}}},
         {"type": "function", "function": {"name": "now", "description": "The time"}}]
STEPS = 4  # denoising steps per canvas in the test checkpoint (a random model never stops early)
CANVAS = 16  # tiny_config("a")
NAME = "tiny"


# ---------------------------------------------------------------- a tiny checkpoint with a real tokenizer
def build_checkpoint(path: Path, tokenizer: Tokenizer | None = None, steps: int = STEPS, seed: int = 1) -> Path:
    model = randomize(DiffusionGemma(tiny_config("a")), seed=seed)
    gen = {"max_denoising_steps": steps, "max_new_tokens": 32, "t_min": 0.4, "t_max": 0.8, "eos_token_id": [1, 106, 50]}
    return save_model(model, path, generation_config=gen, tokenizer=tokenizer or byte_level())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app):
        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def pipe(ckpt):
    return Pipeline.load(str(ckpt), device="cpu", quiet=True)


@pytest.fixture(scope="module")
def server(ckpt):
    settings = ServerSettings(model_name=NAME, max_concurrency=4, max_queue=16, max_tokens_limit=512,
                              max_context=1024, max_body_bytes=64 * 1024)
    with ServerThread(create_app(Pipeline.load(str(ckpt), device="cpu", quiet=True), settings)) as s:
        yield s


@pytest.fixture(scope="module")
def busy_server(ckpt):
    """One engine row, no queue, an API key and one CORS origin."""
    settings = ServerSettings(model_name=NAME, max_concurrency=1, max_queue=0, api_key="sekret",
                              cors_origins=("http://example.test",))
    with ServerThread(create_app(Pipeline.load(str(ckpt), device="cpu", quiet=True), settings)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def complete(client, prompt="Hello", **kw):
    kw.setdefault("max_tokens", 24)
    extra = {k: kw.pop(k) for k in list(kw) if k in ("ignore_eos", "steps", "ar", "stream_drafts", "entropy_bound",
                                                      "t_min", "t_max", "stability_threshold",
                                                      "confidence_threshold", "restarts", "response_format")}
    extra.update(kw.pop("extra_body", None) or {})
    return client.completions.create(model=NAME, prompt=prompt, extra_body=extra or None, **kw)


def assert_error(r, status, code=None, param=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def wait_until(fn, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if fn():
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------- models, completions, chat
def test_models(client, http):
    assert [m.id for m in client.models.list().data] == [NAME]
    card = client.models.retrieve(NAME)
    assert card.id == NAME and card.model_extra["dgemma"]["canvas_length"] == CANVAS
    # vLLM's max_model_len, which clients size prompts by: the context /tokenize reports too
    assert card.model_extra["max_model_len"] == card.model_extra["dgemma"]["max_context"] == \
        http.post("/tokenize", json={"prompt": "x"}).json()["max_model_len"]
    assert card.model_extra["dgemma"]["tools"] is True  # the byte-level test tokenizer has Gemma 4's call tokens
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_completion_matches_the_engine(client, pipe):
    r = complete(client, "Hello there", seed=5, max_tokens=24, ignore_eos=True)
    ref = pipe.generate(["Hello there"], seed=5, max_new_tokens=24, ignore_eos=True)[0]
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "length"
    u = r.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (len(pipe.encode("Hello there")), 24,
                                                                       len(pipe.encode("Hello there")) + 24)
    extra = u.model_extra
    assert extra["steps_per_canvas"] == STEPS and extra["canvases"] == 2 and extra["forward_passes"] == 2 * STEPS
    assert extra["tokens_per_forward"] == pytest.approx(ref.stats["tokens_per_forward"])


def test_token_id_prompts_and_echo(client, pipe):
    ids = pipe.encode("Hi!")
    a = complete(client, ids, seed=2, ignore_eos=True)
    b = complete(client, "Hi!", seed=2, ignore_eos=True)
    assert a.choices[0].text == b.choices[0].text
    e = complete(client, "Hi!", seed=2, ignore_eos=True, echo=True)  # echo: the prompt as sent, then the text
    assert e.choices[0].text == "Hi!" + b.choices[0].text
    e = complete(client, ids, seed=2, ignore_eos=True, echo=True)
    assert e.choices[0].text == pipe.decode(ids) + b.choices[0].text
    batch = complete(client, ["Hi!", "Yo"], seed=2, ignore_eos=True)  # a list of prompts: one choice each
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == b.choices[0].text


def test_chat_multi_turn_uses_the_chat_template(client, pipe):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And now?"}]
    r = client.chat.completions.create(model=NAME, messages=messages, seed=3, max_tokens=20,
                                       extra_body={"ignore_eos": True})
    ids = pipe.encode_chat(messages)
    ref = pipe.generate([ids], seed=3, max_new_tokens=20, ignore_eos=True)[0]
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text and r.usage.prompt_tokens == len(ids)
    # content as a list of text parts, and max_completion_tokens, are the same request
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    r2 = client.chat.completions.create(model=NAME, messages=parts, seed=3, max_completion_tokens=20,
                                        extra_body={"ignore_eos": True})
    assert r2.choices[0].message.content == ref.text


# ---------------------------------------------------------------- streaming
def test_streaming_equals_non_streaming(client):
    for seed in (4, 9):
        full = complete(client, "Stream me", seed=seed, max_tokens=40)
        chunks = list(complete(client, "Stream me", seed=seed, max_tokens=40, stream=True,
                               stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == full.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    msgs = [{"role": "user", "content": "Hi"}]
    full = client.chat.completions.create(model=NAME, messages=msgs, seed=1, max_tokens=40)
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, seed=1, max_tokens=40, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    # vLLM's continuous_usage_stats: every chunk carries the usage so far, never falling, ending at the total
    chunks = list(complete(client, "Stream me", seed=4, max_tokens=40, ignore_eos=True, stream=True,
                           stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks]
    assert all(c.usage is not None and c.usage.prompt_tokens == chunks[-1].usage.prompt_tokens for c in chunks)
    assert counts == sorted(counts) and counts[-1] == 40 and counts[0] < 40


@pytest.mark.parametrize("ar", [False, True])
def test_logprobs(client, pipe, ar):
    """Chat and completions logprobs in OpenAI's shapes: one entry per returned token, whose bytes spell the text,
    the engine's own values, the same whole or streamed, and no token changed by asking."""
    tok = pipe.tokenizer
    msgs = [{"role": "user", "content": "Hi"}]
    kw = dict(model=NAME, messages=msgs, seed=3, max_tokens=40, temperature=0, extra_body={"ar": ar})  # AR: greedy
    plain = client.chat.completions.create(**kw)
    r = client.chat.completions.create(**kw, logprobs=True, top_logprobs=3)
    text = r.choices[0].message.content
    assert text == plain.choices[0].message.content and plain.choices[0].logprobs is None
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert b"".join(bytes(e.bytes) for e in content).decode(errors="replace") == text  # random bytes: lossy
    ids = pipe.encode_chat(msgs)
    ref = pipe.generate([ids], seed=3, max_new_tokens=40, logprobs=3, ar=ar)[0]
    assert [e.logprob for e in content] == pytest.approx(ref.logprobs[:len(content)])
    for e, top in zip(content, ref.top_logprobs):
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert [t.token for t in e.top_logprobs] == [tok.decode([t]) for t, _ in top]
        assert e.top_logprobs[0].token == e.token  # the output is the draft / greedy argmax
    # dgemma's addition: each entry's raw entropy, the engine's
    assert [e.model_extra["entropy"] for e in content] == pytest.approx(ref.entropies[:len(content)], abs=1e-6)
    chunks = list(client.chat.completions.create(**kw, logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob, e.model_extra["entropy"]) for e in streamed] == \
        [(e.token, e.logprob, e.model_extra["entropy"]) for e in content]

    c = complete(client, "Hello", seed=4, max_tokens=30, logprobs=2, ar=ar, stop=["e"], temperature=0)
    lp = c.choices[0].logprobs
    n = c.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset[:1] in ([], [0]) and lp.text_offset == sorted(lp.text_offset)  # a stop may cut a token
    assert all(len(d) <= 2 and max(d.values()) == v for d, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert len(lp.model_extra["entropies"]) == n and min(lp.model_extra["entropies"]) >= -1e-6
    chunks = list(complete(client, "Hello", seed=4, max_tokens=30, logprobs=2, ar=ar, stop=["e"], temperature=0,
                           stream=True))
    got = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    assert got == lp.tokens


def test_char_offsets_are_linear_and_exact(pipe):
    """`text_offset` in one pass over the tokens' bytes: the prefix decode's length wherever the prefix ends on a
    character boundary, and the character's start where a token ends inside one."""
    from dgemma.serve.completions import char_offsets

    tok = pipe.tokenizer
    text = "naïve café → 世界 👩🏽‍💻 done\n"
    ids = tok.encode(text)
    off = char_offsets(tok, ids)
    assert off[-1] == len(text) and len(off) == len(ids) + 1
    for i in range(len(ids) + 1):
        prefix = tok.decode(ids[:i])
        if not prefix.endswith("\ufffd"):
            assert off[i] == len(prefix)
        else:
            assert off[i] == len(prefix) - 1  # the cut character starts here
    assert char_offsets(tok, [tok.bos_id, *ids], skip_special=True)[1:] == off


def test_bad_words(client, pipe):
    """vLLM's bad_words: never in the text, diffusion and AR, words of one token and longer; spelled as vLLM spells
    them, with and without a leading space."""
    # " ab" is one token more than "ab" here (bytes), so vLLM's rule keeps the bare word alone
    assert pipe.bad_words_ids([" ab"]) == (tuple(pipe.encode("ab", add_bos=False)),)
    y, z = (pipe.tokenizer.encode(c, add_bos=False)[0] for c in "yz")
    kw = dict(seed=2, max_tokens=40, ignore_eos=True, extra_body={"allowed_token_ids": [y, z]})
    assert "y" in complete(client, "Hi", **kw).choices[0].text
    kw["extra_body"]["bad_words"] = ["y"]
    assert complete(client, "Hi", **kw).choices[0].text == "z" * 40
    kw["extra_body"].update(bad_words=["zy", "yy"])
    for ar in (False, True):  # diffusion commits its canvases left to right under the ban
        kw["extra_body"]["ar"] = ar
        text = complete(client, "Hi", temperature=1, **kw).choices[0].text
        assert len(text) == 40 and "zy" not in text and "yy" not in text  # only "y" first, then z's
        assert text.lstrip("y") == "z" * len(text.lstrip("y")) and len(text) - len(text.lstrip("y")) <= 1


def test_skip_special_tokens(client, pipe):
    """vLLM's skip_special_tokens: true leaves the special tokens the model writes out of the text, streamed or
    not, with log-probability offsets into that text; stop strings match it; the tokens are the same either way.
    Chat with thinking keeps them (the thought is read from them)."""
    tok, turn = pipe.tokenizer, pipe.tokenizer.token_to_id("<|turn>")
    y, z = (tok.encode(c, add_bos=False)[0] for c in "yz")
    kw = dict(seed=3, max_tokens=40, ignore_eos=True, extra_body={"allowed_token_ids": [turn, y, z],
                                                                 "return_token_ids": True})
    full = complete(client, "Hi", **kw).choices[0]
    ids = full.model_extra["token_ids"]
    assert turn in ids and full.text == tok.decode(ids) and "<|turn>" in full.text
    kw["extra_body"] = {**kw["extra_body"], "skip_special_tokens": True}
    skip = complete(client, "Hi", logprobs=0, **kw).choices[0]
    want = tok.decode(ids, skip_special=True)
    assert skip.model_extra["token_ids"] == ids and skip.text == want and set(want) == {"y", "z"}
    assert skip.logprobs.text_offset == [len(tok.decode(ids[:i], skip_special=True)) for i in range(len(ids))]
    assert "".join(c.choices[0].text for c in complete(client, "Hi", stream=True, **kw)) == want
    # a stop string that spans a special token in the written text: found in the text without it
    def spanned(k: int) -> bool:  # y <|turn> z: the first "yz" of the text without specials is this one
        if ids[k] != turn or turn in (ids[k - 1], ids[k + 1]):
            return False
        return want.find(tok.decode([ids[k - 1], ids[k + 1]])) == len(tok.decode(ids[:k - 1], skip_special=True))

    k = next(k for k in range(1, len(ids) - 1) if spanned(k))
    stop = tok.decode([ids[k - 1], ids[k + 1]])
    cut = complete(client, "Hi", stop=stop, **kw).choices[0]
    assert cut.text == want[:want.find(stop)] and cut.finish_reason == "stop"
    msgs = [{"role": "user", "content": "Hi"}]
    body = dict(seed=3, max_tokens=24, extra_body={"ignore_eos": True, "allowed_token_ids": [turn, y, z]})
    kept = client.chat.completions.create(model=NAME, messages=msgs, **body).choices[0].message.content
    body["extra_body"]["skip_special_tokens"] = True
    assert client.chat.completions.create(model=NAME, messages=msgs, **body).choices[0].message.content == \
        kept.replace("<|turn>", "")
    body["extra_body"]["chat_template_kwargs"] = {"enable_thinking": True}
    thinking = client.chat.completions.create(model=NAME, messages=msgs, **body).choices[0].message.content
    assert "<|turn>" in thinking
    body["extra_body"]["skip_special_tokens"] = False
    assert client.chat.completions.create(model=NAME, messages=msgs, **body).choices[0].message.content == thinking


def test_echo_logprobs_score_the_prompt(client, pipe):
    """echo + logprobs + max_tokens 0, the loglikelihood request of lm-evaluation-harness: the prompt's own
    tokens with their next-token log-probabilities (None first), offsets into the echoed text; with max_tokens > 0
    the completion's entries follow."""
    ids = pipe.encode("Hello there")
    ref = pipe.generate([ids], max_new_tokens=0, prompt_logprobs=1)[0]
    r = complete(client, ids, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == pipe.tokenizer.decode(ids, skip_special=True) == "Hello there"
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and r.usage.completion_tokens == 0
    assert lp.token_logprobs[1:] == pytest.approx(ref.prompt_logprobs[1:])
    assert lp.tokens == [pipe.tokenizer.decode([t]) for t in ids]
    assert [r.choices[0].text[o:o + 1] for o in lp.text_offset[1:]] == list("Hello there")
    more = complete(client, ids, max_tokens=5, echo=True, logprobs=1, seed=2, ignore_eos=True)
    m = more.choices[0].logprobs
    assert len(m.tokens) == len(ids) + 5 and m.token_logprobs[:len(ids)] == lp.token_logprobs
    assert m.text_offset[len(ids)] == len("Hello there")
    # vLLM's prompt_logprobs: the same values, with each token's rank and the top n, keyed by token id
    v = complete(client, ids, max_tokens=2, logprobs=0, extra_body={"prompt_logprobs": 3}, seed=2)
    pl = v.choices[0].model_extra["prompt_logprobs"]
    assert pl[0] is None and len(pl) == len(ids) and v.choices[0].logprobs.tokens  # the output's own stay apart
    for t, want, entry in zip(ids[1:], lp.token_logprobs[1:], pl[1:]):
        mine = entry[str(t)]
        assert mine["logprob"] == pytest.approx(want) and mine["decoded_token"] == pipe.tokenizer.decode([t])
        above = [e for k, e in entry.items() if k != str(t) and e["logprob"] > mine["logprob"]]
        assert mine["rank"] >= 1 and (mine["rank"] == len(above) + 1 if mine["rank"] <= 3 else len(above) == 3)
        assert sorted(e["rank"] for k, e in entry.items() if k != str(t)) == \
            [k for k in range(1, 4) if k != mine["rank"]][:len(entry) - 1]
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                          extra_body={"prompt_logprobs": 0})
    assert len(chat.model_extra["prompt_logprobs"]) == chat.usage.prompt_tokens
    for extra in ({"prompt_logprobs": 1, "echo": True, "logprobs": 1}, {"prompt_logprobs": 1, "stream": True}):
        with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
            client.completions.create(model=NAME, prompt="x", max_tokens=2, extra_body=extra)


def test_logit_bias(client, pipe):
    """OpenAI's logit_bias: +100 forces a token at every position, and -100 then keeps it out of a pair of
    forced tokens (diffusion and AR; the engine's own test bans the most frequent token of a free run)."""
    y, z = (str(pipe.tokenizer.encode(c)[0]) for c in "yz")
    for ar in (False, True):
        forced = complete(client, "Hi", seed=1, max_tokens=20, ignore_eos=True, ar=ar, logit_bias={z: 100})
        assert forced.choices[0].text == "z" * 20
        pair = complete(client, "Hi", seed=1, max_tokens=20, ignore_eos=True, ar=ar, logit_bias={z: 100, y: 100})
        assert set(pair.choices[0].text) <= {"y", "z"}
        banned = complete(client, "Hi", seed=1, max_tokens=20, ignore_eos=True, ar=ar, logit_bias={z: -100, y: 100})
        assert banned.choices[0].text == "y" * 20


def test_ar_fallback(client, pipe):
    """ar_fallback (extra body): the server's text is the engine's; a random model's unsure canvases go to AR."""
    r = complete(client, "Hello there", seed=4, max_tokens=40, ignore_eos=True, extra_body={"ar_fallback": 0.0})
    ref = pipe.generate(["Hello there"], seed=4, max_new_tokens=40, ignore_eos=True, ar_fallback=0.0)[0]
    assert r.choices[0].text == ref.text and ref.stats["ar_fallback_canvases"] == 3
    assert r.model_extra["dgemma"]["choices"][0]["ar_fallback_canvases"] == 3
    http_error = client.completions.with_raw_response.create
    with pytest.raises(openai.BadRequestError, match="ar_fallback"):
        http_error(model=NAME, prompt="x", max_tokens=4, extra_body={"ar_fallback": 0.5, "ar": True})


def test_penalties(client, pipe):
    """presence_penalty / frequency_penalty reach the engine: the server's text is the engine's for them."""
    for ar in (False, True):
        r = complete(client, "Hello there", seed=4, max_tokens=40, ignore_eos=True, presence_penalty=1.5,
                     frequency_penalty=0.5, extra_body={"ar": ar})
        ref = pipe.generate(["Hello there"], seed=4, max_new_tokens=40, ignore_eos=True, presence_penalty=1.5,
                            frequency_penalty=0.5, ar=ar, **({"ar_temperature": 1.0} if ar else {}))[0]
        assert r.choices[0].text == ref.text


def test_vllm_sampling_extras(client, http, pipe):
    """vLLM's extra sampling fields reach the engine (repetition_penalty, min_tokens, stop_token_ids,
    include_stop_str_in_output, allowed_token_ids, truncate_prompt_tokens); mistakes are 400s naming the field."""
    for ar in (False, True):
        r = complete(client, "Hello there", seed=4, max_tokens=40, ignore_eos=True,
                     extra_body={"ar": ar, "repetition_penalty": 1.3})
        ref = pipe.generate(["Hello there"], seed=4, max_new_tokens=40, ignore_eos=True, repetition_penalty=1.3,
                            ar=ar, **({"ar_temperature": 1.0} if ar else {}))[0]
        assert r.choices[0].text == ref.text
    plain = complete(client, "Hello there", seed=4, max_tokens=40, ignore_eos=True).choices[0].text
    neutral = complete(client, "Hello there", seed=4, max_tokens=40, ignore_eos=True,  # what `vllm bench` sends
                       extra_body={"repetition_penalty": 1.0, "min_tokens": 0, "include_stop_str_in_output": False,
                                   "skip_special_tokens": False, "spaces_between_special_tokens": True})
    assert neutral.choices[0].text == plain
    y, z = (pipe.tokenizer.encode(c, add_bos=False)[0] for c in "yz")
    r = complete(client, "Hi", seed=1, max_tokens=20, ignore_eos=True, extra_body={"allowed_token_ids": [y, z]})
    assert set(r.choices[0].text) <= {"y", "z"} and r.usage.completion_tokens == 20
    for ar in (False, True):
        r = complete(client, "Hi", seed=1, max_tokens=20, logit_bias={str(z): 100},
                     extra_body={"ar": ar, "stop_token_ids": [z]})
        assert r.choices[0].text == "z" and r.choices[0].finish_reason == "stop"  # not special: kept
        r = complete(client, "Hi", seed=1, max_tokens=20, logit_bias={str(z): 100},
                     extra_body={"ar": ar, "stop_token_ids": [z], "min_tokens": 3})
        assert r.usage.completion_tokens == 4 and r.choices[0].text.endswith("z")
        r = complete(client, "Hi", seed=1, max_tokens=20, logit_bias={"106": 100}, extra_body={"ar": ar,
                                                                                               "min_tokens": 6})
        assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "stop"
    full = complete(client, "Stop here", seed=8, max_tokens=48, ignore_eos=True).choices[0].text
    k = next(i for i in range(6, len(full) - 2) if full[i].isprintable() and full[i] != "\ufffd")
    stop = full[k:k + 2]
    want = full[:full.find(stop) + 2]
    kw = dict(seed=8, max_tokens=48, ignore_eos=True, stop=stop, extra_body={"include_stop_str_in_output": True})
    assert complete(client, "Stop here", **kw).choices[0].text == want
    assert "".join(c.choices[0].text for c in complete(client, "Stop here", stream=True, **kw)) == want
    ids = pipe.encode("Hello there")
    cut = complete(client, "Hello there", seed=4, max_tokens=8, extra_body={"truncate_prompt_tokens": 3})
    same = complete(client, ids[-3:], seed=4, max_tokens=8)
    assert cut.usage.prompt_tokens == 3 and cut.choices[0].text == same.choices[0].text
    assert complete(client, "Hello there", max_tokens=2, extra_body={"truncate_prompt_tokens": -1}
                    ).usage.prompt_tokens == len(ids)
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 8}
    for extra, param in (({"stop_token_ids": [10**7]}, "stop_token_ids"), ({"allowed_token_ids": []},
                         "allowed_token_ids"), ({"min_tokens": 9}, "min_tokens"),
                         ({"repetition_penalty": 0}, "repetition_penalty"),
                         ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens")):
        assert_error(http.post("/v1/completions", json={**body, **extra}), 400, param=param)
    r = http.post("/v1/completions", json={"model": NAME, "prompt": "Hi", "min_tokens": 5000})  # default max_tokens
    assert_error(r, 400, param="min_tokens")
    assert "at most max_tokens (32)" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={**body, "min_tokens": 2, "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and "min_tokens" in r.json()["error"]["message"]


def test_server_seed_makes_unseeded_requests_repeat(ckpt):
    """--seed (vLLM's): requests without a seed draw theirs from one seeded generator, so a restarted server gives
    the same answers to the same requests in the same order; without it, each its own random seed."""
    def answers(seed):
        settings = ServerSettings(model_name=NAME, max_concurrency=2, seed=seed)
        with ServerThread(create_app(Pipeline.load(str(ckpt), device="cpu", quiet=True), settings)) as s:
            return [httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 6}, timeout=60).json()
                    ["dgemma"]["seed"] for _ in range(3)]

    first = answers(7)
    assert answers(7) == first and len(set(first)) == 3
    assert answers(None) != first
    with pytest.raises(ValueError, match="seed must be"):
        ServerSettings(seed=-1)


def test_every_response_carries_a_request_id(client, http):
    """X-Request-Id, as OpenAI sends it (the openai client's `_request_id`): the client's own, else a new one."""
    r = client.completions.with_raw_response.create(model=NAME, prompt="x", max_tokens=2)
    assert r.headers["x-request-id"].startswith("req_") and r.parse()._request_id == r.headers["x-request-id"]
    assert http.get("/health", headers={"X-Request-Id": "trace-42"}).headers["x-request-id"] == "trace-42"
    other = http.get("/v1/models", headers={"X-Request-Id": "x" * 500}).headers["x-request-id"]
    assert other.startswith("req_") and other != http.get("/v1/models").headers["x-request-id"]
    assert_error(http.post("/v1/completions", json={"prompt": 1.5}), 400)  # errors carry one too
    assert http.post("/v1/completions", json={"prompt": 1.5}).headers["x-request-id"].startswith("req_")


def test_a_request_brings_its_chat_template_only_where_trusted(ckpt, http):
    """vLLM's per-request chat_template: a 400 naming the flag unless the server runs with
    --trust-request-chat-template; then chat and /tokenize render with it."""
    msgs = [{"role": "user", "content": "hi"}]
    template = "{% for m in messages %}<{{ m['role'] }}|{{ m['content'] }}>{% endfor %}"
    err = assert_error(http.post("/v1/chat/completions", json={"messages": msgs, "chat_template": template,
                                                               "max_tokens": 2}), 400, param="chat_template")
    assert "--trust-request-chat-template" in err["message"]
    settings = ServerSettings(model_name=NAME, max_concurrency=1, trust_request_chat_template=True)
    with ServerThread(create_app(Pipeline.load(str(ckpt), device="cpu", quiet=True), settings)) as s:
        ids = httpx.post(s.url + "/tokenize", json={"messages": msgs, "chat_template": template}).json()["tokens"]
        assert httpx.post(s.url + "/detokenize", json={"tokens": ids}).json()["prompt"].endswith("<user|hi>")
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": msgs, "chat_template": template,
                                                             "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(ids)
        assert_error(httpx.post(s.url + "/v1/chat/completions", json={"messages": msgs, "chat_template": "{% if %}"}),
                     400, param="chat_template")


def test_invocations_route_by_body(http):
    """SageMaker's /invocations (vLLM's): a chat completion or a completion by the body's fields."""
    chat = http.post("/invocations", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                           "seed": 1})
    assert chat.status_code == 200 and chat.json()["object"] == "chat.completion"
    assert chat.json()["choices"] == http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 1}).json()["choices"]
    text = http.post("/invocations", json={"prompt": "hi", "max_tokens": 4})
    assert text.status_code == 200 and text.json()["object"] == "text_completion"
    assert_error(http.post("/invocations", json={"input": "hi"}), 400, "invalid_value")
    assert_error(http.post("/invocations", json={"prompt": "hi", "max_tokens": "x"}), 400)


def test_structured_output(client):
    """response_format (OpenAI) and structured_outputs (vLLM): a random model's text still matches, in chat and
    completions, diffusion and AR, n > 1, streaming, with logprobs; usage reports the usual counts."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    for ar in (False, True):
        r = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "a record"}], seed=2, max_tokens=48, n=2,
            logprobs=True, top_logprobs=2, extra_body={"ar": ar},
            response_format={"type": "json_schema", "json_schema": {"name": "rec", "schema": schema,
                                                                    "strict": True}})
        for ch in r.choices:
            doc = json.loads(ch.message.content)
            assert set(doc) == {"n", "ok"} and 0 <= doc["n"] <= 9 and ch.finish_reason == "stop"
            assert "".join(t.token for t in ch.logprobs.content) == ch.message.content
        assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    r = complete(client, "x", seed=5, max_tokens=40, n=2, extra_body={"structured_outputs": {"regex": "[a-d]{4}"}})
    assert all(re.fullmatch("[a-d]{4}", c.text) for c in r.choices)
    # vLLM's older guided_* fields are the same constraints, with the same tokens
    old = complete(client, "x", seed=5, max_tokens=40, n=2, extra_body={"guided_regex": "[a-d]{4}",
                                                                        "guided_decoding_backend": "xgrammar"})
    assert [c.text for c in old.choices] == [c.text for c in r.choices]
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "a record"}], seed=2,
                                       max_tokens=48, extra_body={"guided_json": schema})
    assert set(json.loads(r.choices[0].message.content)) == {"n", "ok"}
    assert complete(client, "x", max_tokens=8, extra_body={"guided_choice": ["up", "down"]}).choices[0].text in \
        ("up", "down")
    chunks = complete(client, "x", seed=5, max_tokens=40, stream=True,
                      extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert "".join(c.choices[0].text for c in chunks) in ("left", "right")
    # committed runs stream as the walk commits them, before their canvas ends (one canvas here)
    chunks = list(complete(client, "x", seed=5, max_tokens=12, stream=True,
                           extra_body={"structured_outputs": {"regex": "[a-d]{12}"}}))
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert re.fullmatch("[a-d]{12}", "".join(texts)) and len(texts) >= 2
    # With thinking on, the schema holds the answer after the thought (returned apart as reasoning_content).
    for seed in range(3):
        r = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "a record"}], seed=seed, max_tokens=48,
            response_format={"type": "json_schema", "json_schema": {"name": "rec", "schema": schema}},
            extra_body={"chat_template_kwargs": {"enable_thinking": True}})
        if r.choices[0].finish_reason == "stop":
            assert set(json.loads(r.choices[0].message.content)) == {"n", "ok"}
    r = complete(client, "x", seed=1, max_tokens=64, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].text), dict)


def test_tool_calls(client, pipe):
    """tools + tool_choice: a required or named call comes back as OpenAI tool_calls (finish_reason "tool_calls"),
    diffusion and AR, streamed too; "auto" lets the model choose (a random model writes text); a call and its
    result go back into the conversation through the chat template."""
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for ar in (False, True):
        for choice in ("required", named):
            r = client.chat.completions.create(model=NAME, messages=ask, tools=TOOLS, tool_choice=choice, seed=1,
                                               n=2, max_tokens=64, parallel_tool_calls=False, extra_body={"ar": ar})
            for ch in r.choices:
                assert ch.finish_reason == "tool_calls" and ch.message.content is None, ch
                for call in ch.message.tool_calls:
                    args = json.loads(call.function.arguments)
                    assert call.type == "function" and call.id.startswith("call_")
                    if choice is named or call.function.name == "get_weather":
                        assert call.function.name == "get_weather" and set(args) == {"city", "unit"}
                        assert len(args["city"]) <= 6 and args["unit"] in ("c", "f")
                    else:
                        assert call.function.name == "now" and args == {}
                assert len(ch.message.tool_calls) == 1
    # Streaming: the openai client assembles the calls from the deltas; no markup leaks into the content.
    chunks = list(client.chat.completions.create(model=NAME, messages=ask, tools=TOOLS, tool_choice="required",
                                                 seed=2, max_tokens=64, stream=True, parallel_tool_calls=False))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ""
    [call] = [t for d in deltas for t in (d.tool_calls or [])]
    assert call.index == 0 and call.function.name in ("get_weather", "now")
    json.loads(call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # "auto": the model may answer in text; "none": the tools are left out of the prompt.
    r = client.chat.completions.create(model=NAME, messages=ask, tools=TOOLS, seed=1, max_tokens=16)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.tool_calls is None
    r = client.chat.completions.create(model=NAME, messages=ask, tools=TOOLS, tool_choice="none", seed=1,
                                       max_tokens=16)
    plain = client.chat.completions.create(model=NAME, messages=ask, seed=1, max_tokens=16)
    assert r.choices[0].message.content == plain.choices[0].message.content
    # With thinking on, a forced call may follow a thought, which comes back apart as reasoning_content.
    r = client.chat.completions.create(model=NAME, messages=ask, tools=TOOLS, tool_choice="required", seed=1,
                                       max_tokens=64, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    message = r.choices[0].message
    assert r.choices[0].finish_reason in ("tool_calls", "length")
    if r.choices[0].finish_reason == "tool_calls":
        assert "<|channel>" not in (message.content or "") and message.tool_calls
        assert isinstance(message.model_extra.get("reasoning_content") or "", str)
    # The call and its result continue the conversation: the prompt is the template's rendering of them.
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}
    history = ask + [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = client.chat.completions.create(model=NAME, messages=history, tools=TOOLS, seed=1, max_tokens=16)
    assert r.usage.prompt_tokens == len(pipe.encode_chat(history, tools=TOOLS))


def test_responses_logprobs(client, pipe):
    """Responses' include ["message.output_text.logprobs"] / top_logprobs: the answer's entries, the chat path's,
    whole and streamed (each delta with the entries of the tokens it completes)."""
    kw = dict(model=NAME, input="Hello", max_output_tokens=16, extra_body={"seed": 3})
    r = client.responses.create(**kw, include=["message.output_text.logprobs"], top_logprobs=2)
    chat = client.chat.completions.create(model=NAME, seed=3, max_tokens=16, logprobs=True, top_logprobs=2,
                                          messages=[{"role": "user", "content": "Hello"}])
    part = r.output[0].content[0]
    want = chat.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in part.logprobs] == [(e.token, e.logprob) for e in want]
    assert all(len(e.top_logprobs) == 2 for e in part.logprobs) and r.output_text == chat.choices[0].message.content
    assert client.responses.create(**kw).output[0].content[0].logprobs == []
    with client.responses.stream(**kw, include=["message.output_text.logprobs"], top_logprobs=2) as s:
        events = list(s)
    streamed = [e for ev in events if ev.type == "response.output_text.delta" for e in ev.logprobs]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in want]


def test_responses_api(client, http, pipe):
    """POST /v1/responses: the chat path under Responses' shapes (input items, instructions, flat function tools,
    text.format, typed stream events), through the openai client's own Responses support."""
    r = client.responses.create(model=NAME, input="Hello", instructions="Be brief.", max_output_tokens=16,
                                extra_body={"seed": 3})
    chat = client.chat.completions.create(model=NAME, seed=3, max_tokens=16, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    assert r.output_text == chat.choices[0].message.content and r.object == "response"
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    # A forced call, then its output sent back as input items.
    tools = [{"type": "function", "name": "get_weather", "description": "Current weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"]}}]
    r = client.responses.create(model=NAME, input="Weather in Paris?", tools=tools, tool_choice="required",
                                parallel_tool_calls=False, max_output_tokens=64, extra_body={"seed": 1})
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather" and r.status == "completed"
    assert set(json.loads(call.arguments)) == {"city"}
    items = [{"role": "user", "content": "Weather in Paris?"},
             {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
             {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    r = client.responses.create(model=NAME, input=items, tools=tools, max_output_tokens=8)
    chat_tools = [{"type": "function", "function": {k: tools[0][k] for k in ("name", "description", "parameters")}}]
    history = [items[0], {"role": "assistant", "content": "", "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
               {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}]
    assert r.usage.input_tokens == len(pipe.encode_chat(history, tools=chat_tools))
    # Streaming: the typed events, whose deltas add up to the final text.
    with client.responses.stream(model=NAME, input="Hi", max_output_tokens=24, extra_body={"seed": 2}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == final.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # Structured output through text.format.
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = client.responses.create(model=NAME, input="a record", max_output_tokens=32,
                                text={"format": {"type": "json_schema", "name": "rec", "schema": schema}})
    assert set(json.loads(r.output_text)) == {"ok"}
    # Errors name the Responses field.
    for body, param, code in [
            ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0", "unsupported_parameter"),
            ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
             "input.0.content.0", "unsupported_parameter"),
            ({"input": [{"role": "robot", "content": "x"}]}, "input.0.role", "invalid_value"),
            ({"input": "x", "max_output_tokens": 9999}, "max_output_tokens", "max_tokens_exceeded"),
            ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format", "invalid_value"),
            ({"input": "x", "tool_choice": "required"}, "tool_choice", "invalid_value")]:
        assert_error(http.post("/v1/responses", json=body), 400, code=code, param=param)


def test_responses_store_and_previous_response_id(client, http, pipe):
    """Stored responses: a request continues one by previous_response_id exactly as if it sent the conversation
    again (the same prompt, so the same tokens for a seed), through a tool call too; retrieve, input_items, delete;
    store: false keeps nothing."""
    r1 = client.responses.create(model=NAME, input="My name is Ada.", max_output_tokens=12, extra_body={"seed": 4})
    assert r1.store is True and r1.previous_response_id is None
    r2 = client.responses.create(model=NAME, input="And mine?", previous_response_id=r1.id, max_output_tokens=12,
                                 instructions="Be brief.", extra_body={"seed": 5})
    again = client.responses.create(model=NAME, input=[
        {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": r1.output_text},
        {"role": "user", "content": "And mine?"}], instructions="Be brief.", max_output_tokens=12,
        extra_body={"seed": 5})
    assert r2.previous_response_id == r1.id and r2.output_text == again.output_text
    assert r2.usage.input_tokens == again.usage.input_tokens
    got = client.responses.retrieve(r2.id)
    assert got.id == r2.id and got.output_text == r2.output_text and got.usage.input_tokens == r2.usage.input_tokens
    items = client.responses.input_items.list(r2.id, order="asc")
    texts = [i.content[0].text for i in items.data]
    assert texts == ["My name is Ada.", r1.output_text, "And mine?"] and all(i.id for i in items.data)
    assert [i.id for i in client.responses.input_items.list(r2.id).data] == [i.id for i in items.data][::-1]
    # a forced tool call, then only its output, by previous_response_id
    tools = [{"type": "function", "name": "get_weather", "description": "Current weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"]}}]
    r = client.responses.create(model=NAME, input="Weather in Paris?", tools=tools, tool_choice="required",
                                parallel_tool_calls=False, max_output_tokens=64, extra_body={"seed": 1})
    [call] = r.output
    follow = client.responses.create(model=NAME, previous_response_id=r.id, tools=tools, max_output_tokens=8,
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "sunny"}], extra_body={"seed": 2})
    whole = client.responses.create(model=NAME, tools=tools, max_output_tokens=8, extra_body={"seed": 2}, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert follow.usage.input_tokens == whole.usage.input_tokens and follow.output_text == whole.output_text
    # streamed responses are kept too; store: false ones are not
    with client.responses.stream(model=NAME, input="Hi", max_output_tokens=8) as stream:
        final = stream.get_final_response()
    assert client.responses.retrieve(final.id).output_text == final.output_text
    gone = client.responses.create(model=NAME, input="Hi", max_output_tokens=4, store=False)
    assert gone.store is False
    for rid in (gone.id, "resp_nope"):
        assert_error(http.get(f"/v1/responses/{rid}"), 404, code="response_not_found")
    client.responses.delete(r1.id)
    assert_error(http.get(f"/v1/responses/{r1.id}"), 404)
    assert_error(http.post("/v1/responses", json={"input": "x", "previous_response_id": r1.id}), 404,
                 code="previous_response_not_found", param="previous_response_id")
    assert_error(http.get(f"/v1/responses/{r2.id}/input_items", params={"order": "sideways"}), 400, param="order")


def test_responses_in_the_background(client, http):
    """background: true answers at once (queued), runs whether or not anyone waits, and is read by polling; cancel
    stops it."""
    fg = client.responses.create(model=NAME, input="Tell me", max_output_tokens=16, extra_body={"seed": 6})
    r = client.responses.create(model=NAME, input="Tell me", max_output_tokens=16, background=True,
                                extra_body={"seed": 6})
    assert r.status == "queued" and r.background is True and r.output == []
    deadline = time.time() + 60
    while (r := client.responses.retrieve(r.id)).status in ("queued", "in_progress") and time.time() < deadline:
        time.sleep(0.05)
    assert r.status == fg.status and r.output_text == fg.output_text and r.usage.output_tokens == fg.usage.output_tokens
    assert client.responses.cancel(r.id).status == r.status  # finished: unchanged
    long = client.responses.create(model=NAME, input="Go on", max_output_tokens=512, background=True,
                                   extra_body={"ignore_eos": True, "steps": 16})
    assert client.responses.cancel(long.id).status == "cancelled"
    assert wait_until(lambda: client.responses.retrieve(long.id).status == "cancelled")
    assert wait_until(lambda: _active(str(http.base_url).rstrip("/")) == 0)
    # deleted while it runs: stopped, and not brought back as cancelled when its task unwinds
    doomed = client.responses.create(model=NAME, input="Go on", max_output_tokens=512, background=True,
                                     extra_body={"ignore_eos": True, "steps": 16})
    client.responses.delete(doomed.id)
    assert wait_until(lambda: _active(str(http.base_url).rstrip("/")) == 0)
    assert_error(http.get(f"/v1/responses/{doomed.id}"), 404)
    assert_error(http.post("/v1/responses", json={"input": "x", "background": True, "store": False}), 400,
                 param="background")
    assert_error(http.post(f"/v1/responses/{fg.id}/cancel"), 400, param="response_id")


def test_background_responses_stream_and_resume(client, http):
    """background + stream: the events are kept, so a client that dropped the stream reads on from its last
    sequence number (or from the start) while the response runs and after; the openai stream helper resumes by
    response_id; the text is the one a foreground request with that seed gives."""
    kw = dict(model=NAME, input="Tell me", max_output_tokens=64, extra_body={"seed": 7, "ignore_eos": True})
    fg = client.responses.create(**kw)
    stream = client.responses.create(background=True, stream=True, **kw)
    head = []
    for event in stream:
        head.append(event)
        if len(head) == 4:
            break
    stream.close()  # the client goes; the response does not
    assert [e.type for e in head[:3]] == ["response.created", "response.queued", "response.in_progress"]
    assert head[0].response.status == "queued" and head[0].response.background is True
    rid = head[0].response.id
    rest = list(client.responses.retrieve(rid, stream=True, starting_after=head[-1].sequence_number))
    events = head + rest
    assert [e.sequence_number for e in events] == list(range(len(events))) and rest[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == fg.output_text == rest[-1].response.output_text == client.responses.retrieve(rid).output_text
    again = list(client.responses.retrieve(rid, stream=True))  # after the end: the whole stream again
    assert [e.model_dump() for e in again] == [e.model_dump() for e in events]
    with client.responses.stream(response_id=rid, starting_after=3) as resumed:
        assert [e.sequence_number for e in resumed] == list(range(4, len(events)))
        assert resumed.get_final_response().output_text == fg.output_text
    assert_error(http.get(f"/v1/responses/{fg.id}", params={"stream": "true"}), 400, param="stream")
    assert_error(http.get(f"/v1/responses/{rid}", params={"stream": "true", "starting_after": "x"}), 400,
                 param="starting_after")
    assert_error(http.get(f"/v1/responses/{rid}/input_items", params={"limit": "many"}), 400, param="limit")


def test_responses_store_size(ckpt):
    from dgemma.serve.responses import ResponsesRequest, ResponseStore

    store = ResponseStore(2)
    for k in range(3):
        req = ResponsesRequest(input=f"q{k}")
        store.history(req)
        store.keep(req, {"id": f"resp_{k}", "status": "completed", "output": []})
    assert list(store.entries) == ["resp_1", "resp_2"]  # the oldest went
    off = ResponseStore(0)
    req = ResponsesRequest(input="x", previous_response_id="resp_1")
    with pytest.raises(Exception, match="--responses-store 0"):
        off.history(req)
    req = ResponsesRequest(input="x")
    off.history(req)
    assert req._stored is False


def test_conversations_api(client, http):
    """OpenAI's Conversations API with the Responses API's `conversation`: a response on a conversation gives what
    sending the whole conversation as input gives (the same prompt, so the same tokens for a seed) and adds its
    input and output items to it; items are listed page by page, added, read and deleted; one response at a time
    (409 while one runs; a cancelled one adds nothing); errors name their field."""
    start = [{"role": "user", "content": "My name is Ada."},
             {"type": "message", "role": "assistant", "content": "Hello Ada."}]
    conv = client.conversations.create(items=start, metadata={"topic": "names"})
    assert conv.object == "conversation" and conv.metadata == {"topic": "names"} and conv.id.startswith("conv_")
    r = client.responses.create(model=NAME, input="And mine?", conversation=conv.id, max_output_tokens=12,
                                extra_body={"seed": 5})
    turns = start + [{"role": "user", "content": "And mine?"}]
    whole = client.responses.create(model=NAME, input=turns, max_output_tokens=12, store=False,
                                    extra_body={"seed": 5})
    assert r.conversation.id == conv.id and whole.conversation is None
    assert r.output_text == whole.output_text and r.usage.input_tokens == whole.usage.input_tokens
    items = client.conversations.items.list(conv.id, order="asc").data
    assert [(i.role, i.content[0].text) for i in items] == [(m["role"], m["content"]) for m in turns] + [
        ("assistant", r.output_text)]
    assert items[-1].id == r.output[-1].id and len({i.id for i in items}) == 4
    assert [i.content[0].type for i in items[:2]] == ["input_text", "output_text"]
    # The next turn sends only what is new ({"id": ...} as well as the id); a streamed response adds its items too.
    with client.responses.stream(model=NAME, input="Thanks", conversation={"id": conv.id}, max_output_tokens=8,
                                 extra_body={"seed": 6}) as stream:
        final = stream.get_final_response()
    turns += [{"role": "assistant", "content": r.output_text}, {"role": "user", "content": "Thanks"}]
    again = client.responses.create(model=NAME, input=turns, max_output_tokens=8, store=False, extra_body={"seed": 6})
    assert final.output_text == again.output_text and final.usage.input_tokens == again.usage.input_tokens
    # Pages (the client follows `after` by itself), newest first unless order=asc.
    listed = [i.id for i in client.conversations.items.list(conv.id, limit=2)]
    assert len(listed) == 6 and listed[0] == final.output[-1].id and listed[2:] == [i.id for i in items][::-1]
    first = client.conversations.items.list(conv.id, limit=2)
    assert first.has_more and [i.id for i in first.data] == listed[:2]
    # Items added by hand: checked as input items, read back, deleted (which answers the conversation).
    added = client.conversations.items.create(conv.id, items=[
        {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "42"}])
    assert [i.type for i in added.data] == ["function_call", "function_call_output"]
    got = client.conversations.items.retrieve(added.data[1].id, conversation_id=conv.id)
    assert got.type == "function_call_output" and got.output == "42"
    assert client.conversations.items.delete(added.data[0].id, conversation_id=conv.id).id == conv.id
    assert len(list(client.conversations.items.list(conv.id, limit=100))) == 7
    assert client.conversations.update(conv.id, metadata={"topic": "done"}).metadata == {"topic": "done"}
    assert client.conversations.retrieve(conv.id).metadata == {"topic": "done"}
    # One response at a time: a second one while a background one runs is a 409; cancelled, it adds nothing.
    bg = client.responses.create(model=NAME, input="Go on", conversation=conv.id, background=True,
                                 max_output_tokens=512, extra_body={"ignore_eos": True, "steps": 16})
    assert bg.conversation.id == conv.id
    assert_error(http.post("/v1/responses", json={"input": "x", "conversation": conv.id}), 409,
                 code="conversation_locked", param="conversation")
    client.responses.cancel(bg.id)
    assert wait_until(lambda: client.responses.retrieve(bg.id).status == "cancelled")
    assert wait_until(lambda: _active(str(http.base_url).rstrip("/")) == 0)
    assert len(list(client.conversations.items.list(conv.id, limit=100))) == 7
    ok = client.responses.create(model=NAME, input="Hi", conversation=conv.id, max_output_tokens=4)
    assert ok.status in ("completed", "incomplete")
    base = f"/v1/conversations/{conv.id}"
    for path, body, status, param in [
            ("/v1/responses", {"input": "x", "conversation": conv.id, "previous_response_id": r.id}, 400,
             "conversation"),
            ("/v1/responses", {"input": "x", "conversation": "conv_nope"}, 404, "conversation"),
            ("/v1/responses", {"input": "x", "conversation": {"name": "x"}}, 400, "conversation"),
            ("/v1/conversations", {"metadata": {str(k): "v" for k in range(17)}}, 400, "metadata"),
            ("/v1/conversations", {"items": [{"role": "robot", "content": "x"}]}, 400, "items.0.role"),
            ("/v1/conversations", {"items": [{"role": "user", "content": "x"}] * 21}, 400, "items"),
            ("/v1/conversations", {"colour": "red"}, 400, "colour"),
            (base + "/items", {"items": [{"id": "a", "role": "user", "content": "x"}] * 2}, 400, "items.1.id"),
            (base + "/items", {"items": [{"type": "web_search_call"}]}, 400, "items.0"),
            (base + "/items", {}, 400, "items"),
            (base, {}, 400, "metadata")]:
        assert_error(http.post(path, json=body), status, param=param)
    assert_error(http.get(base + "/items/nope"), 404, code="item_not_found")
    assert_error(http.get(base + "/items", params={"order": "up"}), 400, param="order")
    assert client.conversations.delete(conv.id).deleted is True
    assert_error(http.get(base), 404, code="conversation_not_found")
    assert_error(http.post("/v1/responses", json={"input": "x", "conversation": conv.id}), 404,
                 code="conversation_not_found")


def test_responses_truncation_auto(client, http, pipe):
    """truncation "auto": a conversation too long for the context leaves out its first items, as few as fit (a
    tool call's output never without its call), and the prompt is the one those last items alone give; the stored
    response keeps every item; "disabled" (the default) is a 400."""
    turns = [{"role": "user" if k % 2 == 0 else "assistant", "content": f"turn {k} " + "x" * 150} for k in range(8)]
    turns[5:7] = [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                  {"type": "function_call_output", "call_id": "c1", "output": "y" * 150}]
    body = {"model": NAME, "input": turns, "max_output_tokens": 16, "seed": 3}
    assert_error(http.post("/v1/responses", json=body), 400, code="context_length_exceeded")
    r = http.post("/v1/responses", json=dict(body, truncation="auto")).json()
    assert r["truncation"] == "auto" and r["status"] in ("completed", "incomplete")
    fits = [k for k in range(1, len(turns)) if turns[k].get("type") != "function_call_output" and
            len(pipe.encode_chat(_as_chat(turns[k:]))) + 16 <= 1024]
    alone = http.post("/v1/responses", json=dict(body, input=turns[fits[0]:])).json()
    assert fits[0] > 1 and r["usage"]["input_tokens"] == alone["usage"]["input_tokens"]
    assert r["output"] == [dict(o, id=r["output"][k]["id"]) for k, o in enumerate(alone["output"])]
    assert len(client.responses.input_items.list(r["id"], limit=100).data) == len(turns)
    # a last item too long alone is still a 400
    assert_error(http.post("/v1/responses", json=dict(body, truncation="auto", input="z" * 2000)), 400,
                 code="context_length_exceeded")
    assert_error(http.post("/v1/responses", json=dict(body, truncation="sometimes")), 400, param="truncation")


def _as_chat(items):
    """Responses input items as chat messages (the test's own small translation: messages and one tool call)."""
    out = []
    for it in items:
        if it.get("type") == "function_call":
            out.append({"role": "assistant", "content": "", "tool_calls": [
                {"id": it["call_id"], "type": "function", "function": {"name": it["name"], "arguments": "{}"}}]})
        elif it.get("type") == "function_call_output":
            out.append({"role": "tool", "tool_call_id": it["call_id"], "content": it["output"]})
        else:
            out.append({"role": it["role"], "content": it["content"]})
    return out


def test_finished_background_streams_keep_their_events_for_a_while(ckpt):
    """The event logs of background streams: kept while they run, and for the last KEPT_STREAMS that ended."""
    from dgemma.serve.responses import KEPT_STREAMS, EventLog, ResponsesRequest, ResponseStore

    class Task:
        def add_done_callback(self, fn):
            pass

    store, logs = ResponseStore(1000), []
    for k in range(KEPT_STREAMS + 5):
        req = ResponsesRequest(input="x", background=True, stream=True)
        store.history(req)
        logs.append(EventLog())
        store.start(req, {"id": f"resp_{k}", "status": "queued", "output": [], "background": True}, Task(), [],
                    logs[-1])
        if k != 2:
            logs[-1].close()  # ended, but for resp_2
    store.start(req, {"id": "resp_new", "status": "queued", "output": [], "background": True}, Task(), [],
                EventLog())
    kept = list(store.streams)
    assert "resp_2" in kept and len([r for r in kept if store.streams[r].done]) == KEPT_STREAMS
    assert "resp_0" not in kept and kept[-1] == "resp_new"
    with pytest.raises(Exception, match="last 64 that ended"):
        store.events("resp_0")


def test_conversation_store(ckpt):
    """At most --responses-store conversations, the least recently used going first; 0 turns the API off."""
    from dgemma.serve.conversations import ConversationCreate, ConversationStore

    store = ConversationStore(2)
    ids = [store.create(ConversationCreate())["id"] for _ in range(2)]
    store.get(ids[0])  # used: now the most recent
    ids.append(store.create(ConversationCreate())["id"])
    assert list(store.entries) == [ids[0], ids[2]]
    with pytest.raises(Exception, match="--responses-store above 0"):
        ConversationStore(0).create(ConversationCreate())


def test_responses_and_conversations_outlive_a_restart(ckpt, tmp_path):
    """--responses-dir: stored responses and conversations are read back by the next server, which continues them
    as the first would have; deleted ones stay deleted, the oldest past --responses-store go (their files too), an
    unreadable file is skipped, and a background response a restart interrupted comes back failed."""
    state = tmp_path / "state"
    settings = ServerSettings(model_name=NAME, max_concurrency=2, max_tokens_limit=64, responses_store=3,
                              responses_dir=str(state))

    def serve(settings):
        return ServerThread(create_app(Pipeline.load(str(ckpt), device="cpu", quiet=True), settings))

    def connect(s):
        return openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    with serve(settings) as s:
        c = connect(s)
        first = c.responses.create(model=NAME, input="Hi", max_output_tokens=4)  # the oldest: will go
        r = c.responses.create(model=NAME, input="My name is Ada.", max_output_tokens=8, extra_body={"seed": 1})
        conv = c.conversations.create(items=[{"role": "user", "content": "Hi"}], metadata={"k": "v"})
        c.responses.create(model=NAME, input="Again", conversation=conv.id, max_output_tokens=8, store=False)
        deleted = c.responses.create(model=NAME, input="x", max_output_tokens=4)
        c.responses.delete(deleted.id)
        items = [i.id for i in c.conversations.items.list(conv.id)]
        c.responses.create(model=NAME, input="y", max_output_tokens=4)
        follow = c.responses.create(model=NAME, input="And mine?", previous_response_id=r.id, max_output_tokens=8,
                                    extra_body={"seed": 2})
        assert len(list((state / "responses").glob("*.json"))) == 3
        assert not (state / "responses" / f"{first.id}.json").exists()
    # what a kill leaves: a background response still queued, and a torn file
    record = json.loads((state / "responses" / f"{r.id}.json").read_text())
    record["response"].update(id="resp_bg", status="queued", background=True)
    (state / "responses" / "resp_bg.json").write_text(json.dumps(record))
    (state / "conversations" / "conv_torn.json").write_text('{"conversation": {"id"')
    with serve(dataclasses.replace(settings, responses_store=10)) as s:
        c, http = connect(s), httpx.Client(base_url=s.url, timeout=60)
        assert c.responses.retrieve(r.id).output_text == r.output_text
        again = c.responses.create(model=NAME, input="And mine?", previous_response_id=r.id, max_output_tokens=8,
                                   extra_body={"seed": 2})
        assert again.output_text == follow.output_text and again.usage.input_tokens == follow.usage.input_tokens
        assert_error(http.get(f"/v1/responses/{deleted.id}"), 404)
        bg = c.responses.retrieve("resp_bg")
        assert bg.status == "failed" and bg.error.code == "server_restarted"
        assert c.conversations.retrieve(conv.id).metadata == {"k": "v"}
        assert [i.id for i in c.conversations.items.list(conv.id)] == items
        c.responses.create(model=NAME, input="More", conversation=conv.id, max_output_tokens=4)
        assert len(c.conversations.items.list(conv.id).data) == len(items) + 2
        assert_error(http.get("/v1/conversations/conv_torn"), 404)


def test_anthropic_messages_api(server, http, pipe):
    """POST /v1/messages through Anthropic's own client: system + messages, tool_use / tool_result blocks, tool
    choice, streaming events, stop reasons, and errors in Anthropic's shape (with the key as x-api-key too)."""
    anthropic = pytest.importorskip("anthropic")
    c = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
    r = c.messages.create(model=NAME, max_tokens=16, system="Be brief.", messages=[{"role": "user", "content": "Hi"}],
                          extra_body={"seed": 3})
    chat = pipe.generate([pipe.encode_chat([{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hi"}])], seed=3, max_new_tokens=16)[0]
    [block] = r.content
    assert block.type == "text" and block.text == chat.text and r.role == "assistant"
    assert r.stop_reason == ("max_tokens" if chat.finish_reason == "length" else "end_turn")
    assert r.usage.output_tokens == len(chat.tokens)
    tools = [{"name": "get_weather", "description": "Current weather", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"]}}]
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    r = c.messages.create(model=NAME, max_tokens=64, tools=tools, messages=ask,
                          tool_choice={"type": "any", "disable_parallel_tool_use": True})
    [use] = r.content
    assert r.stop_reason == "tool_use" and use.type == "tool_use" and set(use.input) == {"city"}
    history = ask + [{"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name,
                                                        "input": use.input}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}]
    r = c.messages.create(model=NAME, max_tokens=8, tools=tools, messages=history)
    chat_tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                                    "parameters": tools[0]["input_schema"]}}]
    assert r.usage.input_tokens == len(pipe.encode_chat(
        ask + [{"role": "assistant", "content": "", "tool_calls": [{"id": use.id, "type": "function", "function": {
            "name": use.name, "arguments": use.input}}]}, {"role": "tool", "tool_call_id": use.id, "content": "sunny"}],
        tools=chat_tools))
    with c.messages.stream(model=NAME, max_tokens=24, messages=ask, extra_body={"seed": 2}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text and final.stop_reason in ("end_turn", "max_tokens")
    with c.messages.stream(model=NAME, max_tokens=64, tools=tools, messages=ask,
                           tool_choice={"type": "tool", "name": "get_weather"}) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[-1].name == "get_weather"
    # count_tokens: the prompt a request with those fields has (system, tools, tool results, thinking too).
    r = c.messages.create(model=NAME, max_tokens=8, system="Be brief.", tools=tools, messages=history,
                          thinking={"type": "enabled", "budget_tokens": 1024})
    count = c.messages.count_tokens(model=NAME, system="Be brief.", tools=tools, messages=history,
                                    thinking={"type": "enabled", "budget_tokens": 1024})
    assert count.input_tokens == r.usage.input_tokens
    assert c.messages.count_tokens(model=NAME, messages=ask).input_tokens == len(pipe.encode_chat(ask))
    # Errors in Anthropic's shape.
    for body, status, kind in [
            ({"model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, 404,
             "not_found_error"),
            ({"model": NAME, "max_tokens": 5, "messages": [{"role": "user", "content": [
                {"type": "image", "source": {"type": "url", "url": "x"}}]}]}, 400, "invalid_request_error"),
            ({"model": NAME, "messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error"),
            ({"model": NAME, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
              "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400, "invalid_request_error"),
            ({"model": NAME, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, 400,
             "invalid_request_error")]:
        resp = http.post("/v1/messages", json=body)
        assert resp.status_code == status and resp.json()["type"] == "error", resp.text
        assert resp.json()["error"]["type"] == kind and resp.json()["error"]["message"]
    for body, status in [({"model": NAME}, 400), ({"model": "nope", "messages": ask}, 404),
                         ({"model": NAME, "messages": ask, "max_tokens": 5}, 400),
                         ({"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, 400)]:
        resp = http.post("/v1/messages/count_tokens", json=body)
        assert resp.status_code == status and resp.json()["type"] == "error", resp.text


def test_predicted_outputs(client, http, pipe):
    """OpenAI's prediction: the engine's prediction (every canvas drafted from the predicted text), with usage's
    accepted / rejected_prediction_tokens; a wrong shape, AR or an empty prediction is a 400."""
    from dgemma.generate import GenerationParams

    chat = [{"role": "user", "content": "Hi"}]
    predicted = "print('hello world')\n" * 6
    r = client.chat.completions.create(model=NAME, messages=chat, seed=3, max_tokens=40,
                                       prediction={"type": "content", "content": predicted},
                                       extra_body={"ignore_eos": True})
    ids = pipe.encode(predicted, add_bos=False)
    [done] = pipe.generate([pipe.encode_chat(chat)], seed=3, max_new_tokens=40, ignore_eos=True, prediction=ids)
    assert r.choices[0].message.content == done.text
    d = r.usage.completion_tokens_details
    assert d.accepted_prediction_tokens == done.stats["accepted_prediction_tokens"]
    assert d.accepted_prediction_tokens + d.rejected_prediction_tokens == len(ids)
    parts = client.chat.completions.create(model=NAME, messages=chat, seed=3, max_tokens=40, extra_body={
        "ignore_eos": True}, prediction={"type": "content", "content": [{"type": "text", "text": predicted}]})
    assert parts.choices[0].message.content == done.text
    # the same field on the other endpoints (dgemma's extension there): completions, Responses, Messages
    body = {"model": NAME, "seed": 3, "ignore_eos": True, "prediction": {"type": "content", "content": predicted}}
    c = http.post("/v1/completions", json=dict(body, prompt="Hi", max_tokens=40)).json()
    [alone] = pipe.generate([pipe.encode("Hi")], seed=3, max_new_tokens=40, ignore_eos=True, prediction=ids)
    assert c["choices"][0]["text"] == alone.text
    assert c["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] == \
        alone.stats["accepted_prediction_tokens"]
    rs = http.post("/v1/responses", json=dict(body, input="Hi", max_output_tokens=40, store=False)).json()
    ms = http.post("/v1/messages", json=dict(body, messages=chat, max_tokens=40)).json()
    assert rs["output"][0]["content"][0]["text"] == ms["content"][0]["text"] == done.text
    assert client.chat.completions.create(model=NAME, messages=chat, max_tokens=4).usage.completion_tokens_details \
        is None
    assert GenerationParams().prediction is None
    body = {"model": NAME, "messages": chat, "max_tokens": 8}
    for prediction, extra, param in [({"type": "text", "content": "x"}, {}, "prediction.type"),
                                     ({"type": "content", "content": "x"}, {"ar": True}, "prediction"),
                                     ({"type": "content", "content": ""}, {}, "prediction.content"),
                                     ({"type": "content"}, {}, "prediction.content")]:
        assert_error(http.post("/v1/chat/completions", json=dict(body, prediction=prediction, **extra)), 400,
                     param=param)


def test_return_token_ids(client, http, pipe):
    """vLLM's return_token_ids: each choice's output ids and the prompt's, which decode to the text; in a stream,
    on each choice's finish chunk."""
    r = complete(client, "Hello there", seed=4, max_tokens=12, n=2, extra_body={"return_token_ids": True})
    for ch in r.choices:
        extra = ch.model_extra
        assert extra["prompt_token_ids"] == pipe.encode("Hello there")
        assert pipe.tokenizer.decode(extra["token_ids"]) == ch.text
    assert sum(len(ch.model_extra["token_ids"]) for ch in r.choices) == r.usage.completion_tokens
    assert "token_ids" not in complete(client, "Hello there", max_tokens=4).choices[0].model_extra
    stop = complete(client, "Stop here", seed=8, max_tokens=48, ignore_eos=True).choices[0].text[10:12]
    r = complete(client, "Stop here", seed=8, max_tokens=48, ignore_eos=True, stop=stop,
                 extra_body={"return_token_ids": True})
    # a stop string may end inside a token: the ids are those whose text the answer holds whole
    assert r.choices[0].text.startswith(pipe.tokenizer.decode(r.choices[0].model_extra["token_ids"]))
    chat = [{"role": "user", "content": "Hi"}]
    c = client.chat.completions.create(model=NAME, messages=chat, seed=2, max_tokens=10,
                                       extra_body={"return_token_ids": True})
    assert c.model_extra["prompt_token_ids"] == pipe.encode_chat(chat)
    assert len(c.choices[0].model_extra["token_ids"]) == c.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=NAME, messages=chat, seed=2, max_tokens=10, stream=True,
                                                 extra_body={"return_token_ids": True}))
    last = [k for k in chunks if k.choices and k.choices[0].finish_reason]
    assert len(last) == 1 and last[0].model_extra["prompt_token_ids"] == pipe.encode_chat(chat)
    # each chunk: the ids of the tokens whose text it completes; together, the answer's
    got = [t for k in chunks if k.choices for t in (k.choices[0].model_extra.get("token_ids") or [])]
    assert got == c.choices[0].model_extra["token_ids"]
    # ... also when a stop string cuts the text inside the stream
    first = complete(client, "Stop here", seed=8, max_tokens=48, ignore_eos=True, extra_body={"return_token_ids": True})
    full = first.choices[0].text
    k = next(i for i in range(len(pipe.tokenizer.decode(first.choices[0].model_extra["token_ids"][:CANVAS])) + 1,
                              len(full) - 2)  # a stop first seen in the 2nd canvas
             if full[i].isprintable() and full[i] != "\ufffd" and full.find(full[i:i + 2]) == i)
    kw = dict(seed=8, max_tokens=48, ignore_eos=True, stop=full[k:k + 2], extra_body={"return_token_ids": True})
    whole = complete(client, "Stop here", **kw).choices[0].model_extra["token_ids"]
    parts = [k.choices[0].model_extra.get("token_ids") or [] for k in complete(client, "Stop here", stream=True, **kw)
             if k.choices]
    assert [t for p in parts for t in p] == whole and sum(bool(p) for p in parts) > 1


def test_draft_warm_starts_the_first_canvas(client, http, pipe):
    """The `draft` extra field starts the first canvas from that text (or those ids) instead of noise: the
    engine's init_canvas, on completions, chat and with a suffix; AR and oversized drafts are 400s."""
    draft = "def add(a, b):"
    ids = pipe.encode(draft, add_bos=False)
    ref = pipe.generate(["Hello"], seed=3, max_new_tokens=16, ignore_eos=True, init_canvas=ids)[0]
    r = complete(client, "Hello", seed=3, max_tokens=16, ignore_eos=True, extra_body={"draft": draft})
    assert r.choices[0].text == ref.text
    assert complete(client, "Hello", seed=3, max_tokens=16, ignore_eos=True,
                    extra_body={"draft": ids}).choices[0].text == ref.text
    assert complete(client, "Hello", seed=3, max_tokens=16, ignore_eos=True).choices[0].text != ref.text
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], seed=3,
                                          max_tokens=8, extra_body={"draft": "Hello!"})
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert complete(client, "x = ", suffix=" + 1", max_tokens=8, extra_body={"draft": "40"}).choices[0].text is not None
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 4}
    assert_error(http.post("/v1/completions", json={**body, "draft": "x", "ar": True}), 400, param="draft")
    assert_error(http.post("/v1/completions", json={**body, "draft": "x" * 40}), 400, param="draft")
    assert_error(http.post("/v1/completions", json={**body, "draft": [10**7]}), 400, param="draft")
    assert_error(http.post("/v1/completions", json={**body, "draft": ""}), 400, param="draft")


def test_continue_final_message(server, client, http, pipe):
    """vLLM's continue_final_message (and Anthropic's prefill): the model continues the assistant's text, on the
    prompt the template gives the messages before it plus that text; the reply holds the continuation alone."""
    chat = [{"role": "user", "content": "Name a fruit"}, {"role": "assistant", "content": "My answer is: ap"}]
    ids = pipe.tokenizer.encode(pipe.tokenizer.apply_chat_template(chat[:1]) + "My answer is: ap", add_bos=False)
    assert pipe.encode_chat(chat, continue_final_message=True) == ids
    r = http.post("/tokenize", json={"messages": chat, "continue_final_message": True}).json()
    assert r["tokens"] == ids
    want = complete(client, ids, seed=3, max_tokens=20, ignore_eos=True).choices[0].text
    got = client.chat.completions.create(model=NAME, messages=chat, seed=3, max_tokens=20,
                                         extra_body={"continue_final_message": True, "ignore_eos": True})
    assert got.choices[0].message.content == want and got.usage.prompt_tokens == len(ids)
    # Anthropic's Messages API: a last assistant message is a prefill
    body = {"model": NAME, "max_tokens": 20, "messages": chat, "seed": 3, "ignore_eos": True}
    m = http.post("/v1/messages", json=body).json()
    assert m["content"][0]["text"] == want and m["usage"]["input_tokens"] == len(ids)
    # a new turn after it, as before, without the flag
    plain = http.post("/tokenize", json={"messages": chat}).json()["tokens"]
    assert plain == pipe.encode_chat(chat) != ids
    assert http.post("/tokenize", json={"messages": chat, "add_generation_prompt": False}).json()["tokens"] == \
        pipe.encode_chat(chat, add_generation_prompt=False)
    req = {"model": NAME, "messages": chat, "max_tokens": 4}
    assert_error(http.post("/v1/chat/completions", json={**req, "continue_final_message": True,
                                                          "add_generation_prompt": True}), 400,
                 param="continue_final_message")
    r = http.post("/v1/chat/completions", json={**req, "messages": chat[:1], "continue_final_message": True})
    assert r.status_code == 400 and "assistant" in r.json()["error"]["message"]


def test_tokenize_and_detokenize(http, pipe):
    """vLLM's /tokenize and /detokenize: the ids the completion and chat endpoints would use, and back."""
    r = http.post("/tokenize", json={"prompt": "Hello there", "return_token_strs": True}).json()
    assert r["tokens"] == pipe.encode("Hello there") and r["count"] == len(r["tokens"]) and r["max_model_len"] == 1024
    assert len(r["token_strs"]) == r["count"] and r["token_strs"][0] == "<bos>"
    assert http.post("/tokenize", json={"prompt": "Hi", "add_special_tokens": False}).json()["tokens"] == \
        pipe.encode("Hi", add_bos=False)
    chat = [{"role": "user", "content": "Weather?"}]
    r = http.post("/tokenize", json={"messages": chat, "tools": TOOLS}).json()
    assert r["tokens"] == pipe.encode_chat(chat, tools=TOOLS)
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == pipe.decode(r["tokens"])
    assert_error(http.post("/tokenize", json={}), 400, param="prompt")
    assert_error(http.post("/tokenize", json={"prompt": "x", "model": "nope"}), 404, code="model_not_found")
    assert_error(http.post("/detokenize", json={"tokens": [10**7]}), 400, param="tokens")


def test_raw_sse_framing(http):
    with http.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 20, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_draft_streaming_through_the_openai_client(client):
    msgs = [{"role": "user", "content": "Draw"}]
    kw = dict(model=NAME, messages=msgs, seed=6, max_tokens=32, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    stream = client.chat.completions.create(stream=True, **{**kw, "extra_body": {"ignore_eos": True,
                                                                                 "stream_drafts": True}})
    drafts, commits, text = [], [], ""
    for chunk in stream:  # the client parses draft chunks as ordinary ones: an empty delta plus `dgemma`
        ev = (chunk.model_extra or {}).get("dgemma")
        if ev and ev["type"] == "draft":
            assert chunk.choices[0].delta.content is None
            drafts.append(ev)
        elif ev and ev["type"] == "commit":
            commits.append(ev)
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert text == full.choices[0].message.content
    assert [(d["canvas_index"], d["step"]) for d in drafts] == [(c, s) for c in range(2) for s in range(1, STEPS + 1)]
    for d in drafts:
        assert len(d["canvas"]) == len(d["accepted"]) == len(d["pieces"]) == CANVAS
        assert d["accepted_count"] == sum(d["accepted"]) >= 1 and d["mean_entropy"] >= 0
        assert len(d["entropies"]) == CANVAS and min(d["entropies"]) >= 0  # each position's, the mean their mean
        assert sum(d["entropies"]) / CANVAS == pytest.approx(d["mean_entropy"], abs=1e-3)
        assert isinstance(d["text"], str)
    assert [c["canvas_index"] for c in commits] == [0, 1] and all(c["steps"] == STEPS for c in commits)
    last = {d["canvas_index"]: d["canvas"] for d in drafts}  # the committed canvas is the last step's draft
    assert [t for c in commits for t in c["tokens"]] == last[0] + last[1]


# ---------------------------------------------------------------- options
def test_seeds_and_n(client):
    a = complete(client, seed=11, ignore_eos=True).choices[0].text
    assert complete(client, seed=11, ignore_eos=True).choices[0].text == a
    assert complete(client, seed=12, ignore_eos=True).choices[0].text != a
    r = complete(client, seed=11, n=3, ignore_eos=True)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for i, c in enumerate(r.choices):  # choice i runs with seed + i
        assert c.text == complete(client, seed=11 + i, ignore_eos=True).choices[0].text
    assert r.usage.completion_tokens == 3 * 24
    assert r.model_extra["dgemma"]["seed"] == 11
    per = r.model_extra["dgemma"]["choices"]
    assert [len(c["final_mean_entropy_per_canvas"]) for c in per] == [len(c["steps_per_canvas"]) for c in per]


def test_stop_strings(client):
    full = complete(client, "Stop here", seed=8, max_tokens=48, ignore_eos=True).choices[0].text
    k = next(i for i in range(6, len(full) - 2) if full[i].isprintable() and full[i] != "\ufffd")
    stop = full[k:k + 2]
    want = full[:full.find(stop)]
    r = complete(client, "Stop here", seed=8, max_tokens=48, ignore_eos=True, stop=[stop, "never-appears"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in complete(client, "Stop here", seed=8, max_tokens=48,
                                                            ignore_eos=True, stop=stop, stream=True))
    assert streamed == want


def test_diffusion_options_change_the_run(client):
    r = complete(client, seed=3, ignore_eos=True, steps=2, entropy_bound=0.5, t_min=0.3, t_max=0.9,
                 stability_threshold=0, confidence_threshold=0.0)
    assert r.usage.model_extra["steps_per_canvas"] == 2
    # restarts: a canvas that never stops early (confidence 1e-9 is out of reach) runs 1 + 2 attempts
    r = complete(client, seed=3, ignore_eos=True, steps=2, confidence_threshold=1e-9, restarts=2)
    assert r.usage.model_extra["steps_per_canvas"] == 6
    assert set(r.model_extra["dgemma"]["choices"][0]["restarts_per_canvas"]) == {2}
    # temperature is accepted and ignored by diffusion (its schedule is fixed, as in vLLM)
    plain = complete(client, seed=3, ignore_eos=True)
    assert complete(client, seed=3, ignore_eos=True, temperature=1.7).choices[0].text == plain.choices[0].text
    # top_p / top_k / min_p cut each step's distribution (vLLM's diffusion sampler); a cut to the likeliest token
    # leaves no entropy, so every canvas ends fully confident
    for cut in ({"top_p": 0.0}, {"extra_body": {"top_k": 1}}, {"extra_body": {"min_p": 1.0}}):
        r = complete(client, seed=3, ignore_eos=True, **cut)
        assert r.choices[0].text != plain.choices[0].text
        assert set(r.model_extra["dgemma"]["choices"][0]["final_mean_entropy_per_canvas"]) == {0.0}


def test_autoregressive_mode(client, pipe):
    r = complete(client, "Hello", seed=1, max_tokens=12, ar=True, temperature=0, ignore_eos=True)
    ref = pipe.generate(["Hello"], ar=True, seed=1, max_new_tokens=12, ar_temperature=0.0, ignore_eos=True)[0]
    assert r.choices[0].text == ref.text
    u = r.usage.model_extra
    assert u["steps_per_canvas"] is None and u["canvases"] == 0 and u["forward_passes"] == 12
    chunks = [c for c in complete(client, "Hello", seed=1, max_tokens=12, ar=True, temperature=0, ignore_eos=True,
                                  stream=True) if c.choices and c.choices[0].text]
    assert len(chunks) > 1 and "".join(c.choices[0].text for c in chunks) == ref.text
    # temperature > 0 samples, seeded
    s1 = complete(client, "Hello", seed=1, max_tokens=12, ar=True, temperature=1.5, ignore_eos=True)
    s2 = complete(client, "Hello", seed=1, max_tokens=12, ar=True, temperature=1.5, ignore_eos=True)
    assert s1.choices[0].text == s2.choices[0].text


def test_suffix_fills_the_middle(client, pipe):
    suffix = "END!"
    sids = pipe.tokenizer.encode(suffix)
    stream = complete(client, "Begin:", suffix=suffix, seed=4, max_tokens=64, stream=True, stream_drafts=True)
    drafts, text = [], ""
    for c in stream:
        ev = (c.model_extra or {}).get("dgemma")
        if ev and ev["type"] == "draft":
            drafts.append(ev)
        text += c.choices[0].text if c.choices else ""
    assert drafts and {d["canvas_index"] for d in drafts} == {0}  # one canvas only
    for d in drafts:  # the suffix is pinned at the END of the canvas on every step
        assert d["canvas"][-len(sids):] == sids and d["fixed"] == len(sids)
        assert all(d["accepted"][-len(sids):])
    middle = drafts[-1]["canvas"][:CANVAS - len(sids)]
    eos = [i for i, t in enumerate(middle) if t in pipe.tokenizer.eos_ids]
    middle = middle[:eos[0]] if eos else middle
    r = complete(client, "Begin:", suffix=suffix, seed=4, max_tokens=64)
    assert r.choices[0].text == text == pipe.decode(middle)  # the suffix is trimmed off
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == len(middle)
    short = complete(client, "Begin:", suffix=suffix, seed=4, max_tokens=3)
    assert short.choices[0].text == pipe.decode(middle[:3]) and short.choices[0].finish_reason == "length"


def test_long_suffix_keeps_its_first_quarter_canvas(client, pipe):
    suffix = "0123456789" * 20  # far longer than the canvas: only its first CANVAS // 4 tokens are pinned
    stream = complete(client, "Begin:", suffix=suffix, seed=1, max_tokens=8, stream=True, stream_drafts=True)
    drafts = [ev for c in stream if (ev := (c.model_extra or {}).get("dgemma")) and ev["type"] == "draft"]
    assert drafts and all(d["fixed"] == CANVAS // 4 for d in drafts)
    assert drafts[0]["canvas"][-(CANVAS // 4):] == pipe.tokenizer.encode(suffix)[:CANVAS // 4]


# ---------------------------------------------------------------- batching
def test_concurrent_streams_and_batch_invariance(client, http):
    alone = complete(client, "Batch me", seed=7, max_tokens=48, ignore_eos=True).choices[0].text
    steps0 = http.get("/health").json()["engine_steps"]

    def one(seed):
        chunks = complete(client, "Batch me" if seed == 7 else f"Other prompt {seed}", seed=seed, max_tokens=48,
                          ignore_eos=True, stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    seeds = [1, 2, 7, 3, 4, 5]  # 6 streams on 4 engine rows: two wait in the queue
    with ThreadPoolExecutor(len(seeds)) as pool:
        texts = dict(zip(seeds, pool.map(one, seeds)))
    assert texts[7] == alone  # same text alone and in a batch of strangers
    assert len(set(texts.values())) == len(seeds)
    steps = http.get("/health").json()["engine_steps"] - steps0
    assert steps < len(seeds) * 3 * STEPS * 0.75  # rows shared forwards (alone each needs 3 canvases x STEPS)


# ---------------------------------------------------------------- limits, auth, cancellation
def test_api_key(busy_server):
    url = busy_server.url
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert_error(httpx.get(url + "/v1/models"), 401, code="invalid_api_key")
    assert_error(httpx.post(url + "/v1/completions", json={"prompt": "x"}), 401)
    assert_error(httpx.get(url + "/metrics"), 401)
    ok = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
    assert ok.models.list().data[0].id == NAME
    assert httpx.get(url + "/health").status_code == 200  # health and the page stay open
    assert httpx.get(url + "/").status_code == 200
    # Anthropic's clients send the key as x-api-key, and read their own error shape on /v1/messages.
    assert httpx.get(url + "/v1/models", headers={"x-api-key": "sekret"}).status_code == 200
    bad = httpx.post(url + "/v1/messages", headers={"x-api-key": "wrong"},
                     json={"model": NAME, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]})
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"


def test_cors_is_off_by_default(http, busy_server):
    r = http.get("/v1/models", headers={"Origin": "http://example.test"})
    assert "access-control-allow-origin" not in r.headers
    pre = httpx.options(busy_server.url + "/v1/completions", headers={
        "Origin": "http://example.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://example.test"


def _active(url):
    return httpx.get(url + "/health").json()["active_rows"]


def _metric(url, line_start, key="sekret"):
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"}).text
    found = [ln for ln in text.splitlines() if ln.startswith(line_start)]
    return float(found[0].rsplit(" ", 1)[1]) if found else 0.0


def test_queue_full_429_and_stream_disconnect_cancels(busy_server):
    url, auth = busy_server.url, {"Authorization": "Bearer sekret"}
    long = {"prompt": "long", "max_tokens": 1000, "steps": 8, "ignore_eos": True, "stream": True}
    cancelled0 = _metric(url, f'dgemma_rows_total{{outcome="cancelled",model="{NAME}"}}')
    with httpx.Client(base_url=url, headers=auth, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=long) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # keep a reference: a collected iterator closes the response
            next(lines)  # running now: the one engine row is taken and the queue holds 0
            busy = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 4})
            err = assert_error(busy, 429, code="queue_full")
            assert busy.headers["retry-after"] == "1" and err["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0).completions.create(
                    model=NAME, prompt="x", max_tokens=4)
        # leaving the block closed the connection mid-stream: the row must be cancelled, not run to the end
    assert wait_until(lambda: _active(url) == 0, timeout=5)
    assert _metric(url, f'dgemma_rows_total{{outcome="cancelled",model="{NAME}"}}') == cancelled0 + 1
    assert _metric(url, 'dgemma_rejected_total{reason="queue_full"}') >= 2
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, headers=auth)
    assert r.status_code == 200  # the row was freed


def test_non_streaming_disconnect_cancels_running_and_queued_rows(server):
    body = {"prompt": "long", "max_tokens": 512, "steps": 16, "ignore_eos": True}  # ~10 s of work each

    def gone(n):  # n=2 on 4 engine rows: 2 + 2 + 2 rows = 4 running, 2 queued
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json={**body, "n": n}, timeout=httpx.Timeout(60, read=1.0))

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(gone, [2, 2, 2]))
    assert wait_until(lambda: httpx.get(server.url + "/health").json()["queued_rows"] == 0, timeout=4)
    assert wait_until(lambda: _active(server.url) == 0, timeout=4)


def test_an_engine_fault_fails_its_rows_and_the_server_recovers(server, client):
    engine = server.app.state.dgemma.worker.engine
    real = engine.step

    def broken():
        engine.step = real  # fail once
        raise RuntimeError("simulated device error")

    engine.step = broken
    with pytest.raises(openai.InternalServerError, match="simulated device error"):
        complete(client, max_tokens=4)
    engine.step = broken
    with pytest.raises(openai.APIError, match="simulated device error"):
        for _ in complete(client, max_tokens=4, stream=True):
            pass
    assert engine.step == real and _active(server.url) == 0
    assert complete(client, max_tokens=4, ignore_eos=True).choices[0].finish_reason == "length"


def test_worker_cancels_each_job_once(pipe):
    from dgemma.serve.engine import Cancelled, Done, Job, QueueFull, Worker

    worker = Worker(pipe.engine(max_rows=1, max_len=256), max_queue=1)
    worker.start()
    seen: dict[int, list] = {0: [], 1: []}
    got = threading.Event()

    def sink(job, events):
        seen[job.tag].extend(events)
        if any(isinstance(e, (Done, Cancelled)) for e in seen[0]) and \
                any(isinstance(e, (Done, Cancelled)) for e in seen[1]):
            got.set()

    params = pipe.params(max_new_tokens=256, ignore_eos=True, seed=0)
    jobs = [Job(pipe.encode("x"), params, sink, tag=i) for i in range(2)]
    try:
        worker.submit(jobs)  # one runs, one waits
        with pytest.raises(QueueFull):
            worker.submit([Job(pipe.encode("y"), params, sink, tag=9)])
        for _ in range(3):
            worker.cancel(jobs)  # again and again: running and waiting jobs alike
        assert got.wait(10) and worker.alive
        assert all(sum(isinstance(e, Cancelled) for e in seen[i]) == 1 for i in (0, 1))
        assert worker.load() == (0, 0) and len(worker.engine.free) == 1
    finally:
        worker.stop()


def test_an_engine_fault_fails_the_row_that_causes_it_alone(pipe):
    """A step that raises whenever one poisoned prompt is among its rows: the rows batched with it by chance start
    again one at a time and finish with the tokens they get alone; the poisoned row fails alone. A row that had
    already sent text when the fault came fails too (its client has part of an answer)."""
    from dgemma.serve.engine import Commit, Done, Failed, Job, Worker

    engine = pipe.engine(max_rows=4, max_len=512)
    poison = pipe.encode("POISON")
    real = engine.step

    def step():
        if any(r.prompt == poison for r in engine.rows.values()):
            raise RuntimeError("simulated fault")
        return real()

    engine.step = step
    worker = Worker(engine, max_queue=8)
    seen: dict[str, list] = {}
    ended = threading.Event()

    def sink(job, events):
        seen.setdefault(job.tag, []).extend(events)
        if sum(isinstance(e, (Done, Failed)) for evs in seen.values() for e in evs) == len(jobs):
            ended.set()

    def params(seed, n=24):
        return pipe.params(max_new_tokens=n, ignore_eos=True, seed=seed)

    alone = {seed: pipe.generate([pipe.encode(f"row {seed}")], **dict(max_new_tokens=24, ignore_eos=True,
                                                                       seed=seed))[0].tokens for seed in (1, 2)}
    jobs = [Job(pipe.encode("row 1"), params(1), sink, tag="a"), Job(poison, params(3), sink, tag="p"),
            Job(pipe.encode("row 2"), params(2), sink, tag="b")]
    worker.start()
    try:
        worker.submit(jobs)  # admitted together: one step holds all three
        assert ended.wait(60)
        for tag, seed in (("a", 1), ("b", 2)):
            done = seen[tag][-1]
            assert isinstance(done, Done) and done.tokens == alone[seed], tag
        assert isinstance(seen["p"][-1], Failed) and seen["p"][-1].status == 500
        assert "simulated fault" in seen["p"][-1].message
        assert all(j.retried for j in jobs) and worker.load() == (0, 0)

        # a row that has sent a canvas when the poison joins fails with it; later rows run as usual
        seen.clear()
        ended.clear()
        long = Job(pipe.encode("row 1"), params(1, n=20 * pipe.model.cfg.canvas_length), sink, tag="long")
        jobs = [long]
        worker.submit(jobs)
        deadline = time.time() + 30
        while not any(isinstance(e, Commit) for e in seen.get("long", [])) and time.time() < deadline:
            time.sleep(0.01)
        jobs = [long, Job(poison, params(3), sink, tag="p")]
        worker.submit(jobs[1:])
        assert ended.wait(60)
        assert isinstance(seen["long"][-1], Failed) and isinstance(seen["p"][-1], Failed)
        assert not long.retried and long.commits >= 1
        seen.clear()
        ended.clear()
        jobs = [Job(pipe.encode("row 2"), params(2), sink, tag="b")]
        worker.submit(jobs)
        assert ended.wait(60) and seen["b"][-1].tokens == alone[2]
    finally:
        worker.stop()


@pytest.mark.parametrize("policy", [False, True])
def test_priority_scheduling(pipe, policy):
    """vLLM's --scheduling-policy priority: waiting rows are admitted lowest `priority` first, in arrival order
    among equals (fcfs: arrival order alone); a row that has sent text is never preempted."""
    from dgemma.serve.engine import Done, Job, Worker

    worker = Worker(pipe.engine(max_rows=1, max_len=256), max_queue=8, priority=policy)
    order: list[str] = []
    finished = threading.Event()

    def sink(job, events):
        if any(isinstance(e, Done) for e in events):
            order.append(job.tag)
            if len(order) == 5:
                finished.set()

    params = pipe.params(max_new_tokens=8, ignore_eos=True, seed=0)
    jobs = [Job(pipe.encode("x"), params, sink, tag=t, priority=p)
            for t, p in (("a", -10), ("b", 5), ("c", -1), ("d", 5), ("e", 0))]
    worker.start()
    try:
        worker.submit(jobs)  # one engine row: "a" (first either way) runs, the rest wait
        assert finished.wait(30)
        assert order == (["a", "c", "e", "b", "d"] if policy else ["a", "b", "c", "d", "e"])
    finally:
        worker.stop()


@pytest.mark.parametrize("kind", ["priority", "background"])
def test_preemption(pipe, kind):
    """A job ranked first (a lower priority; a client's row before a batch's) takes the row of a running job that
    has sent no text yet, which waits again and then starts over with its seed (the same tokens as alone)."""
    from dgemma.serve.engine import Done, Draft, Job, Worker

    worker = Worker(pipe.engine(max_rows=1, max_len=256, drafts=True), max_queue=8, priority=kind == "priority")
    order, drafted, finished, done = [], threading.Event(), threading.Event(), {}

    def sink(job, events):
        if any(isinstance(e, Draft) for e in events):
            drafted.set()
        for e in events:
            if isinstance(e, Done):
                order.append(job.tag)
                done[job.tag] = e.tokens
                if len(order) == 2:
                    finished.set()

    slow = pipe.params(max_new_tokens=16, ignore_eos=True, seed=3, steps=60, stability=60)  # no early stop
    quick = pipe.params(max_new_tokens=8, ignore_eos=True, seed=0)
    low = Job(pipe.encode("low"), slow, sink, tag="low", drafts=True,
              priority=5 if kind == "priority" else 0, background=kind == "background")
    high = Job(pipe.encode("high"), quick, sink, tag="high")
    worker.start()
    try:
        worker.submit([low])
        assert drafted.wait(30)  # running, no text sent
        worker.submit([high])
        assert finished.wait(120)
        assert order == ["high", "low"] and low.preempted == 1 and high.preempted == 0
        assert worker.metrics.preemptions.values == {(): 1}
    finally:
        worker.stop()
    assert done["low"] == [ev for ev in pipe.engine(max_rows=1, max_len=256).run([pipe.encode("low")], slow)
                           if isinstance(ev, Done)][0].tokens
    # a row that has sent text finishes first; so does one of equal rank
    from dgemma.serve.engine import Commit

    committed = threading.Event()

    def sink2(job, events):
        if any(isinstance(e, Commit) for e in events):
            committed.set()
        sink(job, events)

    for first, wait in ((Job(pipe.encode("a"), slow.replace(max_new_tokens=32), sink2, tag="a", priority=5),
                         committed), (Job(pipe.encode("a"), slow, sink2, tag="a"), drafted)):
        worker = Worker(pipe.engine(max_rows=1, max_len=256, drafts=True), max_queue=8, priority=True)
        order.clear()
        finished.clear()
        committed.clear()
        drafted.clear()
        first.drafts = True
        worker.start()
        try:
            worker.submit([first])
            assert wait.wait(60)
            worker.submit([Job(pipe.encode("b"), quick, sink2, tag="b")])
            assert finished.wait(120) and order == ["a", "b"] and worker.metrics.preemptions.values == {(): 0}
        finally:
            worker.stop()


def test_priority_needs_the_policy(http):
    with pytest.raises(ValueError, match="scheduling-policy"):
        ServerSettings(scheduling_policy="lifo")
    r = http.post("/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2, "priority": 3})
    assert_error(r, 400, param="priority")
    assert "--scheduling-policy priority" in r.json()["error"]["message"]
    assert http.post("/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2, "priority": 0}
                     ).status_code == 200


# ---------------------------------------------------------------- errors: status and OpenAI's shape
BAD_REQUESTS = [
    # (path, body, status, code, param)
    ("/v1/completions", b"{not json", 400, "invalid_json", None),
    ("/v1/completions", b"[1, 2]", 400, "invalid_json", None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model_not_found", "model"),
    ("/v1/completions", {}, 400, "missing_required_parameter", "prompt"),
    ("/v1/completions", {"prompt": "x", "bogus": 1}, 400, "unrecognized_argument", "bogus"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100000}, 400, "max_tokens_exceeded", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": 9}, 400, "invalid_value", "temperature"),
    ("/v1/completions", {"prompt": "x", "steps": 0}, 400, "invalid_value", "steps"),
    ("/v1/completions", {"prompt": "x", "steps": "many"}, 400, "invalid_value", "steps"),
    ("/v1/completions", {"prompt": "x", "t_min": 0.9, "t_max": 0.5}, 400, "invalid_value", None),
    ("/v1/completions", {"prompt": "x", "seed": -1}, 400, "invalid_value", "seed"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "invalid_value", "n"),
    ("/v1/completions", {"prompt": "x", "n": 100}, 400, "invalid_value", "n"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "invalid_value", "stop"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "invalid_value", "stop"),
    ("/v1/completions", {"prompt": 5}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {"prompt": [5, 99999]}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {"prompt": "x" * 2000}, 400, "context_length_exceeded", "prompt"),
    ("/v1/completions", {"prompt": "x" * 900, "max_tokens": 300}, 400, "context_length_exceeded", "prompt"),
    ("/v1/completions", {"prompt": "x", "suffix": "y", "ar": True}, 400, "invalid_value", "suffix"),
    ("/v1/completions", {"prompt": "x", "ar": True, "stream_drafts": True}, 400, "invalid_value", "stream_drafts"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, None, "stream_options"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2, "echo": True, "stream": True}, 400, "unsupported_parameter",
     "stream"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "invalid_value", "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400,
     "invalid_value", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "invalid_value", "logprobs"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "unsupported_parameter", "best_of"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"a": 1}}, 400, "invalid_value", "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, 400, "invalid_value", "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 200}}, 400, "invalid_value", "logit_bias"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400, "invalid_value", "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": -2.5}, 400, "invalid_value", "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": "x"}, 400, "invalid_value", "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": -1}, 400, "invalid_value", "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "min_tokens": -1}, 400, "invalid_value", "min_tokens"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": ["a"]}, 400, "invalid_value", "stop_token_ids.0"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": [1.5]}, 400, "invalid_value", "allowed_token_ids.0"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": [99999]}, 400, "invalid_value", "allowed_token_ids"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": [1], "min_tokens": 2}, 400, "invalid_value",
     "allowed_token_ids"),
    ("/v1/completions", {"prompt": "x", "truncate_prompt_tokens": -2}, 400, "invalid_value",
     "truncate_prompt_tokens"),
    ("/v1/completions", {"prompt": "x", "priority": "high"}, 400, "invalid_value", "priority"),
    ("/v1/completions", {"prompt": "x", "use_beam_search": True}, 400, "unrecognized_argument", "use_beam_search"),
    ("/v1/completions", {"prompt": "x", "bad_words": [" "]}, 400, "invalid_value", "bad_words"),
    ("/v1/completions", {"prompt": "x", "bad_words": "x"}, 400, "invalid_value", "bad_words"),
    ("/v1/completions", {"prompt": "x", "skip_special_tokens": "maybe"}, 400, "invalid_value", "skip_special_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True},
     400, "invalid_value", "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "invalid_value", "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "invalid_value", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_value", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "unsupported_parameter",
     "messages.0.content.0"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, 400,
     "invalid_value", "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema"}}, 400, "invalid_value", "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "xml"}}, 400, "invalid_value", "response_format"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "(("}}, 400, "invalid_value",
     "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {}}, 400, "invalid_value", "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["b"]}}, 400,
     "invalid_value", "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"choice": []}}, 400, "invalid_value",
     "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"grammar": "start: undefined_rule"}}, 400,
     "invalid_value", "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"xml": "a"}}, 400, None, None),
    ("/v1/completions", {"prompt": "x", "guided_regex": "a", "guided_choice": ["b"]}, 400, None, None),
    ("/v1/completions", {"prompt": "x", "guided_regex": "a", "response_format": {"type": "json_object"}}, 400, None,
     None),
    ("/v1/completions", {"prompt": "x", "guided_regex": "(("}, 400, "invalid_value", "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "a"}, "response_format": {
        "type": "json_object"}}, 400, "invalid_value", "response_format"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "json_object"}, "ignore_eos": True}, 400,
     "invalid_value", "response_format"),
    ("/v1/completions", {"prompt": "x", "suffix": "y", "structured_outputs": {"regex": "a"}}, 400,
     "unsupported_parameter", "structured_outputs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "invalid_value", "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 21}, 400, "invalid_value", "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "bad name"}}]}, 400, "invalid_value", "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search"}]},
     400, "invalid_value", "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": 5}}}]}, 400,
     "invalid_value", "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function",
        "function": {"name": "f", "parameters": {"properties": {"a": {"type": 7}}}}}]}, 400, "invalid_value", "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}, 400,
     "invalid_value", "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "rm"}}}, 400, "invalid_value", "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                              "tool_choice": "always"}, 400, "invalid_value", "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                              "response_format": {"type": "json_object"}}, 400, "invalid_value", "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                              "tool_choice": "required", "ignore_eos": True}, 400, "invalid_value", "ignore_eos"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]}, 400,
     "unsupported_parameter", "functions"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}, {
        "role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
            "name": "f", "arguments": "{oops"}}]}]}, 400, "invalid_value", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 9999},
     400, "max_tokens_exceeded", "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "chat_template_kwargs": {"evil": 1}}, 400, "invalid_value", "chat_template_kwargs"),
]


@pytest.mark.parametrize("path,body,status,code,param", BAD_REQUESTS,
                         ids=[f"{i}-{b if isinstance(b, bytes) else sorted(b)}"[:60] for i, (_, b, *_) in
                              enumerate(BAD_REQUESTS)])
def test_bad_requests_get_openai_errors(http, path, body, status, code, param):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert_error(r, status, code=code, param=param)


def test_oversized_body_unknown_routes_and_methods(http):
    assert_error(http.post("/v1/completions", json={"prompt": "x" * 70_000}), 413, code="body_too_large")
    chunked = http.post("/v1/completions", content=iter([b'{"prompt": "', b"x" * 70_000, b'"}']),
                        headers={"content-type": "application/json"})  # no Content-Length: counted while reading
    assert_error(chunked, 413, code="body_too_large")
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get("/v1/completions"), 405)


def test_openai_client_raises_clean_errors(client):
    with pytest.raises(openai.BadRequestError, match="invalid json schema"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "x", "schema": {"type": "nonsense"}}})
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, "x" * 2000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")


# ---------------------------------------------------------------- prefix caching
def test_prefix_cache_usage_and_metrics(ckpt, client, pipe):
    """`--prefix-cache`: a chat's next turn reuses the keys its first turn left (usage's cached_tokens, the
    Messages API's cache_read_input_tokens, the metric); without it nothing is cached, and the n choices of one
    prompt share its encoding without counting as cached."""
    first = [{"role": "system", "content": "You answer in one short line of Python. " * 3},
             {"role": "user", "content": "Add two numbers."}]
    ask = dict(model=NAME, max_tokens=CANVAS, seed=1)
    plain = [client.chat.completions.create(messages=first, **ask) for _ in range(2)]
    assert [r.usage.prompt_tokens_details.cached_tokens for r in plain] == [0, 0]
    assert client.chat.completions.create(messages=first, n=2, **ask).usage.prompt_tokens_details.cached_tokens == 0
    settings = ServerSettings(model_name=NAME, max_concurrency=1, prefix_cache=True)
    with ServerThread(create_app(Pipeline.load(str(ckpt), device="cpu", quiet=True), settings)) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r1 = c.chat.completions.create(messages=first, **ask)
        assert r1.usage.prompt_tokens_details.cached_tokens == 0
        second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                          {"role": "user", "content": "Now three."}]
        r2 = c.chat.completions.create(messages=second, **ask)
        # everything before the first turn's generation prompt (which ends in the empty thought channel)
        prompt1, prompt2 = pipe.encode_chat(first), pipe.encode_chat(second)
        shared = next(i for i, (a, b) in enumerate(zip(prompt1, prompt2)) if a != b)
        assert r2.usage.prompt_tokens_details.cached_tokens == shared and shared > 20
        assert r2.usage.prompt_tokens == len(prompt2)
        with httpx.Client(base_url=s.url, timeout=60) as h:
            # the same conversation again, through the Messages API: all of it is in the cache (a diffusion
            # row needs nothing from the prefill but the keys)
            body = {"model": NAME, "max_tokens": 8, "system": first[0]["content"], "messages": second[1:]}
            u = h.post("/v1/messages", json=body).json()["usage"]
            assert u["cache_read_input_tokens"] == len(prompt2) and u["input_tokens"] == 0
            metric = re.search(r"^dgemma_prompt_tokens_cached_total (\S+)$", h.get("/metrics").text, re.M)
            assert float(metric.group(1)) == shared + u["cache_read_input_tokens"]
            # max_tokens 0 on a prompt the cache holds whole: no forward at all, an empty answer (not a 500)
            for _ in range(2):
                r = h.post("/v1/completions", json={"model": NAME, "prompt": "Hello", "max_tokens": 0})
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == "", r.text
            # vLLM's /reset_prefix_cache: the same request then encodes its whole prompt again
            assert h.post("/reset_prefix_cache").json() == {"reset": True, "slots": 1}
            again = c.chat.completions.create(messages=second, **ask)
            assert again.usage.prompt_tokens_details.cached_tokens == 0
            # vLLM's cache_salt: another salt (or none) never reads a salted request's keys, the same salt does
            salted = [c.chat.completions.create(messages=second, extra_body={"cache_salt": salt}, **ask)
                      for salt in ("s1", "s2", "s1")]
            assert [r.usage.prompt_tokens_details.cached_tokens for r in salted] == [0, 0, 0]  # s2 came between
            r = c.chat.completions.create(messages=second, extra_body={"cache_salt": "s1"}, **ask)
            assert r.usage.prompt_tokens_details.cached_tokens == len(prompt2)
            assert c.chat.completions.create(messages=second, **ask).usage.prompt_tokens_details.cached_tokens == 0
            assert_error(h.post("/v1/completions", json={"prompt": "x", "cache_salt": ""}), 400)


def test_chunked_prefill_setting(ckpt, pipe):
    """--prefill-chunk reaches the engine: a long prompt's answer is the engine's with that chunk size (one encoder
    pass per chunk, then one per committed canvas); a bad size is refused at start-up."""
    from dgemma.generate import Done

    prompt = "Hello there, " * 8
    settings = ServerSettings(model_name=NAME, max_concurrency=2, prefill_chunk=16)
    with ServerThread(create_app(Pipeline.load(str(ckpt), device="cpu", quiet=True), settings)) as s:
        r = httpx.post(s.url + "/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 8, "seed": 1},
                       timeout=60).json()
    ids = pipe.encode(prompt)
    engine = pipe.engine(max_rows=1, prefill_chunk=16)
    [done] = [ev for ev in engine.run([ids], pipe.params(max_new_tokens=8, seed=1)) if isinstance(ev, Done)]
    assert r["choices"][0]["text"] == done.text and done.stats["encoder_passes"] == -(-len(ids) // 16)
    with pytest.raises(ValueError, match="prefill-chunk"):
        ServerSettings(prefill_chunk=0)


def test_ar_sampling_cut(client):
    """With ar: true the server samples with top_k / top_p / min_p (vLLM's); a cut to the likeliest token is greedy."""
    greedy = complete(client, "Hello", ar=True, temperature=0, max_tokens=12, ignore_eos=True).choices[0].text
    for cut in ({"top_p": 0.0}, {"extra_body": {"top_k": 1}}, {"extra_body": {"min_p": 1.0}}):
        r = complete(client, "Hello", ar=True, temperature=1.5, seed=4, max_tokens=12, ignore_eos=True, **cut)
        assert r.choices[0].text == greedy
    with pytest.raises(openai.BadRequestError):
        complete(client, "Hello", ar=True, extra_body={"top_k": -2})



def test_load_adaptive_steps(ckpt):
    """--adaptive-steps 1:1: the n = 4 rows of one request share the step budget of one (4 steps -> 1 per canvas);
    a lone request keeps the model's steps, and a request that names its steps keeps them under load."""
    settings = ServerSettings(model_name=NAME, max_concurrency=4, adaptive_steps=(1, 1))
    with ServerThread(create_app(Pipeline.load(str(ckpt), device="cpu", quiet=True), settings)) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert complete(c, seed=1, ignore_eos=True).usage.model_extra["steps_per_canvas"] == STEPS
        assert complete(c, seed=1, ignore_eos=True, n=4).usage.model_extra["steps_per_canvas"] == 1
        assert complete(c, seed=1, ignore_eos=True, n=4, steps=STEPS).usage.model_extra["steps_per_canvas"] == STEPS
    with pytest.raises(ValueError, match="adaptive-steps"):
        ServerSettings(adaptive_steps=(0, 4))
    from dgemma.cli import UsageError, _adaptive_steps

    assert _adaptive_steps("3") == (3, 4) and _adaptive_steps("2:6") == (2, 6) and _adaptive_steps(None) is None
    for bad in ("0", "4:x", "-1:2", "2:0"):
        with pytest.raises(UsageError, match=r"--adaptive-steps takes ROWS\[:MIN_STEPS\]"):
            _adaptive_steps(bad)
    p = subprocess.run([sys.executable, "-m", "dgemma.cli", "serve", "--adaptive-steps=4:x"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--adaptive-steps takes ROWS[:MIN_STEPS]" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


# ---------------------------------------------------------------- multi-LoRA
def test_lora_modules(ckpt, tmp_path):
    """`--lora NAME=PATH`: each adapter is a model of its own in /v1/models and in requests; rows of different
    adapters run in one batch and each gets what the pipeline gives with that adapter."""
    from test_adapters import make_adapter

    from dgemma.adapters import attach_adapters

    ref = Pipeline.load(str(ckpt), device="cpu", quiet=True)
    paths = [str(make_adapter(ref.model, tmp_path / name, targets, i))
             for i, (name, targets) in enumerate((("sql", ("all",)), ("poet", ("q_proj", "experts"))))]
    settings = ServerSettings(model_name=NAME, max_concurrency=4, lora_modules=(("sql", paths[0]), ("poet", paths[1])))
    with ServerThread(create_app(Pipeline.load(str(ckpt), device="cpu", quiet=True), settings)) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        cards = c.models.list().data
        assert [m.id for m in cards] == [NAME, "sql", "poet"]
        assert cards[1].model_extra["parent"] == NAME and cards[1].model_extra["root"] == paths[0]
        assert c.models.retrieve("poet").id == "poet"
        attach_adapters(ref.model, paths)
        results = {}

        def ask(model):
            results[model] = c.completions.create(model=model, prompt="Hello", max_tokens=20, seed=3,
                                                  extra_body={"ignore_eos": True})

        threads = [threading.Thread(target=ask, args=(m,)) for m in (NAME, "sql", "poet")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, model in enumerate((NAME, "sql", "poet")):
            want = ref.generate(["Hello"], seed=3, max_new_tokens=20, ignore_eos=True, adapter=i)[0].text
            assert results[model].choices[0].text == want and results[model].model == model
        assert len({r.choices[0].text for r in results.values()}) == 3
        chat = c.chat.completions.create(model="poet", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
        assert chat.model == "poet"
        with pytest.raises(openai.NotFoundError) as e:
            c.completions.create(model="nope", prompt="x", max_tokens=4)
        assert "`sql`" in str(e.value) and e.value.status_code == 404
        # /metrics counts each served model's tokens and rows apart
        text = httpx.get(s.url + "/metrics").text
        for model, tokens in ((NAME, 20), ("sql", 20), ("poet", 20 + chat.usage.completion_tokens)):
            assert f'dgemma_generated_tokens_total{{mode="diffusion",model="{model}"}} {tokens}' in text
            assert f'dgemma_rows_total{{outcome="done",model="{model}"}}' in text


def test_runtime_lora_loading(ckpt, tmp_path, http):
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, behind --allow-runtime-lora: a loaded adapter is a
    model at once (the same text as one given with --lora), an unloaded one a 404, a busy one a 409."""
    from test_adapters import make_adapter

    ref = Pipeline.load(str(ckpt), device="cpu", quiet=True)
    path = str(make_adapter(ref.model, tmp_path / "late", ("all",), 5))
    bad = str(make_adapter(randomize(DiffusionGemma(tiny_config("b")), seed=1), tmp_path / "bad", ("q_proj",), 0))
    # off by default: a 403 that says how to turn it on
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
    assert r.status_code == 403 and "--allow-runtime-lora" in r.json()["error"]["message"]
    settings = ServerSettings(model_name=NAME, max_concurrency=2, allow_runtime_lora=True)
    with ServerThread(create_app(Pipeline.load(str(ckpt), device="cpu", quiet=True), settings)) as s, \
            httpx.Client(base_url=s.url, timeout=60) as h:
        ask = {"prompt": "Hello", "max_tokens": 20, "seed": 3, "ignore_eos": True}
        assert h.post("/v1/completions", json=dict(ask, model="late")).status_code == 404
        r = h.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": path})
        assert r.status_code == 200 and "added successfully" in r.text
        assert [m["id"] for m in h.get("/v1/models").json()["data"]] == [NAME, "late"]
        for body, status, param in (({"lora_name": "late", "lora_path": path}, 400, "lora_name"),
                                    ({"lora_name": NAME, "lora_path": path}, 400, "lora_name"),
                                    ({"lora_name": "other", "lora_path": bad}, 400, "lora_path"),
                                    ({"lora_name": "other", "lora_path": str(tmp_path)}, 400, "lora_path"),
                                    ({"lora_name": "other", "lora_path": "a" * 5000}, 400, "lora_path"),
                                    ({"lora_name": "other", "lora_path": "a\u0000b"}, 400, "lora_path"),
                                    ({"lora_name": "other"}, 400, "lora_path")):
            r = h.post("/v1/load_lora_adapter", json=body)
            assert r.status_code == status and r.json()["error"]["param"] == param, r.text
        got = h.post("/v1/completions", json=dict(ask, model="late")).json()["choices"][0]["text"]
        from dgemma.adapters import attach_adapters

        attach_adapters(ref.model, [path])
        assert got == ref.generate(["Hello"], seed=3, max_new_tokens=20, ignore_eos=True, adapter=1)[0].text
        # busy: a long request on the adapter holds it; the unload is refused and nothing is cut short
        with h.stream("POST", "/v1/completions", json=dict(ask, model="late", max_tokens=900, steps=48,
                                                           stream=True)) as stream:
            lines = stream.iter_lines()
            next(lines)
            r = h.post("/v1/unload_lora_adapter", json={"lora_name": "late"})
            assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_in_use"
            assert any(line.startswith("data: {") for _, line in zip(range(4), lines))  # still streaming
        # the client left, so its row is cancelled; then the adapter goes
        deadline = time.time() + 30
        while (r := h.post("/v1/unload_lora_adapter", json={"lora_name": "late"})).status_code == 409:
            assert time.time() < deadline
            time.sleep(0.05)
        assert r.status_code == 200 and "removed" in r.text
        assert h.post("/v1/completions", json=dict(ask, model="late")).status_code == 404
        assert h.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 404
        assert [m["id"] for m in h.get("/v1/models").json()["data"]] == [NAME]
        # the base is untouched, and a new load gets a new index (nothing cached under the old one applies)
        assert h.post("/v1/completions", json=ask).json()["choices"][0]["text"] == \
            ref.generate(["Hello"], seed=3, max_new_tokens=20, ignore_eos=True)[0].text
        assert h.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": path}).status_code == 200
        assert h.get("/v1/models/late").json()["dgemma"]["adapter"] == 2


def test_max_lora_rank(ckpt, tmp_path):
    """vLLM's --max-lora-rank: an adapter of a higher rank is refused at start-up (one line, before the model loads)
    and through /v1/load_lora_adapter (a 400 naming the flag); --max-loras is accepted and changes nothing."""
    from test_adapters import make_adapter

    base = Pipeline.load(str(ckpt), device="cpu", quiet=True)
    path = str(make_adapter(base.model, tmp_path / "r4", ("q_proj",), 1, rank=4))
    r = subprocess.run([sys.executable, "-m", "dgemma.cli", "serve", str(ckpt), "--port", str(free_port()),
                        "--enable-lora", "--lora-modules", f"x={path}", "--max-lora-rank", "2", "--max-loras", "4"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "rank 4, above this server's --max-lora-rank 2" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    settings = ServerSettings(model_name=NAME, max_concurrency=1, allow_runtime_lora=True, max_lora_rank=2)
    with ServerThread(create_app(base, settings)) as s:
        err = assert_error(httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path}),
                           400, param="lora_path")
        assert "--max-lora-rank 2" in err["message"]


# ---------------------------------------------------------------- health, metrics, page
def test_health_and_metrics(server, http):
    h = http.get("/health").json()
    assert h["status"] == "ok" and h["model"] == NAME and h["max_concurrency"] == 4
    assert http.get("/ping").json() == http.post("/ping").json() == h  # SageMaker's health check, vLLM's alias
    import dgemma
    assert http.get("/version").json() == {"version": dgemma.__version__}
    assert_error(http.post("/reset_prefix_cache"), 400)  # this server caches no prefixes
    http.post("/v1/completions", json={"prompt": "x", "max_tokens": 4})
    http.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "stream": True})  # a first token's time
    http.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for needle in ('dgemma_requests_total{endpoint="/v1/completions",status="200"}',
                   'dgemma_requests_total{endpoint="/v1/completions",status="400"}',
                   "dgemma_queue_depth 0", "dgemma_active_rows", 'dgemma_steps_per_canvas_bucket{le="4"}',
                   f'dgemma_generated_tokens_total{{mode="diffusion",model="{NAME}"}}', "dgemma_request_latency_seconds_bucket",
                   "dgemma_engine_step_seconds_count", "dgemma_time_to_first_token_seconds_count",
                   "process_resident_memory_bytes", "dgemma_peak_resident_memory_bytes"):
        assert needle in text, needle
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? -?[0-9.e+]+$')
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line


def test_web_page_is_served(http):
    page = http.get("/")
    assert page.status_code == 200 and 'id="grid"' in page.text and '"static/app.js"' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert http.get(asset).status_code == 200
    # every path the page asks for is relative, so it works under a proxy's prefix (--root-path)
    assert not re.search(r'(src|href)="/|fetch\("/|"/v1/', page.text + http.get("/static/app.js").text)


# ---------------------------------------------------------------- the CLI
def test_a_vllm_serve_command_line_runs_as_it_is(ckpt, tmp_path):
    """vLLM's options on `dgemma serve`: several served names (the first answers for all), a chat template file,
    --allowed-origins as JSON, uvicorn's options, HTTPS, and the options that change nothing here."""
    import shutil

    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}"
                        "{% if add_generation_prompt %}<<model>>{% endif %}")
    tls = []
    if shutil.which("openssl"):
        key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
        made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                               "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                               "subjectAltName=IP:127.0.0.1"], capture_output=True)
        if made.returncode == 0:
            tls = ["--ssl-keyfile", str(key), "--ssl-certfile", str(cert)]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dgemma.cli", "serve", "--model", str(ckpt), "--port", str(port),
                             "--device", "cpu", "--served-model-name", "gemma", "dg", "--chat-template", str(template),
                             "--allowed-origins", '["http://example.test"]', "--tensor-parallel-size", "1",
                             "--trust-remote-code", "--enable-auto-tool-choice", "--tool-call-parser", "gemma4",
                             "--reasoning-parser", "gemma4", "--enforce-eager", "--kv-cache-dtype", "auto",
                             "--gpu-memory-utilization", "0.9", "--disable-log-requests", "--disable-log-stats",
                             "--uvicorn-log-level", "warning", "--disable-uvicorn-access-log", "--root-path", "/dg",
                             "--enable-request-id-headers", "--limit-mm-per-prompt", '{"image": 0, "video": 0}',
                             "--override-generation-config", '{"max_denoising_steps": 3, "max_new_tokens": 5}', *tls],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        import ssl

        with httpx.Client(base_url=url, verify=ssl.create_default_context(cafile=str(cert)) if tls else True,
                          timeout=60) as h:
            def up():
                try:
                    return h.get("/health").status_code == 200
                except httpx.TransportError:
                    return False

            assert wait_until(up, timeout=60), proc.stdout.read() if proc.poll() is not None else "no answer"
            cards = h.get("/v1/models").json()["data"]
            assert [m["id"] for m in cards] == ["gemma", "dg"]
            assert (cards[0]["dgemma"]["steps"], cards[0]["dgemma"]["default_max_tokens"]) == (3, 5)
            r = h.post("/v1/chat/completions", json={"model": "dg", "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200 and r.json()["model"] == "gemma"  # vLLM's: the first name
            assert_error(h.post("/v1/completions", json={"model": "other", "prompt": "x"}), 404, "model_not_found")
            image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
            err = assert_error(h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
                {"type": "text", "text": "hi"}, image]}]}), 400, param="messages.0.content.1")
            assert "at most 0 image(s)" in err["message"] and "--limit-mm-per-prompt" in err["message"]
            ids = h.post("/tokenize", json={"model": "gemma", "messages": [{"role": "user", "content": "hi"}]})
            text = h.post("/detokenize", json={"tokens": ids.json()["tokens"]}).json()["prompt"]
            assert text.endswith("<<user>>hi<<model>>")
            assert h.get("/").status_code == 200  # a proxy strips --root-path; its requests come as these
            cors = h.get("/v1/models", headers={"Origin": "http://example.test"})
            assert cors.headers["access-control-allow-origin"] == "http://example.test"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=15)[0]
    assert "GET /v1/models" not in out  # --disable-uvicorn-access-log
    assert "--gpu-memory-utilization applies to CUDA devices" in out  # said, not silently dropped


@pytest.mark.parametrize("argv,message", [
    (["--tensor-parallel-size", "2"], "--tensor-parallel-size 2: dgemma serve runs the model on one device"),
    (["-pp", "2"], "--pipeline-parallel-size 2"),
    (["--tool-call-parser", "hermes"], "--tool-call-parser hermes: dgemma reads Gemma 4's format only"),
    (["--reasoning-parser", "deepseek_r1"], "--reasoning-parser deepseek_r1"),
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8: not supported"),
    (["--gpu-memory-utilization", "0"], "a fraction in (0, 1]"),
    (["--enforce-eager", "--compile"], "ask opposite things"),
    (["--chat-template", "no-such.jinja"], "no such file"),
    (["--chat-template", "{% if %}"], "does not parse"),
    (["--model-name", "a", "--served-model-name", "b"], "give one"),
    (["--served-model-name", "a", "a"], "distinct"),
    (["--lora-modules", '{"name": "x"}'], 'needs string "name" and "path"'),
    (["--ssl-keyfile", "k.pem"], "--ssl-keyfile and --ssl-certfile go together"),
    (["--model", "elsewhere"], "MODEL given twice"),
    (["--limit-mm-per-prompt", '{"video": 1}'], "dgemma takes no video input"),
    (["--limit-mm-per-prompt", "image=2"], "takes a JSON object of counts"),
    (["--limit-mm-per-prompt", '{"pointcloud": 1}'], "unknown modality pointcloud"),
])
def test_vllm_options_dgemma_cannot_honour_are_one_line_errors(ckpt, argv, message):
    r = subprocess.run([sys.executable, "-m", "dgemma.cli", "serve", str(ckpt), "--port", str(free_port()), *argv],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_gpu_memory_utilization_caps_the_cuda_allocator(monkeypatch, capsys):
    import torch

    from dgemma.cli import gpu_memory_limit

    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    gpu_memory_limit(0.5, "cuda:0")
    assert calls == [(0.5, torch.device("cuda:0"))]
    gpu_memory_limit(0.5, "cpu")
    gpu_memory_limit(None, "cuda")
    assert len(calls) == 1 and "no effect on cpu" in capsys.readouterr().err


def test_lora_modules_take_vllms_json_form(tmp_path):
    from dgemma.cli import UsageError, _lora_module

    (tmp_path / "adapter_config.json").write_text("{}")
    assert _lora_module(json.dumps({"name": "sql", "path": str(tmp_path), "base_model_name": "x"})) == \
        ("sql", str(tmp_path)) == _lora_module(f"sql={tmp_path}")
    with pytest.raises(UsageError, match="not valid JSON"):
        _lora_module("{sql")


# ---------------------------------------------------------------- the CLI
@pytest.mark.parametrize("named", [True, False], ids=["named", "default-model"])
def test_cli_serve_runs(ckpt, named):
    from dgemma.assets import shipped_model

    if not named:
        try:
            shipped_model()
        except FileNotFoundError:
            pytest.skip("no shipped default model")
    port = free_port()
    model = [str(ckpt)] if named else []  # no MODEL: the shipped code model
    proc = subprocess.Popen([sys.executable, "-m", "dgemma.cli", "serve", *model, "--port", str(port),
                             "--device", "cpu", "--max-concurrency", "2", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return proc.poll() is None and False

        assert wait_until(up, timeout=60), proc.stdout.read() if proc.poll() is not None else "no answer"
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == (ckpt.name if named else "dgemma-code")
        taken = subprocess.run([sys.executable, "-m", "dgemma.cli", "serve", *model, "--port", str(port)],
                               capture_output=True, text=True, timeout=60)
        assert taken.returncode == 2 and "cannot listen" in taken.stderr
        assert len(taken.stderr.strip().splitlines()) == 1
    finally:
        proc.terminate()
        proc.wait(15)
