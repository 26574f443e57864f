"""The live-canvas web page, end to end in headless Chromium.

Chromium is driven over the DevTools protocol through `--remote-debugging-pipe` (JSON messages on file descriptors
3 and 4, each ended by a NUL byte), so the test needs no websocket client and no browser-automation package: the
standard library talks to the browser. The test loads `/`, runs a prompt against a tiny random model (a real
forward pass per step, drafts arriving through `stream_drafts`), checks that the canvas was drawn step by step and
finished, replays a step with the slider, runs the autoregressive comparison, and takes a screenshot. The
screenshot replaces docs/web-canvas.png only when asked (DGEMMA_UPDATE_SCREENSHOT=1), so test runs leave the tree
clean.

Chromium comes from Debian's `chromium` package. When it is missing and apt is usable (root, apt-get present),
the set-up installs it; otherwise the test is skipped with the reason. Set DGEMMA_NO_APT=1 to never install.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402

from conftest import randomize, tiny_config  # noqa: E402
from dgemma.model import DiffusionGemma  # noqa: E402
from dgemma.pipeline import Pipeline  # noqa: E402
from dgemma.serve import ServerSettings, create_app  # noqa: E402
from dgemma.tokenizer import GEMMA4_CONTROL_TOKENS, GEMMA4_SPECIAL_TOKENS, Tokenizer  # noqa: E402
from dgemma.weights import save_model  # noqa: E402
from test_serve import ServerThread  # noqa: E402

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "web-canvas.png"
CANVAS, STEPS = 64, 12

# Words for a word-level tokenizer, so that the tiny random model's canvases look like text in the screenshot.
WORDS = """the of and to a in is it you that he was for on are with as I his they be at one have this from or
had by word but what some we can out other were all there when up use your how said an each she which do their
time if will way about many then them write would like so these her long make thing see him two has look more
day could go come did number sound no most people my over know water than call first who may down side been now
find any new work part take get place made live where after back little only round man year came show every good
me give our under name very through just form sentence great think say help low line differ turn cause much mean
before move right boy old too same tell does set three want air well also play small end put home read hand port
large spell add even land here must big high such follow act why ask men change went light kind off need house
picture try us again animal point mother world near build self earth father head stand own page should country
found answer school grow study still learn plant cover food sun four between state keep eye never last let
thought city tree cross farm hard start might story saw far sea draw left late run while press close night real
life few north open seem together next white children begin got walk example ease paper group always music
those both mark often letter until mile river car feet care second book carry took science eat room friend began
idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl usual young
ready above ever red list though feel talk bird soon body dog family direct pose leave song measure door product
black short numeral class wind question happen complete ship area half rock order fire south problem piece told
knew pass since top whole king space heard best hour better true during hundred five remember step early hold
west ground interest reach fast verb sing listen six table travel less morning ten simple several vowel toward
war lay against pattern slow center love person money serve appear road map rain rule govern pull cold notice
voice unit power town fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest
correct able pound done beauty drive stood contain front teach week final gave green oh quick develop ocean warm
free minute strong special mind behind clear tail produce fact street inch multiply nothing course stay wheel
full force blue object decide surface deep moon island foot system busy test record boat common gold possible
plane stead dry wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes
distant fill east paint language among""".split()


def word_tokenizer(vocab_size: int = 320) -> Tokenizer:
    """Gemma 4's special tokens at their ids, punctuation, "user"/"model"/"thought" and common words; <unk> else."""
    from tokenizers import AddedToken, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    specials = {i: t for i, t in {**GEMMA4_SPECIAL_TOKENS, **GEMMA4_CONTROL_TOKENS}.items() if i < vocab_size}
    words = list(dict.fromkeys([".", ",", "!", "?", ":", "user", "model", "thought", *WORDS]))
    vocab = {t: i for i, t in specials.items()}
    free = (i for i in range(vocab_size) if i not in specials)
    for i, w in zip(free, words):
        vocab[w] = i
    backend = Backend(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in sorted(specials.items())])
    return Tokenizer(backend, bos_id=2, eos_ids=[1, 106, 50], pad_id=0)


# ---------------------------------------------------------------- Chromium over the DevTools pipe
def find_chromium() -> str:
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    found = next((p for p in map(shutil.which, names) if p), None)
    if found:
        return found
    if os.environ.get("DGEMMA_NO_APT"):
        pytest.skip("headless Chromium is not installed (and DGEMMA_NO_APT forbids installing it)")
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("headless Chromium is not installed and apt is not usable here (needs root and apt-get): "
                    "install Debian's `chromium` package to run this test")
    out = ""
    for cmd in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "chromium"]):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        out = (p.stderr or p.stdout).strip().splitlines()[-1:] or [""]
        if cmd[1] == "install" and p.returncode == 0:
            break
    found = shutil.which("chromium")
    if not found:
        pytest.skip(f"headless Chromium is not installed and `apt-get install chromium` failed: {out[0]}")
    return found


