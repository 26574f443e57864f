"""The `dgemma` command line: real subprocesses, readable errors, no tracebacks."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from conftest import HAVE_CXX, randomize, tiny_config
from dgemma.model import DiffusionGemma
from dgemma.weights import save_model


def run(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "dgemma.cli", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "tiny"
    save_model(randomize(DiffusionGemma(tiny_config("a")), seed=1), d,
               generation_config={"max_denoising_steps": 8, "t_min": 0.4, "t_max": 0.8})
    return d


def test_info_checkpoint(ckpt):
    out = run("info", str(ckpt)).stdout
    assert "4 (2 sliding, 2 full)" in out and "max_denoising_steps 8" in out
    d = json.loads(run("info", str(ckpt), "--json").stdout)
    assert d["parameters"]["total"] == DiffusionGemma(tiny_config("a")).num_params()
    assert d["special_tokens"]["eos"] == [1, 106, 50]


def test_info_preset_real_model():
    d = json.loads(run("info", "26b-a4b", "--preset", "--json").stdout)
    assert 25.1e9 < d["parameters"]["total"] < 25.3e9  # model card: 25.2B
    assert round(d["parameters"]["active"] / 1e9, 1) == 3.8


@pytest.mark.parametrize("args,msg", [
    (("info", "/no/such/dir"), "no checkpoint directory"),
    (("info", "nope", "--preset"), "unknown preset"),
])
def test_info_errors_are_one_line(args, msg):
    p = run(*args, check=False)
    assert p.returncode == 2
    assert msg in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- generate / chat
@pytest.fixture(scope="module")
def ckpt_tok(tmp_path_factory):
    """A tiny checkpoint with a small byte-level tokenizer whose specials sit at DiffusionGemma's ids."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers

    from dgemma.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("cli") / "tiny-tok"
    cfg = tiny_config("a")
    vocab = {f"<t{i}>": i for i in range(cfg.vocab_size)}
    specials = {0: "<pad>", 1: "<eos>", 2: "<bos>", 50: "<|tool_response>", 105: "<|turn>", 106: "<turn|>"}
    byte_ids = [i for i in range(3, cfg.vocab_size) if i not in specials][:256]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    for i in list(vocab.values()):
        del vocab[f"<t{i}>"]
    for i, name in specials.items():
        vocab[name] = i
    for i, ch in zip(byte_ids, sorted(alphabet)):
        vocab[ch] = i
    used = set(vocab.values())
    for i in range(cfg.vocab_size):
        if i not in used:
            vocab[f"<unused{i}>"] = i
    backend = HFTok(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False),
                                                     pre_tokenizers.Split("", "isolated")])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(specials.values()))
    tok = Tokenizer(backend, bos_id=2, eos_ids=[1, 106, 50], pad_id=0)
    save_model(randomize(DiffusionGemma(cfg), seed=2), d, tokenizer=tok,
               generation_config={"max_denoising_steps": 4, "max_new_tokens": 32})
    return d


def test_generate_text_and_json(ckpt_tok):
    p = run("generate", str(ckpt_tok), "def f(x):", "--seed", "1", "--max-new-tokens", "20")
    assert p.stdout.strip() and "tokens" in p.stderr and "steps/canvas" in p.stderr
    j = json.loads(run("generate", str(ckpt_tok), "def f(x):", "--seed", "1", "--max-new-tokens", "20",
                       "--json").stdout)
    assert j["stats"]["completion_tokens"] == len(j["tokens"]) <= 20
    assert j["text"] == p.stdout.rstrip("\n")  # same seed, same text, streamed or not
    ar = json.loads(run("generate", str(ckpt_tok), "def f(x):", "--ar", "--max-new-tokens", "5", "--json").stdout)
    assert ar["stats"]["mode"] == "ar"


