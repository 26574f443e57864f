"""Image input: the vision tower, image preprocessing and image prompts, against transformers' Gemma 4 / DiffusionGemma
(the oracle), plus the engine's handling of image prompts (chunked prefill, prefix caching, sharing) and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import randomize, tiny_config
from dgemma import vision
from dgemma.generate import Engine, GenerationError, GenerationParams, generate
from dgemma.model import DiffusionGemma
from dgemma.pipeline import Pipeline
from dgemma.sampler import SamplerConfig
from dgemma.tokenizer import byte_level
from dgemma.weights import load_model, save_model

PIL = pytest.importorskip("PIL.Image")

# A small tower with every feature the released one has (standardize, GQA-free heads, 2-D RoPE, 3x3 pooling).
VISION = {"model_type": "gemma4_vision", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "position_embedding_size": 128,
          "standardize": True}
IMG, BOI, EOI = 300, 301, 302  # image / begin / end ids inside the tiny vocabulary
SAMPLER = dict(max_denoising_steps=6, entropy_bound=0.5, t_min=0.4, t_max=0.8, stability_threshold=1,
               confidence_threshold=0.005)


def picture(w: int, h: int, seed: int = 0, mode: str = "RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = (rng.random((h, w, channels)) * 255).astype(np.uint8)
    return PIL.fromarray(arr[..., 0] if channels == 1 else arr, mode)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny checkpoint with a vision tower (window 8: an image's 60+ tokens span several windows)."""
    cfg = tiny_config("a", image_token_id=IMG, boi_token_id=BOI, eoi_token_id=EOI, vision_soft_tokens_per_image=70)
    model = randomize(DiffusionGemma(cfg), seed=5).eval()
    with torch.no_grad():  # sharper logits so that acceptance and early stopping really happen
        model.embed_tokens.weight.mul_(4.0)
    vision.attach_vision(model, VISION, seed=3)
    d = tmp_path_factory.mktemp("vision") / "ckpt"
    gen = {"max_denoising_steps": 6, "max_new_tokens": 32, "eos_token_id": [1, 106, 50]}
    return save_model(model, d, generation_config=gen, tokenizer=byte_level())


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt, quiet=True).eval()


@pytest.fixture(scope="module")
def hf(ckpt):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(ckpt, dtype=torch.float32).eval()


def _processor(soft=70):
    pytest.importorskip("transformers")
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil(max_soft_tokens=soft)


# ---------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("size,mode", [((150, 100), "RGB"), ((64, 300), "RGB"), ((500, 20), "RGB"),
                                       ((48, 48), "RGBA"), ((97, 61), "L"), ((1000, 700), "RGB")])
def test_preprocess_matches_the_gemma4_image_processor(size, mode):
    img = picture(*size, mode=mode)
    ref = _processor()(img, return_tensors="pt")
    got = vision.preprocess(vision.open_image(_png(img)), max_soft_tokens=70)
    n = got.patches.shape[0]
    assert ref["num_soft_tokens_per_image"].tolist() == [got.tokens] and n == 9 * got.tokens
    assert torch.equal(ref["pixel_values"][0, :n].float(), got.patches)
    assert torch.equal(ref["image_position_ids"][0, :n], got.positions)
    assert (ref["image_position_ids"][0, n:] == -1).all()  # the rest is the processor's padding


def test_target_size_matches_transformers():
    from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

    rng = np.random.default_rng(0)
    for h, w in rng.integers(1, 4000, size=(300, 2)).tolist() + [[1, 1], [10, 4000], [4000, 10], [48, 48]]:
        for soft in (70, 280):
            try:
                want = get_aspect_ratio_preserving_size(h, w, 16, soft * 9, 3)
            except ValueError:
                with pytest.raises(vision.ImageError):
                    vision.target_size(h, w, 16, soft * 9, 3)
                continue
            assert vision.target_size(h, w, 16, soft * 9, 3) == want, (h, w)


