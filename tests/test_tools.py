"""Tool calling (dgemma.tools): Gemma 4's declaration and call format in the chat template, parsing calls out of
generated text, and the grammar that forces a call, decoded by tiny random models (diffusion and AR): whatever
noise such a model writes, under the grammar it is a call of a declared tool whose arguments fit its schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _gemma_tok import gemma4_dir, gemma4_tok, gemma_source  # noqa: F401  (fixtures)
from conftest import randomize, tiny_config
from dgemma.generate import AR, DIFFUSION, GenerationParams, generate
from dgemma.model import DiffusionGemma
from dgemma.sampler import SamplerConfig
from dgemma.tokenizer import Tokenizer, byte_level
from dgemma.tools import ToolError, check_tokenizer, check_tools, parse_tool_calls, tool_grammar

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name", "maxLength": 5},
        "unit": {"type": "string", "enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "hourly": {"type": "boolean"}},
        "required": ["city", "unit"]}}}
NOW = {"type": "function", "function": {"name": "now", "description": "The time"}}
TOOLS = [WEATHER, NOW]
CODE_MODEL = Path(__file__).resolve().parents[1] / "dgemma" / "models" / "code"


@pytest.fixture(scope="module")
def tok():
    return byte_level(320)


@pytest.fixture(scope="module")
def model():
    return randomize(DiffusionGemma(tiny_config("a", vocab_size=320)), seed=3).eval()


# ---------------------------------------------------------------- the chat template
def test_template_declares_tools_and_renders_calls_and_results(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris?"}]
    declared = ('<bos><|turn>system\nBe brief.<|tool>declaration:get_weather{description:<|"|>Current weather<|"|>,'
                'parameters:{properties:{city:{description:<|"|>City name<|"|>,type:<|"|>STRING<|"|>},'
                'days:{type:<|"|>INTEGER<|"|>},hourly:{type:<|"|>BOOLEAN<|"|>},'
                'unit:{enum:[<|"|>c<|"|>,<|"|>f<|"|>],type:<|"|>STRING<|"|>}},'
                'required:[<|"|>city<|"|>,<|"|>unit<|"|>],type:<|"|>OBJECT<|"|>}}<tool|>'
                '<|tool>declaration:now{description:<|"|>The time<|"|>}<tool|><turn|>\n'
                '<|turn>user\nParis?<turn|>\n')
    assert tok.apply_chat_template(messages, tools=TOOLS) == declared + "<|turn>model\n<|channel>thought\n<channel|>"
    # A call (arguments as OpenAI's JSON text), its result, and the answer after it, in one model turn.
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"unit": "c", "city": "Paris", "days": 2, '
                                                             '"extra": {"a": [true, null, 1.5]}}'}}
    messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    after_call = (declared + '<|turn>model\n<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2,'
                  'extra:{a:[true,null,1.5]},unit:<|"|>c<|"|>}<tool_call|>'
                  '<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>')
    assert tok.apply_chat_template(messages, tools=TOOLS) == after_call  # the model goes on in the same turn
    messages += [{"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Thanks"}]
    assert tok.apply_chat_template(messages, tools=TOOLS) == (
        after_call + "Sunny.<turn|>\n<|turn>user\nThanks<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
    # Without tools the prompt is what it always was.
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<bos><|turn>user\nhi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"


def test_a_checkpoints_own_template_receives_the_tools():
    tok = byte_level(320)
    tok.chat_template = "{{ bos_token }}{{ tools | length }} tools: {{ tools[0].function.name }}"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tools=TOOLS) == "<bos>2 tools: get_weather"


def test_message_checks(tok):
    with pytest.raises(ValueError, match="only assistant messages"):
        tok.apply_chat_template([{"role": "user", "content": "x", "tool_calls": []}])
    with pytest.raises(ValueError, match="not valid JSON"):
        tok.apply_chat_template([{"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{nope"}}]}])
    with pytest.raises(ValueError, match="must be a JSON object"):
        tok.apply_chat_template([{"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "[1]"}}]}])
    with pytest.raises(ValueError, match="'name'"):
        tok.apply_chat_template([{"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]}])


# ---------------------------------------------------------------- checks and parsing
@pytest.mark.parametrize("tools,match", [
    ([], "non-empty list"),
    ([{"type": "code_interpreter"}], r"tools\[0\] must be"),
    ([{"type": "function", "function": {"name": "a b"}}], "1-64 letters"),
    ([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}],
     "declared twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "type object"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], "description"),
])
def test_bad_tools(tools, match):
    with pytest.raises(ToolError, match=match):
        check_tools(tools)


def test_tokenizer_without_call_tokens_is_refused(tok):
    check_tokenizer(tok)
    with pytest.raises(ToolError, match="no <\\|tool_call>, <tool_call\\|>"):
        check_tokenizer(Tokenizer.from_dir(CODE_MODEL))  # the shipped code model never saw tool calls


def test_parse_tool_calls():
    text = ('Checking.<|tool_call>call:get_weather{city:<|"|>Paris, "FR" {x}<|"|>,days:2,r:-1.5e3,'
            'opts:{a:[true,false,null],<|"|>odd key<|"|>:x}}<tool_call|><|tool_call>call:now{}<tool_call|>')
    content, calls = parse_tool_calls(text, ["get_weather", "now"])
    assert content == "Checking." and [c.name for c in calls] == ["get_weather", "now"]
    assert json.loads(calls[0].arguments) == {"city": 'Paris, "FR" {x}', "days": 2, "r": -1500.0,
                                              "opts": {"a": [True, False, None], "odd key": "x"}}
    assert json.loads(calls[1].arguments) == {} and calls[0].id != calls[1].id
    assert calls[0].openai()["type"] == "function"
    # Unknown tools and blocks that do not parse stay in the content as written; plain text has no calls.
    for text in ['<|tool_call>call:rm{a:1}<tool_call|>', '<|tool_call>call:now{a:<|"|>x}<tool_call|>',
                 '<|tool_call>call:now{a:1<tool_call|>', '<|tool_call>call:now{a:1}', "just text"]:
        assert parse_tool_calls(text, ["now"]) == (text, [])


# ---------------------------------------------------------------- the grammar
def test_grammar_holds_calls_to_the_schemas(tok):
    g = tool_grammar(check_tools(TOOLS), tok)
    good = ['<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,unit:<|"|>c<|"|>}<tool_call|>',
            '<|tool_call>call:get_weather{city:<|"|><|"|>,days:7,hourly:false,unit:<|"|>f<|"|>}<tool_call|>',
            '<|tool_call>call:now{}<tool_call|><|tool_call>call:now{}<tool_call|>']
    bad = ['<|tool_call>call:get_weather{unit:<|"|>c<|"|>}<tool_call|>',  # city is required
           '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,unit:<|"|>k<|"|>}<tool_call|>',  # not in the enum
           '<|tool_call>call:get_weather{city:<|"|>Lyon<|"|>,days:8,unit:<|"|>c<|"|>}<tool_call|>',  # above maximum
           '<|tool_call>call:get_weather{city:<|"|>Berlin<|"|>,unit:<|"|>c<|"|>}<tool_call|>',  # over maxLength
           '<|tool_call>call:get_weather{unit:<|"|>c<|"|>,city:<|"|>Rome<|"|>}<tool_call|>',  # keys out of order
           '<|tool_call>call:rm{}<tool_call|>', "hello"]
    assert all(g.accepts(tok, t) for t in good)
    assert not any(g.accepts(tok, t) for t in bad)
    one = tool_grammar(check_tools(TOOLS), tok, name="now", parallel=False)
    assert one.accepts(tok, "<|tool_call>call:now{}<tool_call|>")
    assert not one.accepts(tok, "<|tool_call>call:now{}<tool_call|><|tool_call>call:now{}<tool_call|>")
    with pytest.raises(ToolError, match="no tool named"):
        tool_grammar(check_tools(TOOLS), tok, name="rm")


@pytest.mark.parametrize("mode", [DIFFUSION, AR])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_models_call_declared_tools_with_valid_arguments(model, tok, mode, seed):
    tools = check_tools(TOOLS)
    grammar = tool_grammar(tools, tok, name="get_weather" if seed == 2 else None, parallel=seed != 1)
    prompt = tok.encode_chat([{"role": "user", "content": "Weather in Paris?"}], tools=tools)
    params = GenerationParams(max_new_tokens=96, sampler=SamplerConfig(max_denoising_steps=4), seed=seed, mode=mode,
                              grammar=grammar, ar_temperature=1.0)
    [done] = generate(model, [prompt], params, tokenizer=tok)
    assert done.finish_reason == "stop", done.text
    content, calls = parse_tool_calls(done.text, ["get_weather", "now"])
    assert content == "" and calls and (seed != 1 or len(calls) == 1)
    for call in calls:
        args = json.loads(call.arguments)
        if call.name == "now":
            assert args == {}
            continue
        assert set(args) >= {"city", "unit"} and set(args) <= {"city", "unit", "days", "hourly"}
        assert isinstance(args["city"], str) and len(args["city"]) <= 5 and args["unit"] in ("c", "f")
        assert args.get("days", 1) in range(1, 8) and args.get("hourly", True) in (True, False)
    assert seed != 2 or {c.name for c in calls} == {"get_weather"}


def test_a_stream_sends_the_text_before_a_call_and_the_call_whole(tok):
    """The server's per-choice assembly ("auto"): text streams until a call starts; at the end the call is cut out
    of the content and returned as a tool call."""
    pytest.importorskip("fastapi")
    from dgemma.generate import Commit, Done
    from dgemma.serve.completions import Choice, tool_call_deltas

    c = Choice(index=0, prompt=[2], params=None, seed=0, max_tokens=99, tool_names=["now"])
    text = "Let me look.<|tool_call>call:now{}<tool_call|>"
    ids = tok.encode(text)
    sent = []
    for k in range(0, len(ids), 5):
        c.commit(Commit(request=0, canvas=0, tokens=ids[k:k + 5], steps=1))
        sent.append(c.delta(tok))
    assert "".join(sent) == "Let me look."
    rest = c.finish(tok, Done(request=0, tokens=ids, text=text, finish_reason="stop", stats={}))
    assert rest == "" and c.text == "Let me look." and c.finish_reason == "tool_calls"
    [delta] = tool_call_deltas(c)
    assert delta["index"] == 0 and delta["function"] == {"name": "now", "arguments": "{}"}


def test_thought_channel_is_split_from_the_answer():
    from dgemma.tokenizer import split_thought

    assert split_thought("Hello") == (None, "Hello", True)
    assert split_thought("<|channel>thought\nPlan: greet.<channel|>Hello") == ("Plan: greet.", "Hello", True)
    assert split_thought("<|channel>thought\nPlan") == ("Plan", "", False)  # still thinking
    for head in ("<|chan", "<|channel>", "<|channel>thou"):  # could still be the channel's header
        assert split_thought(head) == ("", "", False)


def test_a_stream_with_thinking_sends_the_thought_as_reasoning(tok):
    pytest.importorskip("fastapi")
    from dgemma.generate import Commit, Done
    from dgemma.serve.completions import Choice

    c = Choice(index=0, prompt=[2], params=None, seed=0, max_tokens=99, tool_names=["now"], thinking=True)
    text = "<|channel>thought\nThe user wants the time.<channel|>Sure.<|tool_call>call:now{}<tool_call|>"
    ids = tok.encode(text)
    thought, content = [], []
    for k in range(0, len(ids), 3):
        c.commit(Commit(request=0, canvas=0, tokens=ids[k:k + 3], steps=1))
        thought.append(c.reasoning_delta(tok))
        content.append(c.delta(tok))
    assert "".join(thought) == "The user wants the time." and "".join(content) == "Sure."
    c.finish(tok, Done(request=0, tokens=ids, text=text, finish_reason="stop", stats={}))
    assert c.reasoning == "The user wants the time." and c.text == "Sure." and [t.name for t in c.tool_calls] == ["now"]


def test_with_thinking_a_forced_call_may_follow_a_thought(tok):
    tools = check_tools(TOOLS)
    thinking = tool_grammar(tools, tok, thinking=True)
    call = "<|tool_call>call:now{}<tool_call|>"
    assert thinking.accepts(tok, "<|channel>thought\nThe user asks the time.<channel|>" + call)
    assert thinking.accepts(tok, call)
    assert not tool_grammar(tools, tok).accepts(tok, "<|channel>thought\nx<channel|>" + call)


def test_the_real_gemma_vocabulary(gemma4_tok):
    """Gemma's 262,144-token tokenizer: the template's call syntax encodes to the single control tokens, and the
    grammar (byte-fallback pieces, the real special tokens) accepts a call and refuses text."""
    tok = gemma4_tok
    call = '<|tool_call>call:get_weather{city:<|"|>Köln<|"|>,days:3,unit:<|"|>c<|"|>}<tool_call|>'
    ids = tok.encode(call)
    assert ids[0] == tok.token_to_id("<|tool_call>") == 48 and ids[-1] == 49 and ids.count(52) == 4
    g = tool_grammar(check_tools(TOOLS), tok, parallel=False)
    assert g.accepts(tok, call) and not g.accepts(tok, "It is sunny.")
    assert parse_tool_calls(tok.decode(ids), ["get_weather"])[1][0].arguments == \
        '{"city": "Köln", "days": 3, "unit": "c"}'


def test_pipeline_chat_reads_a_turn_back(model, tok):
    """`Pipeline.chat`: a forced call comes back parsed, its message goes into the conversation with the tool's
    result, and the next turn runs; "none" and no tools give plain text; a bad tool choice is a clear error."""
    from dgemma.generate import GenerationError
    from dgemma.pipeline import Pipeline

    pipe = Pipeline(model, tok, {"max_denoising_steps": 4, "max_new_tokens": 96})
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    reply = pipe.chat(ask, tools=TOOLS, tool_choice="get_weather", parallel_tool_calls=False, seed=1)
    assert reply.finish_reason == "tool_calls" and [c.name for c in reply.tool_calls] == ["get_weather"]
    assert set(json.loads(reply.tool_calls[0].arguments)) >= {"city", "unit"}
    history = ask + [reply.message(), {"role": "tool", "tool_call_id": reply.tool_calls[0].id, "content": "sunny"}]
    after = pipe.chat(history, tools=TOOLS, seed=1, max_new_tokens=8)
    assert after.done.stats["prompt_tokens"] == len(pipe.encode_chat(history, tools=TOOLS))
    plain = pipe.chat(ask, seed=1, max_new_tokens=8)
    assert pipe.chat(ask, tools=TOOLS, tool_choice="none", seed=1, max_new_tokens=8).content == plain.content
    with pytest.raises(GenerationError, match="no tool named"):
        pipe.chat(ask, tools=TOOLS, tool_choice="rm")
