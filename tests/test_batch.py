"""`dgemma run-batch`: OpenAI Batch files answered offline through the server's own app, in input order, with
resume after a kill. A tiny random checkpoint with a byte-level tokenizer (test_serve's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from dgemma.cli import main  # noqa: E402
from dgemma.pipeline import Pipeline  # noqa: E402
from dgemma.serve import ServerSettings, create_app  # noqa: E402
from dgemma.serve.batch import parse_line  # noqa: E402
from test_serve import NAME, ServerThread, build_checkpoint  # noqa: E402

CHAT = {"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 20, "seed": 3}


def req(cid, url="/v1/completions", **body):
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


REQUESTS = [
    req("chat", "/v1/chat/completions", model=NAME, **CHAT),
    req("plain", prompt="Once upon", max_tokens=20, seed=5),
    req("two", prompt="abc", max_tokens=12, seed=7, n=2, logprobs=1),
    req("ar", prompt="xyz", max_tokens=10, seed=9, ar=True),
    req("resp", "/v1/responses", input="Hello", max_output_tokens=16, seed=11),
    req("msg", "/v1/messages", model=NAME, max_tokens=16, messages=[{"role": "user", "content": "yo"}],
        metadata={"user_id": "u"}),
    req("tok", "/tokenize", prompt="hello"),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("batch") / NAME)


def write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run(ckpt, inp, out, *extra):
    return main(["run-batch", str(ckpt), "-i", str(inp), "-o", str(out), "--device", "cpu", "--quiet",
                 "--model-name", NAME, "--max-concurrency", "3", "--max-context", "1024", *extra])


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


TIMED = ("id", "created", "created_at", "request_id", "wall_s", "time_to_first_commit_s")


def same_answer(a, b) -> None:
    """The same response but for the ids, dates and timings every response gets afresh; floats (entropies,
    logprobs) to float rounding, as a batch of other rows sums its vocabulary blocks in another order."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert set(a) == set(b), (a, b)
        for k in set(a) - set(TIMED):
            same_answer(a[k], b[k])
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), (a, b)
        for x, y in zip(a, b):
            same_answer(x, y)
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    else:
        assert a == b


def test_parse_line_refuses_what_is_not_a_request():
    ok = parse_line(json.dumps(req("a", prompt="x")), 1)
    assert ok[0] == "a" and ok[1] == ("/v1/completions", {"prompt": "x"}) and ok[2] is None
    assert parse_line(json.dumps({**req("a", prompt="x"), "method": "post"}), 1)[1] is not None  # case-insensitive
    cases = {"[1, 2]": "invalid_request", '{"custom_id": 3}': "invalid_request", "{oops": "invalid_json",
             json.dumps({**req("a"), "url": "/v1/embeddings"}): "invalid_url",
             json.dumps({**req("a"), "url": None}): "invalid_url",
             json.dumps({**req("a"), "method": "GET"}): "invalid_method",
             json.dumps({**req("a"), "body": [1]}): "invalid_request",
             json.dumps(req("a", prompt="x", stream=True)): "invalid_request"}
    for text, code in cases.items():
        cid, request, out = parse_line(text, 4)
        assert request is None and out["response"] is None, text
        assert out["error"]["code"] == code and out["error"]["message"].startswith("line 4: "), (text, out)
        assert out["custom_id"] == cid and out["id"].startswith("batch_req_")