def _high_fd(fd: int) -> int:
    """The same pipe end at a descriptor >= 10, so that moving it to 3/4 in the child cannot clobber the other."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


class Chrome:
    """Headless Chromium and a blocking DevTools client on the pipe transport (fd 3: to Chrome, fd 4: from it)."""

    def __init__(self, exe: str, width: int = 1280, height: int = 1000):
        to_r, to_w = map(_high_fd, os.pipe())
        from_r, from_w = map(_high_fd, os.pipe())
        self.profile = tempfile.mkdtemp(prefix="dgemma-chrome-")
        args = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
                "--remote-debugging-pipe", f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
                "about:blank"]
        # bash moves the pipe ends to 3 and 4 and execs Chromium (dash cannot name descriptors above 9, and a
        # preexec_fn is unsafe here: the server runs in a thread of this process).
        script = f'exec "$0" "$@" 3<&{to_r} 4>&{from_w} {to_r}<&- {from_w}>&-'
        bash = shutil.which("bash") or pytest.skip("bash is needed to hand Chromium its DevTools pipe")
        self.proc = subprocess.Popen([bash, "-c", script, *args], pass_fds=(to_r, from_w),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self.out, self.inp = to_w, from_r
        self.buf, self.next_id, self.session = b"", 0, None

    def send(self, method: str, params: dict | None = None, timeout: float = 30) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self.out, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            while b"\0" not in self.buf:
                left = deadline - time.time()
                if left <= 0 or not select.select([self.inp], [], [], left)[0]:
                    raise TimeoutError(f"no answer to {method}")
                data = os.read(self.inp, 1 << 20)
                if not data:
                    raise ConnectionError("Chromium closed the DevTools pipe")
                self.buf += data
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def attach(self) -> None:
        targets = self.send("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]

    def js(self, expression: str):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"page error: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"the page never satisfied {expression}")

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for fd in (self.out, self.inp):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)


# ---------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def web_server(tmp_path_factory):
    model = randomize(DiffusionGemma(tiny_config("a", canvas_length=CANVAS)), seed=3)
    with torch.no_grad():  # a more confident random model: lower entropies, so acceptance is visible
        model.embed_tokens.weight.mul_(4.0)
    ckpt = save_model(model, tmp_path_factory.mktemp("web") / "tiny-words", tokenizer=word_tokenizer(),
                      generation_config={"max_denoising_steps": STEPS, "max_new_tokens": 128})
    settings = ServerSettings(model_name="tiny-words", max_concurrency=2, max_queue=4, max_context=1024)
    with ServerThread(create_app(Pipeline.load(str(ckpt), device="cpu", quiet=True), settings)) as s:
        s.ckpt = ckpt
        yield s


@pytest.fixture(scope="module")
def chrome():
    browser = Chrome(find_chromium())
    try:
        browser.attach()
        yield browser
    finally:
        browser.close()


def test_page_denoises_live_replays_and_compares(chrome, web_server):
    prompt, max_tokens, seed, bound, top_p = "Write about the sea and the moon .", 2 * CANVAS, 4, 40, 0.9
    draft = "the sea ."
    chrome.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 1000, "deviceScaleFactor": 1,
                                                       "mobile": False})
    chrome.send("Page.enable")
    chrome.send("Page.navigate", {"url": web_server.url + "/"})
    chrome.wait_for("document.body && document.body.dataset.state === 'idle'", timeout=30)
    assert chrome.js("document.getElementById('model-info').textContent").startswith("tiny-words")

    # 1. type a prompt, ask for the AR comparison too, press Run
    chrome.js(f"""(() => {{
        document.getElementById('prompt').value = {json.dumps(prompt)};
        document.getElementById('max-tokens').value = {max_tokens};
        document.getElementById('seed').value = {seed};
        document.getElementById('entropy-bound').value = {bound};
        document.getElementById('top-p').value = {top_p};
        document.getElementById('draft').value = {json.dumps(draft)};
        document.getElementById('compare').checked = true;
        document.getElementById('run').click(); }})()""")
    assert chrome.wait_for("['running', 'done', 'error'].includes(document.body.dataset.state) && "
                           "document.body.dataset.state", timeout=10)
    chrome.wait_for("Number(document.body.dataset.drafts || 0) > 0", timeout=30)  # drafts arrive while it runs
    state = chrome.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state",
                            timeout=90)
    assert state == "done", chrome.js("document.getElementById('error').textContent")

    # 2. the canvas was drawn step by step from the real model and finished (last frame: committed)
    page = chrome.js("""(() => {
        const recs = window.dgemma.records;
        return {drafts: recs.filter(r => !r.committed).map(r => [r.canvas_index, r.step, r.accepted_count]),
                commits: recs.filter(r => r.committed).length,
                cells: document.querySelectorAll('#grid .cell').length,
                committedCells: document.querySelectorAll('#grid .cell.committed').length,
                output: document.getElementById('output').textContent,
                arOutput: document.getElementById('ar-output').textContent,
                runs: window.dgemma.runs,
                diffRow: document.getElementById('row-diffusion').textContent,
                arRow: document.getElementById('row-ar').textContent,
                sliderMax: Number(document.getElementById('replay').max)};
    })()""")
    truth = httpx.post(web_server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "seed": seed,
        "entropy_bound": bound, "top_p": top_p, "prediction": {"type": "content", "content": draft}}).json()
    canvases = truth["usage"]["canvases"]
    steps = [s for c in truth["dgemma"]["choices"] for s in c["steps_per_canvas"]]
    assert [(c, s) for c, s, _ in page["drafts"]] == [(c, s + 1) for c, n in enumerate(steps) for s in range(n)]
    assert page["commits"] == canvases and page["sliderMax"] == len(page["drafts"]) + canvases - 1
    assert page["cells"] == CANVAS and page["committedCells"] == CANVAS
    assert page["output"] == truth["choices"][0]["message"]["content"]
    assert max(a for *_, a in page["drafts"]) > 1  # several positions accepted in one step
    d, ar = page["runs"]["diffusion"], page["runs"]["ar"]
    assert d["usage"]["steps_per_canvas"] == truth["usage"]["steps_per_canvas"] and d["tps"] > 0
    assert ar["usage"]["steps_per_canvas"] is None and ar["tokens"] > 0 and ar["tps"] > 0
    assert ar["usage"]["forward_passes"] >= ar["tokens"]  # one forward per token
    assert "autoregressive" in page["arRow"] and page["arOutput"] == ar["text"]

    # 3. replay: the slider goes back to any recorded step and redraws that canvas
    chrome.js("""(() => { const s = document.getElementById('replay'); s.value = 0;
                          s.dispatchEvent(new Event('input')); })()""")
    first = chrome.js("document.getElementById('status').textContent")
    assert first.startswith("canvas 1 · step 1 ·")
    assert chrome.js("document.querySelectorAll('#grid .cell.committed').length") == 0
    assert chrome.js("document.querySelectorAll('#grid .cell.acc').length") == page["drafts"][0][2]

    # 4. a mid-denoising frame of the last canvas for the screenshot
    mid = len(page["drafts"]) + canvases - 2 - steps[-1] // 2
    chrome.js(f"""(() => {{ const s = document.getElementById('replay'); s.value = {mid};
                           s.dispatchEvent(new Event('input')); }})()""")
    assert "step" in chrome.js("document.getElementById('status').textContent")
    shot = chrome.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})
    png = base64.b64decode(shot["data"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    if os.environ.get("DGEMMA_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        SCREENSHOT.write_bytes(png)

    # 5. structured output: the format menu sends response_format (this word-level tokenizer cannot carry a
    # grammar, so the server's 400 comes back and is shown); a schema that is not JSON never leaves the page
    chrome.js("""(() => { const f = document.getElementById('format'); f.value = 'json_schema';
                          f.dispatchEvent(new Event('change'));
                          document.getElementById('schema').value = '{not json';
                          document.getElementById('compare').checked = false;
                          document.getElementById('run').click(); })()""")
    chrome.wait_for("document.body.dataset.state === 'error'", timeout=30)
    assert not chrome.js("document.getElementById('schema').hidden")
    assert "not JSON" in chrome.js("document.getElementById('error').textContent")
    chrome.js("""(() => { const f = document.getElementById('format'); f.value = 'json_object';
                          f.dispatchEvent(new Event('change'));
                          document.getElementById('run').click(); })()""")
    chrome.wait_for("document.body.dataset.state === 'running' || "
                    "document.getElementById('error').textContent.includes('byte-level')", timeout=30)
    chrome.wait_for("document.body.dataset.state === 'error'", timeout=30)
    assert "byte-level" in chrome.js("document.getElementById('error').textContent")
    assert chrome.js("document.getElementById('schema').hidden")


def test_page_picks_a_lora_adapter(chrome, web_server, tmp_path):
    """With adapters served (`--lora`), the page offers them beside the base; a run on one is that adapter's."""
    from test_adapters import make_adapter

    pipe = Pipeline.load(str(web_server.ckpt), device="cpu", quiet=True)
    path = str(make_adapter(pipe.model, tmp_path / "poet", ("all",), 1))
    settings = ServerSettings(model_name="tiny-words", max_concurrency=2, lora_modules=(("poet", path),))
    with ServerThread(create_app(pipe, settings)) as s:
        chrome.send("Page.navigate", {"url": s.url + "/"})
        chrome.wait_for("document.body && document.body.dataset.state === 'idle' && "
                        "document.getElementById('model-select')", timeout=30)
        options = chrome.js("[...document.getElementById('model-select').options].map(o => o.textContent)")
        assert options == ["tiny-words", "poet (LoRA on tiny-words)"]
        prompt = "Write about the sea ."
        chrome.js(f"""(() => {{
            const pick = document.getElementById('model-select');
            pick.value = 'poet'; pick.dispatchEvent(new Event('change'));
            document.getElementById('prompt').value = {json.dumps(prompt)};
            document.getElementById('max-tokens').value = {CANVAS};
            document.getElementById('seed').value = 2;
            document.getElementById('compare').checked = false;
            document.getElementById('run').click(); }})()""")
        chrome.wait_for("document.body.dataset.state === 'running' || document.body.dataset.state === 'done'",
                        timeout=10)
        state = chrome.wait_for("['done', 'error'].includes(document.body.dataset.state) && "
                                "document.body.dataset.state", timeout=60)
        assert state == "done", chrome.js("document.getElementById('error').textContent")
        want = httpx.post(s.url + "/v1/chat/completions", timeout=60, json={
            "model": "poet", "messages": [{"role": "user", "content": prompt}], "max_tokens": CANVAS,
            "seed": 2}).json()["choices"][0]["message"]["content"]
        assert chrome.js("document.getElementById('output').textContent") == want