def _png(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_bad_images_are_clear_errors(tmp_path):
    with pytest.raises(vision.ImageError, match="not an image"):
        vision.load_image(b"GIF89a but not really")
    with pytest.raises(vision.ImageError, match="cannot read image"):
        vision.load_image(tmp_path / "missing.png")
    with pytest.raises(vision.ImageError, match="base64"):
        vision.load_image("data:image/png;base64,@@@")
    with pytest.raises(vision.ImageError, match="base64-encoded"):
        vision.load_image("data:image/png,rawbytes")
    with pytest.raises(vision.ImageError, match="max_soft_tokens"):
        vision.preprocess(picture(60, 60), max_soft_tokens=100)
    import base64

    url = "data:image/png;base64," + base64.b64encode(_png(picture(60, 60))).decode()
    assert vision.load_image(url) == vision.load_image(_png(picture(60, 60)))  # same pixels, same digest


# ---------------------------------------------------------------- the tower and the encoder vs transformers
@torch.no_grad()
def test_features_match_transformers(model, hf):
    for size in ((150, 100), (48, 480)):
        img = picture(*size, seed=1)
        ref = _processor()(img, return_tensors="pt")
        want = hf.model.encoder.get_image_features(ref["pixel_values"], ref["image_position_ids"],
                                                   return_dict=True).pooler_output
        got = vision.vision_tower(model).features(vision.preprocess(img, max_soft_tokens=70))
        assert got.shape == want.shape
        assert (got - want).abs().max().item() < 1e-5


def test_features_are_cached_by_digest(model):
    tower = vision.vision_tower(model)
    a, b = (vision.preprocess(picture(150, 100, seed=s), max_soft_tokens=70) for s in (30, 31))
    again = vision.preprocess(picture(150, 100, seed=30), max_soft_tokens=70)  # another object, the same pixels
    hits, misses = tower.hits, tower.misses
    fa = tower.features(a)
    assert tower.features(again) is fa and (tower.hits, tower.misses) == (hits + 1, misses + 1)
    size = fa.numel() * fa.element_size()
    tower.cache_bytes = size  # room for one: b evicts a
    try:
        tower.features(b)
        assert tower.features(a) is not fa and torch.equal(tower.features(a), fa)
    finally:
        tower.cache_bytes = vision.FEATURE_CACHE_BYTES


def _prompt(model, image, before=(2, 5, 6), after=(8, 9, 10, 11)):
    return list(before) + vision.image_ids(model.cfg, image) + list(after)


def _hf_encoder_logits(hf, ids: torch.Tensor, ref) -> torch.Tensor:
    """transformers' encoder logits for `ids` with the processor's images `ref`, under the masks its `generate`
    builds (a bare encoder call drops the image spans' bidirectional masks)."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=hf.config.text_config)
    pos = torch.arange(ids.shape[1])[None]
    masks = hf.model.encoder.create_masks_for_generate(
        config=hf.config, inputs_embeds=torch.empty(1, ids.shape[1], 0), attention_mask=torch.ones_like(ids).bool(),
        past_key_values=cache, position_ids=pos, mm_token_type_ids=(ids == IMG).long())
    h = hf.model.encoder(input_ids=ids, pixel_values=ref["pixel_values"], image_position_ids=ref["image_position_ids"],
                         attention_mask=masks, past_key_values=cache, position_ids=pos).last_hidden_state
    return torch.tanh(hf.lm_head(h).float() / 30.0) * 30.0


@torch.no_grad()
def test_encoder_with_an_image_matches_transformers(model, hf):
    """The image's features replace its placeholders' embeddings and its tokens see each other both ways (also
    across the sliding window), with generate's masks (transformers' bare encoder forward drops them)."""
    img = picture(150, 100, seed=2)
    ref = _processor()(img, return_tensors="pt")
    image = vision.preprocess(img, max_soft_tokens=70)
    ids = torch.tensor([_prompt(model, image)])
    want = _hf_encoder_logits(hf, ids, ref)
    feats = vision.vision_tower(model).features(image)
    [(start, end)] = vision.image_spans(ids[0].tolist(), IMG)
    for kw in ({}, {"known_lengths": [0], "valid_lengths": [ids.shape[1]]}):  # batched and per-row attention
        got = model.encode(ids, model.new_cache(1, 256), images=[[(start, feats)]], **kw)
        assert (got - want).abs().max().item() < 1e-4
    causal = model.encode(ids, model.new_cache(1, 256), images=[[(start, feats)]], known_lengths=[0],
                          valid_lengths=[ids.shape[1]])
    blind = model.encode(ids, model.new_cache(1, 256))  # placeholders' own embeddings: a different prompt
    assert (blind - want).abs().max().item() > 0.1 and torch.equal(causal, got)


def test_generate_with_an_image_matches_transformers(model, hf):
    """Token for token what transformers' generate writes for the same prompt, image and seed."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    img, other = picture(150, 100, seed=4), picture(150, 100, seed=5)
    ref = _processor()(img, return_tensors="pt")
    image = vision.preprocess(img, max_soft_tokens=70)
    prompt = _prompt(model, image)
    ids = torch.tensor([prompt])
    kw = {k: v for k, v in SAMPLER.items() if k != "entropy_bound"}
    kw["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=SAMPLER["entropy_bound"])
    for seed in (0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = hf.generate(ids, pixel_values=ref["pixel_values"], image_position_ids=ref["image_position_ids"],
                              mm_token_type_ids=(ids == IMG).long(), max_new_tokens=48, **kw)
        want = out.sequences[0, len(prompt):].tolist()
        cut = next((i for i, t in enumerate(want) if t in (1, 106, 50)), len(want))
        params = GenerationParams(max_new_tokens=48, sampler=SamplerConfig(**SAMPLER), seed=seed, rng="reference",
                                  images=(image,))
        got = generate(model, [prompt], params)[0]
        assert got.tokens == want[:cut], f"seed {seed}"
        swapped = params.replace(images=(vision.preprocess(other, max_soft_tokens=70),))
        assert generate(model, [prompt], swapped)[0].tokens != got.tokens  # the image is really seen


# ---------------------------------------------------------------- the engine
def _params(image, **kw):
    return GenerationParams(**{"max_new_tokens": 32, "sampler": SamplerConfig(**SAMPLER), "seed": 7,
                               "images": (image,), **kw})


def test_chunked_prefill_never_cuts_an_image(model, monkeypatch):
    image = vision.preprocess(picture(150, 100, seed=6), max_soft_tokens=70)
    prompt = _prompt(model, image, before=range(3, 12))
    [(a, b)] = vision.image_spans(prompt, IMG)
    pieces = []
    encode = model.encode

    def spy(ids, cache, *args, **kw):
        if kw.get("images") is not None:
            pieces.append((int(kw["known_lengths"][0]), int(kw["valid_lengths"][0]), kw["images"][0]))
        elif kw.get("valid_lengths") is not None:
            pieces.append((int(kw["known_lengths"][0]), int(kw["valid_lengths"][0]), None))
        return encode(ids, cache, *args, **kw)

    monkeypatch.setattr(model, "encode", spy)
    eng = Engine(model, max_rows=1, prefill_chunk=8)
    done = [ev for ev in eng.run([prompt], _params(image)) if type(ev).__name__ == "Done"][0]
    prefill = [p for p in pieces if p[0] < len(prompt)][:4]
    # 8 tokens, then the piece that reaches into the image runs to its end, then the rest
    assert [(lo, n) for lo, n, _ in prefill[:3]] == [(0, 8), (8, b - 8), (b, len(prompt) - b)]
    assert prefill[1][2][0][0] == a - 8 and prefill[1][2][0][1].shape[0] == b - a
    assert done.stats["encoder_passes"] >= 3


def test_prefix_cache_stops_at_the_first_image(model):
    """The placeholders are the same ids for every image: a slot's cached prefix is reused up to the image only,
    and a row with images leaves no prefix behind."""
    a = vision.preprocess(picture(150, 100, seed=8), max_soft_tokens=70)
    b = vision.preprocess(picture(150, 100, seed=9), max_soft_tokens=70)
    prompt = _prompt(model, a, before=range(3, 15))
    start = vision.image_spans(prompt, IMG)[0][0]
    text = GenerationParams(max_new_tokens=16, sampler=SamplerConfig(**SAMPLER), seed=1)
    eng = Engine(model, max_rows=1, prefix_cache=True)
    list(eng.run([prompt[:start] + [20, 21]], text))  # leaves the text before the image in the slot
    first = [ev for ev in eng.run([prompt], _params(a)) if type(ev).__name__ == "Done"][0]
    assert first.stats["cached_prompt_tokens"] == start
    second = [ev for ev in eng.run([prompt], _params(b)) if type(ev).__name__ == "Done"][0]
    assert second.stats["cached_prompt_tokens"] == 0  # the image row left nothing to reuse
    fresh = generate(model, [prompt], _params(b))[0]
    assert second.tokens == fresh.tokens


def test_rows_share_a_prompt_only_with_the_same_images(model, monkeypatch):
    a = vision.preprocess(picture(150, 100, seed=10), max_soft_tokens=70)
    b = vision.preprocess(picture(150, 100, seed=11), max_soft_tokens=70)
    prompt = _prompt(model, a)
    eng = Engine(model, max_rows=4)
    out = {}
    ids = [eng.add(prompt, _params(img, seed=s)) for img, s in ((a, 1), (a, 2), (b, 1))]
    while eng.busy:
        for ev in eng.step():
            if type(ev).__name__ == "Done":
                out[ev.request] = ev
    # the second row of image a copies the first's encoding; image b's row encodes its own
    assert [out[i].stats["cached_prompt_tokens"] for i in ids] == [0, len(prompt), 0]
    for i, (img, s) in zip(ids, ((a, 1), (a, 2), (b, 1))):
        assert out[i].tokens == generate(model, [prompt], _params(img, seed=s))[0].tokens


def test_image_prompt_errors(model):
    image = vision.preprocess(picture(150, 100), max_soft_tokens=70)
    eng = Engine(model, max_rows=1)
    prompt = _prompt(model, image)
    with pytest.raises(GenerationError, match="1 image placeholder run.* but 0 image"):
        eng.add(prompt, GenerationParams(max_new_tokens=8))
    with pytest.raises(GenerationError, match="0 image placeholder run.* but 1 image"):
        eng.add([2, 5, 6], _params(image))
    with pytest.raises(GenerationError, match="takes 60 tokens but its placeholder run in the prompt has 59"):
        eng.add(prompt[:5] + prompt[6:], _params(image))
    text_only = randomize(DiffusionGemma(tiny_config("a", image_token_id=IMG)), seed=1)
    with pytest.raises(GenerationError, match="no vision tower"):
        Engine(text_only, max_rows=1).add(prompt, _params(image))


# ---------------------------------------------------------------- the pipeline and the CLI
def test_pipeline_chat_with_an_image(ckpt, tmp_path):
    pipe = Pipeline.load(str(ckpt), device="cpu", quiet=True)
    path = tmp_path / "pic.png"
    picture(150, 100, seed=12).save(path)
    parts = [{"type": "image", "image": str(path)}, {"type": "text", "text": "  what is this?"}]
    messages, images = pipe.chat_messages([{"role": "user", "content": parts}])
    assert messages[0]["content"] == "<|image|>  what is this?" and len(images) == 1
    prompt = pipe.encode_chat(messages, images=images)
    [(a, b)] = vision.image_spans(prompt, IMG)
    assert prompt[a - 1] == BOI and prompt[b] == EOI and b - a == images[0].tokens
    reply = pipe.chat([{"role": "user", "content": parts}], max_new_tokens=16, seed=3)
    again = pipe.chat([{"role": "user", "content": [{"type": "image", "image": PIL.open(path)},
                                                     parts[1]]}], max_new_tokens=16, seed=3)
    assert reply.done.tokens == again.done.tokens
    assert reply.done.stats["prompt_tokens"] == len(prompt)
    with pytest.raises(GenerationError, match="marks 0 image"):
        pipe.encode("no marker here", images=images)


def test_cli_generate_with_an_image(ckpt, tmp_path, capsys):
    import json

    from dgemma.cli import main

    path = tmp_path / "pic.png"
    picture(150, 100, seed=13).save(path)
    assert main(["generate", str(ckpt), "describe", "--image", str(path), "--max-new-tokens", "16", "--seed", "2",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["prompt_tokens"] == 1 + 62 + len("describe")  # BOS, the image, the text
    for args, msg in ((["--image", str(tmp_path / "nope.png")], "cannot read image"),
                      (["--image", __file__], "not an image"),
                      (["--image", str(path), "--suffix", "x"], "cannot be combined with infilling")):
        assert main(["generate", str(ckpt), "describe", *args, "--max-new-tokens", "4"]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and err.count("\n") == 1, err


# ---------------------------------------------------------------- the server
def _data_url(img, fmt="PNG") -> str:
    import base64
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server(ckpt):
    pytest.importorskip("fastapi")
    from test_serve import ServerThread

    from dgemma.serve import ServerSettings, create_app

    settings = ServerSettings(model_name="eyes", max_concurrency=2, max_queue=8, max_context=1024)
    with ServerThread(create_app(Pipeline.load(str(ckpt), device="cpu", quiet=True), settings)) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def test_server_chat_with_an_image(server, http, ckpt):
    """OpenAI's image_url parts (data: URLs): the prompt is the pipeline's, the reply depends on the image, and a
    stream says what the plain answer says."""
    pipe = Pipeline.load(str(ckpt), device="cpu", quiet=True)
    img, other = picture(150, 100, seed=20), picture(100, 150, seed=21)
    parts = lambda im: [{"type": "image_url", "image_url": {"url": _data_url(im)}},  # noqa: E731
                        {"type": "text", "text": "What is in it?"}]
    body = lambda im, **kw: {"model": "eyes", "messages": [{"role": "user", "content": parts(im)}],  # noqa: E731
                             "max_tokens": 24, "seed": 4, **kw}
    r = http.post("/tokenize", json={"model": "eyes", "messages": [{"role": "user", "content": parts(img)}]}).json()
    messages, images = pipe.chat_messages([{"role": "user", "content": [
        {"type": "image", "image": img}, {"type": "text", "text": "What is in it?"}]}])
    assert r["tokens"] == pipe.encode_chat(messages, images=images)
    tower = vision.vision_tower(server.app.state.dgemma.pipe.model)  # read at the server's start
    misses = tower.misses
    one = http.post("/v1/chat/completions", json=body(img)).json()
    assert one["usage"]["prompt_tokens"] == r["count"] == len(r["tokens"])
    assert tower.misses == misses + 1  # run while planning; the engine's prefill found it cached
    assert http.post("/v1/chat/completions", json=body(img)).json()["choices"][0]["message"] == \
        one["choices"][0]["message"]
    assert tower.misses == misses + 1  # the same image again: no second tower forward
    two = http.post("/v1/chat/completions", json=body(other)).json()
    assert two["choices"][0]["message"]["content"] != one["choices"][0]["message"]["content"]
    import json

    with http.stream("POST", "/v1/chat/completions", json=body(img, stream=True)) as resp:
        chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == one["choices"][0]["message"]["content"]


def test_server_messages_and_responses_take_images(http):
    img = picture(150, 100, seed=22)
    url = _data_url(img, "JPEG")
    b64 = url.split(",", 1)[1]
    chat = http.post("/v1/chat/completions", json={
        "model": "eyes", "max_tokens": 8, "seed": 1,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                  {"type": "text", "text": "Describe"}]}]}).json()
    blocks = [{"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": b64}},
              {"type": "text", "text": "Describe"}]
    msg = http.post("/v1/messages", json={"model": "eyes", "max_tokens": 8, "messages": [
        {"role": "user", "content": blocks}]})
    assert msg.status_code == 200, msg.text
    count = http.post("/v1/messages/count_tokens", json={"model": "eyes", "messages": [
        {"role": "user", "content": blocks}]}).json()
    assert count["input_tokens"] == msg.json()["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    resp = http.post("/v1/responses", json={"model": "eyes", "max_output_tokens": 8, "input": [
        {"role": "user", "content": [{"type": "input_image", "image_url": url},
                                     {"type": "input_text", "text": "Describe"}]}]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]