def test_batch_answers_every_line_in_order_as_the_server_does(ckpt, tmp_path, capsys):
    bad = [req("neg", prompt="x", temperature=-1), "not json", req("chat", prompt="dup"),
           req("emb", "/v1/embeddings", input="x"), req("streamed", prompt="x", stream=True),
           req("huge", prompt="x", max_tokens=10 ** 6), req("inf", prompt="x", temperature=float("inf")),
           req("unknown-model", prompt="x", model="gpt-4o")]
    inp = write(tmp_path / "in.jsonl", [REQUESTS[0], "", *REQUESTS[1:], *bad])
    out = tmp_path / "out.jsonl"
    assert run(ckpt, inp, out, "--summary-json", str(tmp_path / "sum.json")) == 0
    lines = read(out)
    assert [o["custom_id"] for o in lines] == [r["custom_id"] for r in REQUESTS] + [
        "neg", None, "chat", "emb", "streamed", "huge", "inf", "unknown-model"]
    assert not (tmp_path / "out.jsonl.partial").exists()
    for o in lines:
        assert set(o) == {"id", "custom_id", "response", "error"} and o["id"].startswith("batch_req_")
    good, refused, invalid = lines[:len(REQUESTS)], [lines[-8], *lines[-3:]], lines[-7:-3]
    assert all(o["response"]["status_code"] == 200 and o["error"] is None for o in good)
    assert [o["response"]["status_code"] for o in refused] == [400, 400, 400, 404]
    for o in refused:  # the error both where OpenAI keeps it (the body) and where vLLM does (`error`)
        assert o["error"]["message"] == o["response"]["body"]["error"]["message"]
    assert [o["error"]["code"] for o in invalid] == ["invalid_json", "duplicate_custom_id", "invalid_url",
                                                     "invalid_request"]
    assert all(o["response"] is None for o in invalid)
    assert len(good[2]["response"]["body"]["choices"]) == 2
    assert good[0]["response"]["request_id"] == good[0]["response"]["body"]["id"]
    summary = json.loads((tmp_path / "sum.json").read_text())
    assert (summary["lines"], summary["ok"], summary["failed"], summary["invalid"]) == (15, 7, 4, 4)
    assert summary["completion_tokens"] == sum((o["response"]["body"].get("usage") or {}).get(
        "completion_tokens", (o["response"]["body"].get("usage") or {}).get("output_tokens", 0)) for o in good)
    assert capsys.readouterr().err == ""  # --quiet

    # the same requests sent to `dgemma serve` (seeded) get the same answers
    settings = ServerSettings(model_name=NAME, max_concurrency=2, max_context=1024)
    with ServerThread(create_app(Pipeline.load(str(ckpt), device="cpu", quiet=True), settings)) as s, \
            httpx.Client(base_url=s.url, timeout=60) as http:
        for r, o in zip(REQUESTS + [bad[0]], good + [refused[0]]):
            if r["custom_id"] == "msg":  # no seed in the Messages API: the shape only
                continue
            direct = http.post(r["url"], json=r["body"])
            assert direct.status_code == o["response"]["status_code"]
            same_answer(direct.json(), o["response"]["body"])


def test_batch_resumes_after_a_kill(ckpt, tmp_path, capsys):
    rows = [req(f"r{i}", prompt=f"prompt {i}", max_tokens=12, seed=i) for i in range(6)]
    inp = write(tmp_path / "in.jsonl", rows)
    full = tmp_path / "full.jsonl"
    assert run(ckpt, inp, full) == 0
    first = read(full)

    # a run killed after three answers, half way through writing the fourth; the old output file is still there
    out = tmp_path / "out.jsonl"
    out.write_text("the previous run's output\n")
    partial = tmp_path / "out.jsonl.partial"
    kept = full.read_text().splitlines(keepends=True)[:3]
    partial.write_text("".join(kept) + kept[0][:25])
    assert main(["run-batch", str(ckpt), "-i", str(inp), "-o", str(out), "--device", "cpu", "--model-name", NAME,
                 "--summary-json", str(tmp_path / "sum.json")]) == 0
    err = capsys.readouterr().err
    assert "resuming after the answers in" in err and "3 from an earlier run" in err
    again = read(out)
    assert again[:3] == first[:3]  # not recomputed: the same ids
    assert [o["custom_id"] for o in again] == [r["custom_id"] for r in rows]
    for a, b in zip(again[3:], first[3:]):
        assert a["id"] != b["id"]
        same_answer(a["response"]["body"], b["response"]["body"])
    assert not partial.exists()
    summary = json.loads((tmp_path / "sum.json").read_text())
    assert (summary["lines"], summary["resumed"], summary["ok"]) == (6, 3, 6)