def test_page_sends_an_image(chrome, web_server, tmp_path):
    """On a checkpoint with a vision tower the page offers an image picker; the picked file goes with the chat
    message as an image_url data: URL, and the reply is the API's for that image. A text model hides the picker."""
    from test_vision import BOI, EOI, IMG, VISION, picture

    from dgemma import vision

    chrome.send("Page.navigate", {"url": web_server.url + "/"})
    chrome.wait_for("document.body && document.body.dataset.state === 'idle'", timeout=30)
    assert chrome.js("document.getElementById('image-row').hidden") is True
    model = randomize(DiffusionGemma(tiny_config("a", canvas_length=CANVAS, image_token_id=IMG, boi_token_id=BOI,
                                                 eoi_token_id=EOI, vision_soft_tokens_per_image=70)), seed=3)
    vision.attach_vision(model, VISION, seed=2)
    ckpt = save_model(model, tmp_path / "eyes", tokenizer=word_tokenizer(),
                      generation_config={"max_denoising_steps": STEPS, "max_new_tokens": 64})
    path = tmp_path / "pic.png"
    picture(150, 100, seed=9).save(path)
    settings = ServerSettings(model_name="eyes", max_concurrency=2)
    with ServerThread(create_app(Pipeline.load(str(ckpt), device="cpu", quiet=True), settings)) as s:
        chrome.send("Page.navigate", {"url": s.url + "/"})
        chrome.wait_for("document.body && document.body.dataset.state === 'idle' && "
                        "!document.getElementById('image-row').hidden", timeout=30)
        root = chrome.send("DOM.getDocument")["root"]["nodeId"]
        node = chrome.send("DOM.querySelector", {"nodeId": root, "selector": "#image"})["nodeId"]
        chrome.send("DOM.setFileInputFiles", {"nodeId": node, "files": [str(path)]})
        chrome.wait_for("window.dgemma.image && !document.getElementById('image-preview').hidden", timeout=10)
        prompt = "What is in the picture ?"
        chrome.js(f"""(() => {{
            document.getElementById('prompt').value = {json.dumps(prompt)};
            document.getElementById('max-tokens').value = {CANVAS};
            document.getElementById('seed').value = 5;
            document.getElementById('compare').checked = false;
            document.getElementById('run').click(); }})()""")
        state = chrome.wait_for("['done', 'error'].includes(document.body.dataset.state) && "
                                "document.body.dataset.state", timeout=120)
        assert state == "done", chrome.js("document.getElementById('error').textContent")
        url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        want = httpx.post(s.url + "/v1/chat/completions", timeout=120, json={
            "model": "eyes", "max_tokens": CANVAS, "seed": 5, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]}]}).json()
        assert chrome.js("document.getElementById('output').textContent") == \
            want["choices"][0]["message"]["content"]
        assert chrome.js("window.dgemma.image") == url
        chrome.js("document.getElementById('image-clear').click()")
        assert chrome.js("window.dgemma.image") is None