def test_chat_template_option_on_every_model_command(ckpt_tok, tmp_path):
    """--chat-template (vLLM's): a file or the template itself, on generate / chat / serve / run-batch alike."""
    from dgemma.cli import build_parser, load_pipeline

    template = "{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    msgs = [{"role": "user", "content": "hi"}]
    for command, given in (("generate", str(tmp_path / "t.jinja")), ("chat", template), ("serve", template),
                           ("run-batch", template)):
        extra = ["-i", "x", "-o", "y"] if command == "run-batch" else []
        pipe = load_pipeline(build_parser().parse_args([command, str(ckpt_tok), *extra, "--device", "cpu",
                                                        "--chat-template", given]))
        assert pipe.tokenizer.apply_chat_template(msgs) == "[user:hi]"
    p = run("generate", str(ckpt_tok), "hi", "--chat", "--chat-template", "{% if %}", check=False)
    assert p.returncode == 2 and "--chat-template: chat template does not parse" in p.stderr


def test_tokenizer_option(ckpt, ckpt_tok, tmp_path, capsys):
    """--tokenizer (vLLM's): another directory's tokenizer; a directory without one, or one larger than the model's
    vocabulary, is a one-line error."""
    from dgemma.cli import build_parser, load_pipeline, main

    assert load_pipeline(build_parser().parse_args(["generate", str(ckpt), "--device", "cpu"])).tokenizer is None
    pipe = load_pipeline(build_parser().parse_args(["generate", str(ckpt), "--device", "cpu", "--tokenizer",
                                                    str(ckpt_tok)]))
    assert pipe.tokenizer is not None and pipe.decode(pipe.encode("abc", add_bos=False)) == "abc"
    assert main(["generate", str(ckpt_tok), "hi", "--tokenizer", str(tmp_path)]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


def test_generation_config_options(ckpt_tok, tmp_path, capsys):
    """vLLM's --generation-config auto|vllm|DIR and --override-generation-config: the defaults every request of
    generate / chat / serve / run-batch starts from."""
    from dgemma.cli import build_parser, load_pipeline, main
    from dgemma.sampler import SamplerConfig

    def pipe(*argv):
        return load_pipeline(build_parser().parse_args(["serve", str(ckpt_tok), "--device", "cpu", *argv]))

    own = pipe()
    assert own.sampler != SamplerConfig()  # the test checkpoint has its own defaults
    assert pipe("--generation-config", "vllm").sampler == SamplerConfig()
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_denoising_steps": 5, "max_new_tokens": 9}))
    from_dir = pipe("--generation-config", str(tmp_path))
    assert (from_dir.sampler.max_denoising_steps, from_dir.max_new_tokens) == (5, 9)
    over = pipe("--override-generation-config", '{"max_denoising_steps": 3, "entropy_bound": 0.5, "max_new_tokens": 7}')
    assert over.sampler == own.sampler.replace(max_denoising_steps=3, entropy_bound=0.5) and over.max_new_tokens == 7
    assert over.params().sampler.max_denoising_steps == 3 and over.params(steps=4).sampler.max_denoising_steps == 4
    for flags, msg in ((["--override-generation-config", "{x"], "not valid JSON"),
                       (["--override-generation-config", '{"temperature": 0.5}'], "unknown key(s) temperature"),
                       (["--override-generation-config", '{"t_min": -1}'], "t_min"),
                       (["--override-generation-config", '{"max_new_tokens": 0}'], "positive integer"),
                       (["--generation-config", str(tmp_path / "nowhere")], "auto, vllm or a directory")):
        assert main(["generate", str(ckpt_tok), "hi", "--device", "cpu", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, err


def test_generate_with_a_prediction(ckpt_tok, tmp_path):
    """--prediction / --prediction-file: the engine's prediction (the same tokens as through Python), counted."""
    from dgemma.pipeline import Pipeline

    pipe = Pipeline.load(str(ckpt_tok), device="cpu", quiet=True)
    text = "def f(x):\n    return x\n" * 3
    (tmp_path / "pred.py").write_text(text)
    [done] = pipe.generate([pipe.encode("abc")], max_new_tokens=24, seed=1, prediction=pipe.encode(text, add_bos=False))
    for flag in (["--prediction", text], ["--prediction-file", str(tmp_path / "pred.py")]):
        j = json.loads(run("generate", str(ckpt_tok), "abc", "--max-new-tokens", "24", "--seed", "1", "--json",
                           *flag).stdout)
        assert j["tokens"] == done.tokens
        assert j["stats"]["accepted_prediction_tokens"] == done.stats["accepted_prediction_tokens"]


def test_generate_show_canvas_and_infill(ckpt_tok):
    p = run("generate", str(ckpt_tok), "abc", "--show-canvas", "--max-new-tokens", "16", "--steps", "3")
    assert "canvas 0 step 3/3" in p.stderr
    j = json.loads(run("generate", str(ckpt_tok), "x = ", "--suffix", "+ 1", "--json", "--steps", "3").stdout)
    assert j["finish_reason"] == "stop" and len(j["tokens"]) <= 16 - 3
    k = json.loads(run("generate", str(ckpt_tok), "x = [FILL]+ 1", "--infill", "--json", "--steps", "3").stdout)
    assert k["tokens"] == j["tokens"]  # the same request, spelled as a hole in the prompt


def test_chat_reads_turns_from_stdin(ckpt_tok):
    """Turns from stdin; with --prefix-cache the second turn encodes only what the first did not (thinking on:
    the next prompt extends this one, while the byte-level template's empty thought channel is longer than the
    tiny model's ring margin)."""
    p = subprocess.run([sys.executable, "-m", "dgemma.cli", "chat", str(ckpt_tok), "--max-new-tokens", "8",
                        "--prefix-cache", "--think"], input="hello\nagain\n/reset\nthird\n", capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("tokens,") == 3
    turns = [line for line in p.stderr.splitlines() if "tokens," in line]
    assert "cached" not in turns[0] and "prompt tokens cached" in turns[1], p.stderr


@pytest.mark.parametrize("extra,msg", [
    (("--steps", "0"), "max_denoising_steps must be >= 1"),
    (("--entropy-bound", "-1"), "entropy_bound must be >= 0"),
    (("--max-new-tokens", "-1"), "max_new_tokens must be a non-negative integer"),
    (("--max-new-tokens", "5000"), "exceeds the context"),
    (("--suffix", "x", "--ar"), "autoregressive infill needs fill-in-the-middle tokens"),
    (("--infill",), "mark the hole with [FILL]"),
    (("--logprobs", "21"), "logprobs must be an integer from 0 to 20"),
    (("--logit-bias", "5"), "--logit-bias takes ID=BIAS"),
    (("--ar-fallback", "-1"), "ar_fallback must be a mean entropy >= 0"),
    (("--frequency-penalty", "3"), "frequency_penalty must be a number from -2 to 2"),
    (("--logit-bias", "99999=1"), "is not a token id in the vocabulary"),
    (("--regex", "(("), "invalid regex: at 1(8): invalid regex"),
    (("--json-schema", '{"type": "nonsense"}'), "invalid json schema: Invalid type: nonsense"),
    (("--json-schema", "missing.json"), "no file 'missing.json'"),
    (("--grammar", "missing.lark"), "no file 'missing.lark'"),
    (("--prediction", "x", "--ar"), "--prediction needs diffusion decoding"),
    (("--prediction-file", "missing.txt"), "--prediction-file: cannot read missing.txt"),
])
def test_generate_errors(ckpt_tok, extra, msg, capsys):
    from dgemma.cli import main

    # In-process (the same main() the entry point runs); the subprocess test below checks the real exit path.
    assert main(["generate", str(ckpt_tok), "hi", *extra]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1, err


def test_generate_logprobs_and_logit_bias(ckpt_tok, tmp_path):
    j = json.loads(run("generate", str(ckpt_tok), "def f(x):", "--max-new-tokens", "6", "--logprobs", "2",
                       "--logit-bias", "7=100", "--json").stdout)
    assert j["tokens"] == [7] * 6 and [e["token"] for e in j["logprobs"]] == j["tokens"]
    assert all(e["entropy"] >= -1e-6 for e in j["logprobs"])
    assert all(len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["token"] == 7 for e in j["logprobs"])
    p = run("generate", str(ckpt_tok), "def f(x):", "--max-new-tokens", "4", "--logprobs", "1")
    assert "logprob  entropy  token" in p.stderr and len(p.stderr.splitlines()) >= 6
    broken = tmp_path / "broken"  # a malformed generation_config.json is one clear line, not a traceback
    shutil.copytree(ckpt_tok, broken)
    (broken / "generation_config.json").write_text("{not json")
    p = run("generate", str(broken), "hi", check=False)
    assert p.returncode == 2 and "malformed JSON in" in p.stderr and "generation_config.json" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["generate", "serve", "bench"])
def test_bad_device_is_a_usage_error(ckpt_tok, capsys, command):
    """--device names a device this machine has: anything else is argparse's one-line error, not a traceback."""
    from dgemma.cli import main

    model = [] if command == "bench" else [str(ckpt_tok)]
    for device, msg in (("tpu", "use cpu, cuda or cuda:N"), ("cuda:99", "CUDA device")):
        with pytest.raises(SystemExit) as e:
            main([command, *model, "--device", device])
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and "Traceback" not in err, err


@pytest.mark.parametrize("args", [["run-batch", "-i", "in.jsonl", "-o", "out.jsonl"],
                                  ["serve", "--batch-dir", "batches", "--port", "0"]])
def test_a_missing_serve_module_is_one_line(args, capsys, monkeypatch):
    """httpx (run-batch, the Batch API) missing: the command says which extra to install, before loading anything;
    `dgemma serve` without --batch-dir does not need it."""
    from dgemma.cli import _need_serve, main

    monkeypatch.setitem(sys.modules, "httpx", None)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "(httpx is missing): pip install 'dgemma[serve]'" in err and "\n" not in err
    _need_serve("serve", "fastapi", "uvicorn")  # no raise


@pytest.mark.parametrize("flag", ["--batch-dir", "--responses-dir"])
def test_serve_state_dirs_must_be_writable_directories(ckpt_tok, tmp_path, capsys, flag):
    """A --batch-dir or --responses-dir that cannot be a directory is one line before the model loads."""
    from dgemma.cli import main

    afile = tmp_path / "afile"
    afile.write_text("x")
    for path, msg in ((afile, "not a directory"), (afile / "sub", "cannot write there")):
        assert main(["serve", str(ckpt_tok), flag, str(path), "--port", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"{flag} {path}: {msg}" in err and "\n" not in err, err
    if flag == "--batch-dir":
        assert main(["serve", str(ckpt_tok), "--allowed-local-media-path", str(afile), "--port", "0"]) == 2
        assert "--allowed-local-media-path" in capsys.readouterr().err


def test_generate_vllm_extras(ckpt_tok, capsys):
    """--stop-token-id, --min-tokens and --repetition-penalty reach the engine; a bad value is one clear line."""
    from dgemma.cli import main

    def gen(*args):
        assert main(["generate", str(ckpt_tok), "def f(x):", "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    j = gen("--max-new-tokens", "12", "--logit-bias", "7=100", "--stop-token-id", "7")
    assert j["tokens"] == [7] and j["finish_reason"] == "stop"
    j = gen("--max-new-tokens", "12", "--logit-bias", "7=100", "--stop-token-id", "7", "--min-tokens", "3")
    assert len(j["tokens"]) == 4 and j["tokens"][-1] == 7 and 7 not in j["tokens"][:3]
    plain = gen("--max-new-tokens", "8", "--ignore-eos")["tokens"]
    assert gen("--max-new-tokens", "8", "--ignore-eos", "--repetition-penalty", "1.0")["tokens"] == plain
    assert gen("--max-new-tokens", "8", "--ignore-eos", "--repetition-penalty", "5")["tokens"] != plain
    assert main(["generate", str(ckpt_tok), "hi", "--repetition-penalty", "0"]) == 2
    err = capsys.readouterr().err
    assert "repetition_penalty must be a number > 0" in err and len(err.strip().splitlines()) == 1
    # --skip-special-tokens: the same tokens, their text without the special ones (<|turn> is 105)
    kept = gen("--max-new-tokens", "12", "--ignore-eos", "--logit-bias", "105=3")
    skip = gen("--max-new-tokens", "12", "--ignore-eos", "--logit-bias", "105=3", "--skip-special-tokens")
    assert skip["tokens"] == kept["tokens"] and 105 in kept["tokens"] and "<|turn>" in kept["text"]
    assert skip["text"] == kept["text"].replace("<|turn>", "")
    # --draft: the first canvas starts from that text (the engine's init_canvas)
    assert gen("--max-new-tokens", "8", "--ignore-eos", "--draft", "return x")["tokens"] != plain
    assert main(["generate", str(ckpt_tok), "hi", "--draft", "x", "--ar"]) == 2
    assert "--draft needs diffusion" in capsys.readouterr().err


def test_generate_structured_output(ckpt_tok, tmp_path, capsys):
    from dgemma.cli import main

    def gen(*args):  # in-process: the same main() the entry point runs, without a torch import per call
        assert main(["generate", str(ckpt_tok), "x = ", *args]) == 0
        return capsys.readouterr().out

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"k": {"enum": ["a", "b"]}}, "required": ["k"],
                                  "additionalProperties": False}))
    grammar = tmp_path / "g.lark"
    grammar.write_text('start: "(" D ")"\nD: /[0-9]/\n')
    for extra in ((), ("--ar",)):
        j = json.loads(gen("--json-schema", str(schema), "--json", *extra))
        assert json.loads(j["text"])["k"] in ("a", "b") and j["finish_reason"] == "stop"
        assert re.fullmatch(r"\([0-9]\)", gen("--grammar", str(grammar), *extra).strip())
    assert json.loads(gen("--choice", "up", "--choice", "down", "--json"))["text"] in ("up", "down")


def test_generate_empty_prompt_and_unknown_option(ckpt_tok):
    p = run("generate", str(ckpt_tok), "", check=False)
    assert p.returncode == 2 and "prompt is empty" in p.stderr
    p = run("generate", str(ckpt_tok), "hi", "--temprature", "1", check=False)
    assert p.returncode == 2 and "unrecognized arguments" in p.stderr
    p = run("generate", str(ckpt_tok), "hi", "--choice", "a", "--regex", "b", check=False)
    assert p.returncode == 2 and "not allowed with argument" in p.stderr


def test_bench_smoke(tmp_path):
    """The benchmark runs end to end (tiny settings; real figures come from `dgemma bench` itself). A vocabulary
    over one LM-head block checks that the reference path still gives transformers' tokens."""
    out = tmp_path / "b.json"
    p = run("bench", "--vocabs", "4500", "--max-new-tokens", "16", "--steps", "2", "--prompt-tokens", "8",
            "--engines", ",".join(["dgemma-diffusion", *(["dgemma-compiled"] if HAVE_CXX else []), "dgemma-reference",
                                   "transformers"]), "--out", str(out))
    assert "dgemma-diffusion" in p.stdout
    res = json.loads(out.read_text())["results"]
    ref = next(r for r in res if r["engine"] == "dgemma-reference")
    assert ref["same_tokens_as_transformers"] is True
    for compiled in (r for r in res if r["engine"] == "dgemma-compiled"):
        assert compiled["same_tokens_as_eager"] is True and compiled["compile_s"] > 0
    p = run("bench", "--vocabs", "512", "--max-new-tokens", "16", "--steps", "2", "--prompt-tokens", "8",
            "--engines", "dgemma-diffusion,dgemma-int8,dgemma-int4,dgemma-int4e,dgemma-fp8,dgemma-nvfp4", "--out",
            str(out))
    res = {r["engine"]: r for r in json.loads(out.read_text())["results"]}
    mib = [res[e]["weights_mib"] for e in ("dgemma-int4e", "dgemma-int4", "dgemma-int8", "dgemma-diffusion")]
    assert mib == sorted(mib) and len(set(mib)) == 4
    assert res["dgemma-fp8"]["weights_mib"] == res["dgemma-int8"]["weights_mib"]  # a byte and a scale per channel
    assert res["dgemma-int4"]["weights_mib"] < res["dgemma-nvfp4"]["weights_mib"] < res["dgemma-int8"]["weights_mib"]
    assert isinstance(res["dgemma-int8"]["same_tokens_as_full_precision"], bool) and "weights" in p.stdout


@pytest.mark.parametrize("args, msg", [
    (("--steps", "0"), "argument --steps: expected a positive integer, got '0'"),
    (("--repeats", "-1"), "argument --repeats: expected a positive integer"),
    (("--prompt-tokens", "x"), "argument --prompt-tokens: expected a positive integer"),
    (("--max-new-tokens", "0"), "argument --max-new-tokens: expected a positive integer"),
    (("--vocabs", "100"), "--vocabs 100: eos_token_id outside the vocabulary"),
    (("--vocabs", "8192,abc"), "--vocabs takes comma-separated integers"),
    (("--engines", "vllm"), "unknown engine(s) ['vllm']"),
])
def test_bench_errors_are_one_line(args, msg, tmp_path):
    p = run("bench", *args, "--out", str(tmp_path / "b.json"), check=False)
    assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("args, msg", [
    (("sudoku", "eval", "M", "--data", "D", "--n", "0"), "argument --n: expected a positive integer, got '0'"),
    (("sudoku", "eval", "M", "--data", "D", "--batch", "0"), "argument --batch: expected a positive integer"),
    (("sudoku", "solve", "--threads", "-1", "1" * 81), "argument --threads: expected an integer >= 0, got '-1'"),
    (("sudoku", "gen", "--out", "X", "--n", "-2"), "argument --n: expected a positive integer"),
    (("sudoku", "gen", "--out", "X", "--workers", "0"), "argument --workers: expected a positive integer"),
    (("code", "eval", "M", "--data", "D", "--steps", "0"), "argument --steps: expected a positive integer"),
    (("code", "eval", "M", "--data", "D", "--n", "many"), "argument --n: expected a positive integer, got 'many'"),
    (("code", "eval", "M", "--data", "D", "--top-p", "1.5"), "--top-p takes a probability in [0, 1]"),
])
def test_counts_and_threads_must_be_positive(args, msg):
    """Counts that once misbehaved quietly: `sudoku eval --n 0` ran every puzzle of the file and `--n -2` one,
    `--batch 0` failed inside range(), a negative `--threads` was a traceback from torch."""
    p = run(*args, check=False)
    assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_bench_engine_failure_is_reported_without_a_driver_traceback(monkeypatch, capsys, tmp_path):
    import dgemma.bench as B

    def failing(engine, ckpt, prompt, args):
        raise RuntimeError(f"{engine} failed:\nValueError: something inside the engine")

    monkeypatch.setattr(B, "_run_worker", failing)
    assert B.main(["--vocabs", "512", "--engines", "dgemma-diffusion", "--max-new-tokens", "8", "--steps", "1",
                   "--out", str(tmp_path / "b.json")]) == 1
    err = capsys.readouterr().err
    assert "dgemma bench: error: dgemma-diffusion failed" in err and "something inside the engine" in err
    assert not (tmp_path / "b.json").exists()


def test_a_reader_that_leaves_gets_no_traceback(ckpt_tok):
    # `dgemma generate ... | head -c 1`: the pipe closes before the output is written
    p = subprocess.Popen([sys.executable, "-m", "dgemma.cli", "generate", str(ckpt_tok), "abc", "--json",
                          "--max-new-tokens", "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err and "Exception ignored" not in err, err


@pytest.mark.skipif(not HAVE_CXX, reason="torch.compile (Inductor) needs a C++ compiler on the CPU")
def test_generate_compile_gives_the_same_tokens(ckpt_tok):
    args = ("generate", str(ckpt_tok), "def f(x):", "--seed", "3", "--max-new-tokens", "32", "--json")
    assert json.loads(run(*args, "--compile").stdout)["tokens"] == json.loads(run(*args).stdout)["tokens"]


def test_compile_failure_is_one_clear_line(ckpt_tok, monkeypatch, capsys):
    import dgemma.model
    from dgemma.cli import main as cli_main

    def broken():
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setattr(dgemma.model, "compiled_regions", broken)
    assert cli_main(["generate", str(ckpt_tok), "x", "--compile", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["dgemma generate: error: torch.compile failed on this machine "
                                        "(InvalidCxxCompiler: No working C++ compiler found); run without --compile"]


def test_chat_with_tools_and_thinking(tmp_path, monkeypatch, capsys):
    """`dgemma chat --tools`: a forced call is printed, its result read as the next input line, and the model
    answers; --think splits the thought off. A tokenizer without the call tokens is one clear error."""
    import io

    from dgemma.cli import main
    from dgemma.tokenizer import byte_level

    ckpt = save_model(randomize(DiffusionGemma(tiny_config("a")), seed=4), tmp_path / "tools", tokenizer=byte_level(),
                      generation_config={"max_denoising_steps": 4, "max_new_tokens": 48})
    tools = json.dumps([{"type": "function", "function": {"name": "now", "description": "The time"}}])
    monkeypatch.setattr("sys.stdin", io.StringIO("What time is it?\n12:00\n"))
    assert main(["chat", str(ckpt), "--tools", tools, "--tool-choice", "required", "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert "[tool call now({})]" in err and err.count("tokens,") >= 2  # the call, then the turn after its result
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", str(ckpt), "--think", "--max-new-tokens", "8"]) == 0
    assert main(["chat", str(ckpt), "--tool-choice", "auto"]) == 2
    assert "--tool-choice needs --tools" in capsys.readouterr().err
    assert main(["chat", str(ckpt), "--tools", "[{\"type\": \"function\", \"function\": {\"name\": \"a b\"}}]"]) == 2
    assert "1-64 letters" in capsys.readouterr().err


def test_vllm_option_names_are_aliases():
    from dgemma.cli import build_parser

    a = build_parser().parse_args(["serve", "--max-num-seqs", "3", "--max-model-len", "512",
                                   "--enable-prefix-caching", "--quantization", "int4", "--allowed-origins", '["o"]',
                                   "--uvicorn-log-level", "debug"])
    b = build_parser().parse_args(["serve", "--max-concurrency", "3", "--max-context", "512",
                                   "--prefix-cache", "--quantization", "int4", "--cors-origin", "o", "--log-level",
                                   "debug"])
    same = ("max_concurrency", "max_context", "prefix_cache", "quantization")
    assert [getattr(a, k) for k in same] == [getattr(b, k) for k in same] == [3, 512, True, "int4"]
    assert a.cors_origin == [["o"]] and b.cors_origin == ["o"] and a.uvicorn_log_level == b.log_level == "debug"
    # --served-model-name takes aliases after the name (vLLM's), --model-name one name
    from dgemma.cli import _server_settings

    for argv, names in ((["--served-model-name", "m", "n"], ("m", ("n",))), (["--model-name", "m"], ("m", ()))):
        st = _server_settings(build_parser().parse_args(["serve", *argv]))
        assert (st.model_name, st.model_aliases) == names
    import torch

    from dgemma.assets import shipped_model
    from dgemma.cli import load_pipeline

    for name, want in (("auto", torch.float32), ("float", torch.float32), ("half", torch.float16)):  # tests pin fp32
        args = build_parser().parse_args(["generate", str(shipped_model()), "x", "--dtype", name, "--device", "cpu"])
        assert load_pipeline(args).model.dtype == want, name