def test_batch_refuses_a_partial_of_other_input_and_keeps_everything(ckpt, tmp_path, capsys):
    inp = write(tmp_path / "in.jsonl", [req("a", prompt="x", max_tokens=4)])
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    partial = tmp_path / "out.jsonl.partial"
    other = json.dumps({"id": "batch_req_1", "custom_id": "zzz", "response": None, "error": None}) + "\n"
    partial.write_text(other)
    assert run(ckpt, inp, out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dgemma run-batch: error: ") and "delete it to start over" in err and "\n" not in err
    assert out.read_text() == "old\n" and partial.read_text() == other
    partial.write_text(other.replace("zzz", "a") * 2)  # more answers than requests
    assert run(ckpt, inp, out) == 2 and "holds 2 answers but" in capsys.readouterr().err


def test_batch_takes_vllms_command_line(ckpt, tmp_path):
    """`vllm run-batch -i IN -o OUT --model M --served-model-name ...` as it is: an alias answers as the first name."""
    inp = write(tmp_path / "in.jsonl", [req("a", "/v1/chat/completions", model="alias", max_tokens=4,
                                            messages=[{"role": "user", "content": "hi"}])])
    out = tmp_path / "out.jsonl"
    assert main(["run-batch", "-i", str(inp), "-o", str(out), "--model", str(ckpt), "--served-model-name", NAME,
                 "alias", "--device", "cpu", "--quiet", "--trust-remote-code", "--enforce-eager"]) == 0
    [answer] = read(out)
    assert answer["response"]["status_code"] == 200 and answer["response"]["body"]["model"] == NAME


def test_batch_cli_errors(ckpt, tmp_path, capsys):
    inp = write(tmp_path / "in.jsonl", [req("a", prompt="x")])
    for args, msg in [(["-i", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o.jsonl")], "no such file"),
                      (["-i", str(inp), "-o", str(tmp_path / "nodir" / "o.jsonl")], "existing directory"),
                      (["-i", str(inp), "-o", str(tmp_path)], "existing directory"),
                      (["-i", str(inp), "-o", str(inp)], "is the input file")]:
        assert main(["run-batch", str(ckpt), *args, "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dgemma run-batch: error: ") and msg in err and "\n" not in err, err
    assert main(["run-batch", "-i", str(inp), "-o", str(tmp_path / "o.jsonl"), "--model", str(ckpt), "-tp", "2"]) == 2
    assert "--tensor-parallel-size 2: dgemma run-batch runs the model on one device" in capsys.readouterr().err
    (tmp_path / "latin1.jsonl").write_bytes(b'{"custom_id": "\xe9"}\n')
    assert run(ckpt, tmp_path / "latin1.jsonl", tmp_path / "o.jsonl") == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_batch_reads_and_writes_urls(ckpt, tmp_path, capsys):
    """vLLM's run-batch takes http(s) URLs too: the input by GET, the answers by PUT at the end (kept under
    --output-tmp-dir until then, so a failed upload loses nothing and a rerun resumes)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    rows = [req(f"r{i}", prompt=f"p{i}", max_tokens=8, seed=i) for i in range(3)]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    put: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/in.jsonl"
            self.send_response(200 if ok else 404)
            self.end_headers()
            if ok:
                self.wfile.write(data)

        def do_PUT(self):
            body = self.rfile.read(int(self.headers["content-length"]))
            ok = self.path != "/refuse"
            if ok:
                put[self.path] = body
            self.send_response(200 if ok else 500)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        assert run(ckpt, url + "/in.jsonl", url + "/out.jsonl", "--output-tmp-dir", str(tmp_path)) == 0
        answers = [json.loads(x) for x in put["/out.jsonl"].decode().splitlines()]
        assert [a["custom_id"] for a in answers] == ["r0", "r1", "r2"]
        assert all(a["response"]["status_code"] == 200 for a in answers)
        assert list(tmp_path.iterdir()) == []  # nothing left behind
        assert run(ckpt, url + "/missing.jsonl", tmp_path / "o.jsonl") == 2
        assert "HTTP 404" in capsys.readouterr().err
        assert run(ckpt, url + "/in.jsonl", url + "/refuse", "--output-tmp-dir", str(tmp_path)) == 2
        err = capsys.readouterr().err.strip()
        assert "failed (HTTP 500); the answers are in" in err and "\n" not in err
        [kept] = list(tmp_path.iterdir())
        assert [json.loads(x)["custom_id"] for x in kept.read_text().splitlines()] == ["r0", "r1", "r2"]
    finally:
        server.shutdown()
