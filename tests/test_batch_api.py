"""OpenAI's Files and Batches APIs on `dgemma serve --batch-dir`: driven through the official `openai` client on the
tiny random checkpoint (test_serve's), answers checked against the same requests sent directly."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")

from dgemma.pipeline import Pipeline  # noqa: E402
from dgemma.serve import ServerSettings, create_app  # noqa: E402
from dgemma.serve.engine import Job, Worker  # noqa: E402
from test_batch import same_answer  # noqa: E402
from test_serve import NAME, ServerThread, build_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("batchapi") / NAME)


@pytest.fixture(scope="module")
def pipe(ckpt):
    return Pipeline.load(str(ckpt), device="cpu", quiet=True)


def serve(pipe, batch_dir, **kw):
    kw.setdefault("max_concurrency", 2)
    return ServerThread(create_app(pipe, ServerSettings(model_name=NAME, max_context=1024, batch_dir=str(batch_dir)
                                                        if batch_dir else None, **kw)))


def client_for(server, **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=60)


def line(cid, url="/v1/completions", **body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body}) + "\n"


def wait(client, bid, statuses=("completed", "failed", "cancelled", "expired"), timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        b = client.batches.retrieve(bid)
        if b.status in statuses:
            return b
        time.sleep(0.1)
    raise AssertionError(f"batch {bid} still {b.status}")


def test_a_batch_runs_to_completion_as_the_requests_would(pipe, tmp_path):
    reqs = [dict(prompt=f"prompt {i}", max_tokens=12, seed=i) for i in range(5)]
    text = "".join(line(f"r{i}", **r) for i, r in enumerate(reqs)) + line("bad", prompt="x", temperature=-1)
    with serve(pipe, tmp_path / "store") as s, httpx.Client(base_url=s.url, timeout=60) as http:
        client = client_for(s)
        f = client.files.create(file=("requests.jsonl", text.encode()), purpose="batch")
        assert f.id.startswith("file-") and f.bytes == len(text.encode()) and f.purpose == "batch"
        assert f.filename == "requests.jsonl"
        assert client.files.retrieve(f.id).id == f.id and f.id in [x.id for x in client.files.list()]
        assert client.files.content(f.id).text == text
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h",
                                  metadata={"job": "nightly"})
        assert b.status == "validating" and b.metadata == {"job": "nightly"} and b.expires_at == b.created_at + 86400
        b = wait(client, b.id)
        assert b.status == "completed" and b.completed_at and b.in_progress_at and b.finalizing_at
        assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (6, 5, 1)
        out = [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines()]
        err = [json.loads(x) for x in client.files.content(b.error_file_id).text.splitlines()]
        assert [o["custom_id"] for o in out] == [f"r{i}" for i in range(5)] and [e["custom_id"] for e in err] == ["bad"]
        assert err[0]["response"]["status_code"] == 400 and err[0]["error"]["code"]
        assert client.files.retrieve(b.output_file_id).purpose == "batch_output"
        tokens = [o["response"]["body"]["usage"] for o in out]
        assert b.usage.input_tokens == sum(u["prompt_tokens"] for u in tokens) > 0
        assert b.usage.output_tokens == sum(u["completion_tokens"] for u in tokens) > 0
        assert b.usage.total_tokens == b.usage.input_tokens + b.usage.output_tokens
        for r, o in zip(reqs, out):  # what a client gets sending the request itself
            same_answer(http.post("/v1/completions", json=r).json(), o["response"]["body"])
        assert b.id in [x.id for x in client.batches.list()]
        assert "dgemma_batches_running 0" in http.get("/metrics").text
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(b.id)
        assert client.files.delete(f.id).deleted and f.id not in [x.id for x in client.files.list()]
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(f.id)


def test_an_invalid_input_file_fails_the_batch_with_its_lines(pipe, tmp_path):
    text = (line("a", prompt="x") + "not json\n" + line("a", prompt="y")
            + line("c", "/v1/chat/completions", messages=[{"role": "user", "content": "hi"}])
            + line("d", prompt="x", stream=True))
    with serve(pipe, tmp_path / "store") as s:
        client = client_for(s)
        f = client.files.create(file=("in.jsonl", text.encode()), purpose="batch")
        b = wait(client, client.batches.create(input_file_id=f.id, endpoint="/v1/completions",
                                               completion_window="24h").id)
        assert b.status == "failed" and b.failed_at and b.output_file_id is None
        assert [(e.line, e.code) for e in b.errors.data] == [(2, "invalid_json"), (3, "invalid_request"),
                                                             (4, "invalid_request"), (5, "invalid_request")]
        assert "used twice" in b.errors.data[1].message and "endpoint" in b.errors.data[2].message


def test_cancel_keeps_the_answers_so_far(pipe, tmp_path):
    text = "".join(line(f"r{i}", prompt=f"p{i}", max_tokens=96, seed=i) for i in range(60))
    with serve(pipe, tmp_path / "store", max_concurrency=1) as s:
        client = client_for(s)
        f = client.files.create(file=("in.jsonl", text.encode()), purpose="batch")
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
        wait(client, b.id, ("in_progress",))
        with pytest.raises(openai.ConflictError):
            client.files.delete(f.id)  # the input of a running batch
        while client.batches.retrieve(b.id).request_counts.completed < 2:
            time.sleep(0.05)
        assert client.batches.cancel(b.id).status == "cancelling"
        b = wait(client, b.id)
        assert b.status == "cancelled" and b.cancelling_at and b.cancelled_at
        n = b.request_counts.completed
        assert 2 <= n < 60 and b.request_counts.total == 60
        out = [json.loads(x)["custom_id"] for x in client.files.content(b.output_file_id).text.splitlines()]
        assert out == [f"r{i}" for i in range(n)]


def test_a_batch_resumes_after_a_restart(pipe, tmp_path):
    store = tmp_path / "store"
    n = 60  # a margin: the server goes on answering while it stops
    text = "".join(line(f"r{i}", prompt=f"p{i}", max_tokens=32, seed=i) for i in range(n))
    with serve(pipe, store, max_concurrency=1) as s:
        client = client_for(s)
        f = client.files.create(file=("in.jsonl", text.encode()), purpose="batch")
        bid = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h").id
        while client.batches.retrieve(bid).request_counts.completed < 3:
            time.sleep(0.05)
    partial = store / "batches" / f"{bid}.partial.jsonl"
    done_before = partial.read_text().splitlines()
    assert 3 <= len(done_before) < n
    with serve(pipe, store, max_concurrency=2) as s:
        client = client_for(s)
        b = wait(client, bid)
        assert b.status == "completed" and b.request_counts.completed == n
        out = client.files.content(b.output_file_id).text.splitlines()
        assert [json.loads(x)["custom_id"] for x in out] == [f"r{i}" for i in range(n)]
        assert out[:len(done_before)] == done_before  # kept, not run again
        assert not partial.exists()


def test_batch_api_errors(pipe, tmp_path):
    with serve(pipe, None) as s, httpx.Client(base_url=s.url, timeout=60) as http:
        for r in (http.get("/v1/batches"), http.post("/v1/batches", json={}),
                  http.post("/v1/files", files={"file": ("a", b"x")}, data={"purpose": "batch"})):
            assert r.status_code == 403 and r.json()["error"]["code"] == "batch_api_disabled"
            assert "--batch-dir" in r.json()["error"]["message"]
    with serve(pipe, tmp_path / "store", batch_max_file_bytes=1000) as s, \
            httpx.Client(base_url=s.url, timeout=60) as http:
        client = client_for(s)
        f = client.files.create(file=("in.jsonl", line("a", prompt="x").encode()), purpose="batch")
        cases = [
            (http.post("/v1/files", files={"file": ("a", b"x")}, data={"purpose": "fine-tune"}), 400, "purpose"),
            (http.post("/v1/files", data={"purpose": "batch"}), 400, "file"),
            (http.post("/v1/files", files={"file": ("a", b"x" * 5000)}, data={"purpose": "batch"}), 413, "file"),
            (http.post("/v1/files", content=b"--xx\r\ngarbage", headers={"content-type": "multipart/form-data; "
                                                                                      "boundary=xx"}), 400, None),
            (http.post("/v1/files", content=b"{}", headers={"content-type": "application/json"}), 400, "purpose"),
            (http.post("/v1/batches", json={"input_file_id": f.id, "endpoint": "/v1/embeddings",
                                            "completion_window": "24h"}), 400, "endpoint"),
            (http.post("/v1/batches", json={"input_file_id": f.id, "endpoint": "/v1/completions",
                                            "completion_window": "1h"}), 400, "completion_window"),
            (http.post("/v1/batches", json={"input_file_id": "file-nope", "endpoint": "/v1/completions",
                                            "completion_window": "24h"}), 404, "file_id"),
            (http.post("/v1/batches", json={"input_file_id": f.id, "endpoint": "/v1/completions",
                                            "completion_window": "24h", "extra": 1}), 400, None),
            (http.post("/v1/batches", json={"input_file_id": f.id, "endpoint": "/v1/completions",
                                            "completion_window": "24h", "metadata": {"k": "v" * 600}}), 400, None),
            (http.get("/v1/batches/batch_nope"), 404, "batch_id"),
            (http.get("/v1/batches/..%2F..%2Fx"), 404, None),
            (http.get("/v1/files/file-..%2Fx/content"), 404, None),
            (http.post("/v1/batches/batch_nope/cancel"), 404, "batch_id"),
            (http.delete("/v1/files/file-nope"), 404, "file_id"),
            (http.get("/v1/batches", params={"limit": 0}), 400, "limit"),
        ]
        for r, status, param in cases:
            assert r.status_code == status, (r.request.url, r.text)
            body = r.json()
            assert set(body) == {"error"} and body["error"]["message"], body
            if param is not None:
                assert body["error"]["param"] == param, body


def test_batch_rows_wait_for_interactive_ones():
    """A waiting client's row is admitted before any batch row that came earlier (fcfs and priority alike)."""
    for priority in (False, True):
        w = Worker(SimpleNamespace(free=[0], rows={}), max_queue=8, priority=priority)
        jobs = [Job([1], None, None, background=True), Job([1], None, None, background=True), Job([1], None, None),
                Job([1], None, None, background=True)]
        w._waiting.extend(jobs)
        assert [w._next() for _ in jobs] == [jobs[2], jobs[0], jobs[1], jobs[3]]