def test_server_image_errors(http, ckpt, tmp_path):
    from test_serve import ServerThread, assert_error, build_checkpoint

    def chat(url, **kw):
        return http.post("/v1/chat/completions", json={"model": "eyes", "max_tokens": 4, **kw, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})

    where = "messages.0.content.0"
    err = assert_error(chat("https://example.com/cat.png"), 400, code="unsupported_parameter", param=where)
    assert "does not fetch images from 'example.com'" in err["message"] and "--allowed-media-domains" in err["message"]
    for url in (str(tmp_path / "x.png"), f"file://{tmp_path}/x.png"):  # no file reads by default
        assert_error(chat(url), 400, code="unsupported_parameter", param=where)
    assert_error(chat("data:image/png;base64,%%%"), 400, param=where)
    assert_error(chat("data:image/png;base64,aGVsbG8="), 400, param=where)  # "hello": not an image
    assert_error(http.post("/v1/chat/completions", json={"model": "eyes", "messages": [
        {"role": "user", "content": [{"type": "image_url"}]}]}), 400, param=where)
    assert_error(chat(_data_url(picture(150, 100)), truncate_prompt_tokens=20), 400, param="truncate_prompt_tokens")
    bad = {"type": "image", "source": {"type": "file", "file_id": "f"}}
    r = http.post("/v1/messages", json={"model": "eyes", "max_tokens": 4, "messages": [
        {"role": "user", "content": [bad]}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"  # Anthropic's shape
    assert_error(http.post("/v1/responses", json={"model": "eyes", "input": [
        {"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}), 400)
    from dgemma.serve import ServerSettings, create_app

    text_only = build_checkpoint(tmp_path / "text")
    with ServerThread(create_app(Pipeline.load(str(text_only), device="cpu", quiet=True),
                                 ServerSettings(model_name="blind"))) as s:
        import httpx

        r = httpx.post(s.url + "/v1/chat/completions", timeout=60, json={"model": "blind", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(picture(60, 60))}}]}]})
        assert "no vision tower" in assert_error(r, 400, param=where)["message"]


def test_cli_chat_takes_images(ckpt, tmp_path, capsys, monkeypatch):
    """`/image PATH` adds an image to the next message; the turns after it keep the image in the conversation;
    a bad path is a message, and the chat goes on."""
    import io

    from dgemma.cli import main

    path = tmp_path / "pic.png"
    picture(150, 100, seed=14).save(path)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {tmp_path / 'nope.png'}\n/image {path}\nwhat is it\n"
                                                 "and now?\n"))
    prompts = []
    encode_chat = Pipeline.encode_chat

    def spy(self, messages, images=None, **kw):
        prompts.append((encode_chat(self, messages, images=images, **kw), len(images or ())))
        return prompts[-1][0]

    monkeypatch.setattr(Pipeline, "encode_chat", spy)
    assert main(["chat", str(ckpt), "--max-new-tokens", "8", "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert "cannot read image" in err and "60 tokens" in err and "goes with your next message" in err
    assert [n for _, n in prompts] == [1, 1] and err.count("tokens/forward") == 2
    first, second = (p for p, _ in prompts)
    assert first.count(IMG) == second.count(IMG) == 60 and len(second) > len(first)  # the image stays in the chat


def test_a_quantized_checkpoint_keeps_its_tower(ckpt, tmp_path):
    """`dgemma quantize` quantizes the text stack; the tower's tensors are written back as they were, and the
    quantized model takes images."""
    from safetensors import safe_open

    from dgemma.cli import main

    out = tmp_path / "int8"
    assert main(["quantize", str(ckpt), str(out), "--scheme", "int8"]) == 0
    with safe_open(str(ckpt / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        keys = [k for k in a.keys() if k.startswith(vision.TOWER) or k.startswith(vision.EMBED)]
        assert keys and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in keys)
    pipe = Pipeline.load(str(out), device="cpu", quiet=True)
    reply = pipe.chat([{"role": "user", "content": [{"type": "image", "image": picture(150, 100)},
                                                    {"type": "text", "text": "hi"}]}], max_new_tokens=8, seed=1)
    assert reply.done.stats["prompt_tokens"] > 60


def test_server_fetches_image_urls_only_where_allowed(ckpt, tmp_path):
    """--allowed-media-domains / --allowed-local-media-path (vLLM's flags): http(s) images from the hosts named
    (redirects too), file:// images under the directory; the same image as a data: URL gives the same reply."""
    import http.server
    import threading

    import httpx
    from test_serve import ServerThread, assert_error

    from dgemma.serve import ServerSettings, create_app

    img = picture(150, 100, seed=40)
    png = _png(img)
    media = tmp_path / "media"
    media.mkdir()
    (media / "pic.png").write_bytes(png)
    (tmp_path / "outside.png").write_bytes(png)

    class Files(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            port = self.server.server_address[1]
            if self.path == "/pic.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)
            elif self.path.startswith("/to/"):  # a redirect to another host name of this machine
                self.send_response(302)
                self.send_header("Location", f"http://{self.path[4:]}:{port}/pic.png")
                self.end_headers()
            elif self.path == "/big":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"\0" * (21 << 20))
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *a):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    settings = ServerSettings(model_name="eyes", allowed_media_domains=("127.0.0.1",),
                              allowed_local_media_path=str(media))
    where = "messages.0.content.0"
    try:
        with ServerThread(create_app(Pipeline.load(str(ckpt), device="cpu", quiet=True), settings)) as s:
            def chat(url):
                return httpx.post(s.url + "/v1/chat/completions", timeout=120, json={
                    "model": "eyes", "max_tokens": 8, "seed": 3, "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}]})

            want = chat(_data_url(img)).json()["choices"][0]["message"]["content"]
            for url in (base + "/pic.png", base + "/to/127.0.0.1", f"file://{media}/pic.png",
                        f"file://{media}/../media/pic.png"):
                r = chat(url)
                assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want, (url, r.text)
            for url, msg in ((base + "/to/localhost", "redirects to 'localhost'"),
                             (base + "/missing.png", "answered 404"),
                             (base + "/big", "larger than"),
                             (f"http://localhost:{files.server_address[1]}/pic.png", "does not fetch images"),
                             (f"file://{tmp_path}/outside.png", "must be under"),
                             (f"file://{media}/none.png", "no image file"),
                             ("ftp://127.0.0.1/pic.png", "must be a data: URL")):
                assert msg in assert_error(chat(url), 400, param=where)["message"], url
    finally:
        files.shutdown()


# ---------------------------------------------------------------- training
def test_fine_tuning_learns_to_read_the_image(ckpt, tmp_path):
    """`dgemma train` on chat records with image parts (paths relative to the JSONL): the frozen tower's features go
    into the encoder as at inference, so two prompts that differ only by their image learn two answers."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    for name, color in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        PIL.new("RGB", (96, 96), color).save(tmp_path / f"{name}.png")
    recs = [{"messages": [{"role": "user", "content": [{"type": "image", "image": f"{n}.png"},
                                                       {"type": "text", "text": "color?"}]},
                          {"role": "assistant", "content": n}]} for n in ("red", "blue")]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in recs * 8) + "\n")
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-m", "dgemma.cli", "train", "--model", str(ckpt), "--data",
                        str(tmp_path / "data.jsonl"), "--steps", "120", "--batch-size", "8", "--lr", "3e-3",
                        "--warmup", "10", "--out", str(tmp_path / "run"), "--threads", "2"],
                       capture_output=True, text=True, timeout=600, cwd=root,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert p.returncode == 0, p.stderr
    pipe = Pipeline.load(str(tmp_path / "run" / "final"), device="cpu", quiet=True)
    for name in ("red", "blue"):
        reply = pipe.chat([{"role": "user", "content": [{"type": "image", "image": str(tmp_path / f"{name}.png")},
                                                        {"type": "text", "text": "color?"}]}],
                          max_new_tokens=16, seed=0)
        assert reply.content == name


def test_training_records_with_images(ckpt, tmp_path):
    """Image records: the prompt is the inference prompt; AR targets skip the placeholders; a text-only model or
    a missing file is an error naming the line; the fingerprint tells images apart."""
    import json

    from dgemma.train.data import DataError, ar_count, fingerprint, load_jsonl, make_batch
    from dgemma.train.noise import draw

    picture(150, 100, seed=50).save(tmp_path / "a.png")
    picture(150, 100, seed=51).save(tmp_path / "b.png")
    rec = lambda f: {"messages": [{"role": "user", "content": [  # noqa: E731
        {"type": "text", "text": "look"}, {"type": "image", "image": f}]}, {"role": "assistant", "content": "ok"}]}
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(rec("a.png")) + "\n" + json.dumps(rec("b.png")) + "\n")
    pipe = Pipeline.load(str(ckpt), device="cpu", quiet=True)
    kw = dict(vocab=320, eos=1, eos_set={1, 106, 50}, canvas=16, max_len=1024)
    a, b = load_jsonl(data, pipe.tokenizer, pipe=pipe, **kw)
    messages, images = pipe.chat_messages([rec(str(tmp_path / "a.png"))["messages"][0]])
    assert list(a.prompt) == pipe.encode_chat(messages, images=images) and a.images == tuple(images)
    assert a.prompt == b.prompt and a.images != b.images  # the same ids, told apart by the images
    g = torch.Generator().manual_seed(0)
    batch = make_batch([a], [draw(g, a.n_blocks(16), 16, 320, 1e-3, 0.5)], canvas=16, pad=0, ar_on_prompt=True)
    [(start, end)] = a.spans
    assert batch.images == [[(start, a.images[0])]]
    assert (batch.ar_targets[0, start - 1:end - 1] == -100).all()
    assert int((batch.ar_targets != -100).sum()) == ar_count(a, True)
    fa = fingerprint([a])
    assert fa != fingerprint([b])
    with pytest.raises(DataError, match=r"d.jsonl:1: .*vision tower"):
        load_jsonl(data, pipe.tokenizer, **kw)
    data.write_text(json.dumps(rec("missing.png")) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: cannot read image"):
        load_jsonl(data, pipe.tokenizer, pipe=pipe, **kw)


@torch.no_grad()
def test_two_images_in_one_prompt_match_transformers(model, hf):
    """Two images of different sizes: two spans, each bidirectional within itself only, features in order."""
    imgs = [picture(150, 100, seed=60), picture(64, 200, seed=61)]
    ref = _processor()(imgs, return_tensors="pt")
    ours = [vision.preprocess(im, max_soft_tokens=70) for im in imgs]
    ids = [2, 5] + vision.image_ids(model.cfg, ours[0]) + [7, 8] + vision.image_ids(model.cfg, ours[1]) + [9]
    x = torch.tensor([ids])
    want = _hf_encoder_logits(hf, x, ref)
    spans = vision.image_spans(ids, IMG)
    assert [b - a for a, b in spans] == [o.tokens for o in ours] and ours[0].tokens != ours[1].tokens
    tower = vision.vision_tower(model)
    got = model.encode(x, model.new_cache(1, 512), images=[[(a, tower.features(o)) for (a, _), o in zip(spans, ours)]])
    assert (got - want).abs().max().item() < 1e-4
    image = vision.preprocess(imgs[0], max_soft_tokens=70)
    params = GenerationParams(max_new_tokens=16, sampler=SamplerConfig(**SAMPLER), seed=1, images=tuple(ours))
    assert generate(model, [ids], params)[0].finish_reason in ("stop", "length")
    with pytest.raises(GenerationError, match="2 image placeholder run"):
        generate(model, [ids], params.replace(images=(image,)))


def test_the_tower_follows_the_model(model):
    """A model copied (deepcopy drops the features cache and its lock) and cast: its tower follows it on next use."""
    import copy

    image = vision.preprocess(picture(150, 100, seed=70), max_soft_tokens=70)
    want = vision.vision_tower(model).features(image)
    other = copy.deepcopy(model).to(torch.bfloat16)
    tower = vision.vision_tower(other)  # moved and cast now, its cache (fp32 features) dropped
    misses = tower.misses
    got = tower.features(image)
    assert got.dtype == torch.bfloat16 and tower.misses == misses + 1
    assert vision.vision_tower(model).embed_vision.embedding_projection.weight.dtype == torch.float32
    assert (got.float() - want).abs().max().item() < 0.1  # bf16 rounding


def test_image_token_budget(ckpt, http, capsys):
    """OpenAI's `detail` (low: 70 tokens, high: up to 1120, auto: the checkpoint's default), a part's
    max_soft_tokens in Python, --image-tokens in the CLI; a bad detail is a 400 naming it."""
    from test_serve import assert_error

    from dgemma.cli import main

    img = picture(640, 480, seed=80)
    url = _data_url(img)

    def tokens(detail=None):
        part = {"url": url, **({"detail": detail} if detail else {})}
        r = http.post("/tokenize", json={"model": "eyes", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": part}]}]})
        return r.json()["tokens"].count(IMG)

    low, auto, high = tokens("low"), tokens(), tokens("high")
    assert low <= 70 < high <= 1120 and auto <= 70  # this checkpoint's default budget is 70 (its config)
    assert tokens("auto") == auto
    r = http.post("/v1/chat/completions", json={"model": "eyes", "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, "detail": "ultra"}}]}]})
    assert_error(r, 400, param="messages.0.content.0.image_url.detail")
    pipe = Pipeline.load(str(ckpt), device="cpu", quiet=True)
    _, [big] = pipe.chat_messages([{"role": "user", "content": [
        {"type": "image", "image": img, "max_soft_tokens": 1120}]}])
    assert big.tokens == high
    assert main(["generate", str(ckpt), "x", "--image-tokens", "1120", "--image", "nope.png"]) == 2  # no file
    assert main(["generate", str(ckpt), "x", "--image-tokens", "1120"]) == 2
    assert "--image-tokens goes with --image" in capsys.readouterr().err
