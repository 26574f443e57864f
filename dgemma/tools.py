"""Tool calling (OpenAI's `tools`): Gemma 4's call format, read out of generated text, and a grammar that forces it.

Gemma 4 declares tools in the system turn and writes a call as special tokens around a compact argument syntax:

    <|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3,metric:true}<tool_call|>

Keys are bare, strings are quoted by the `<|"|>` token (so they need no escapes), numbers, `true`, `false` and
`null` are bare, and objects and arrays nest as `{k:v,...}` and `[v,...]`. The model then ends its turn with
`<|tool_response>`, one of its EOS tokens, handing control to whoever runs the tool. The chat template renders the
declarations, earlier calls and their results (tokenizer.py); this module does the rest:

- `check_tools` validates an OpenAI `tools` list; `check_tokenizer` that the tokenizer has the call tokens.
- `parse_tool_calls` splits generated text into its content and its calls, each call's arguments as JSON text.
  A block that does not parse, or names a tool that was not declared, stays in the content as it was written.
- `tool_grammar` is the grammar of one call (or several, `parallel`) of the declared tools, each function's
  arguments held to its JSON schema: keys in sorted order (as the template renders them), required keys present,
  values of the declared types. With `tool_choice: "required"` or a named function the output is decoded under it
  (structured.py), so it is a well-formed call however weak the model; `"auto"` lets the model choose and parses
  what it wrote.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .structured import Grammar
from .tokenizer import split_thought

TOOL_CALL, TOOL_CALL_END, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
CALL_TOKENS = (TOOL_CALL, TOOL_CALL_END, QUOTE)
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_BLOCK = re.compile(re.escape(TOOL_CALL) + r"\s*call:\s*([A-Za-z0-9_.-]+)\s*(\{.*?)" + re.escape(TOOL_CALL_END),
                    re.DOTALL)


class ToolError(ValueError):
    """A tools list, tool choice or tokenizer that tool calling cannot work with."""


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object's text, as OpenAI's `function.arguments`

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


# ---------------------------------------------------------------- checks
def check_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI's `tools` ([{"type": "function", "function": {"name", "description"?, "parameters"?}}]), checked;
    returns them as dicts. A ToolError names the first thing wrong."""
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)) or not tools:
        raise ToolError("tools must be a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    out, names = [], set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function" \
                or not isinstance(tool.get("function"), Mapping):
            raise ToolError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        f = tool["function"]
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ToolError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
        if name in names:
            raise ToolError(f"tools[{i}].function.name {name!r} is declared twice")
        names.add(name)
        if f.get("description") is not None and not isinstance(f["description"], str):
            raise ToolError(f"tools[{i}].function.description must be a string")
        params = f.get("parameters")
        if params is not None and (not isinstance(params, Mapping)
                                   or params.get("type", "object") != "object"):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema of type object")
        if params is not None:
            _check_schema(params, f"tools[{i}].function.parameters")
        out.append({"type": "function", "function": dict(f)})
    return out


def _check_schema(s: Any, where: str) -> None:
    """The parts of a JSON schema the template and the call grammar read, checked for their types."""
    if not isinstance(s, Mapping):
        raise ToolError(f"{where} must be a JSON schema (an object)")
    checks = {"properties": Mapping, "required": list, "enum": list, "anyOf": list, "oneOf": list, "items": Mapping,
              "description": str}
    for key, kind in checks.items():
        if key in s and s[key] is not None and not isinstance(s[key], kind):
            raise ToolError(f"{where}.{key} must be {'an object' if kind is Mapping else 'a ' + kind.__name__}")
    if not all(isinstance(k, str) for k in s.get("required") or []):
        raise ToolError(f"{where}.required must list property names")
    if "type" in s and not isinstance(s["type"], (str, list)):
        raise ToolError(f"{where}.type must be a string or a list of them")
    for key, sub in (s.get("properties") or {}).items():
        _check_schema(sub, f"{where}.properties.{key}")
    if isinstance(s.get("items"), Mapping):
        _check_schema(s["items"], f"{where}.items")
    for key in ("anyOf", "oneOf"):
        for k, sub in enumerate(s.get(key) or []):
            _check_schema(sub, f"{where}.{key}[{k}]")


def check_tokenizer(tokenizer) -> None:
    """Tool calls need Gemma 4's call tokens as single tokens (a model that never saw them cannot call tools)."""
    missing = [t for t in CALL_TOKENS if tokenizer is None or tokenizer.token_to_id(t) is None]
    if missing:
        raise ToolError(f"this model's tokenizer has no {', '.join(missing)} token(s): tool calling needs Gemma 4's "
                        "call tokens")


def tool_names(tools: Sequence[Mapping[str, Any]]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def tool_setup(tools: Sequence[Any], choice: str, tokenizer, *, parallel: bool = True, thinking: bool = False
               ) -> tuple[list | None, list[str] | None, Grammar | None]:
    """(tools for the chat template, the names a reply may call, the grammar that forces a call) for a tool_choice
    of "none" (the tools are left out of the prompt and nothing is parsed), "auto", "required" (one call, or
    several when `parallel`) or a tool's name (one call of it). ToolError names what cannot be done."""
    tools = check_tools(tools)
    if choice == "none":
        return None, None, None
    check_tokenizer(tokenizer)
    if choice == "auto":
        return tools, tool_names(tools), None
    named = None if choice == "required" else choice
    return tools, tool_names(tools), tool_grammar(tools, tokenizer, name=named, parallel=parallel and named is None,
                                                  thinking=thinking)


def read_reply(text: str, finish_reason: str, *, thinking: bool = False, names: Sequence[str] | None = None,
               parallel: bool = True) -> tuple[str | None, str, list[ToolCall], str]:
    """(thought, content, tool calls, finish reason) of a finished chat reply: the thought channel split off
    (`thinking`), the calls of the tools `names` parsed out (one at most unless `parallel`), and "tool_calls" as
    the finish reason of a reply that ended by itself with calls."""
    thought = None
    if thinking:
        thought, text, _ = split_thought(text)
    content, calls = parse_tool_calls(text, names) if names is not None else (text, [])
    if not calls:
        return thought, text, [], finish_reason
    reason = "tool_calls" if finish_reason == "stop" else finish_reason
    return thought, content, calls if parallel else calls[:1], reason


# ---------------------------------------------------------------- parsing
def parse_tool_calls(text: str, names: Sequence[str] | None = None) -> tuple[str, list[ToolCall]]:
    """(content, calls) of generated text. Each well-formed call block of a declared tool (any name when `names`
    is None) becomes a ToolCall with JSON arguments and is cut out of the content; anything else stays as written.
    The content is stripped of the whitespace the cuts leave at its ends."""
    calls, kept, pos = [], [], 0
    for m in _BLOCK.finditer(text):
        name = m.group(1)
        if names is not None and name not in names:
            continue
        try:
            args, end = _value(m.group(2), 0)
            if end != len(m.group(2).rstrip()) or not isinstance(args, dict):
                raise ValueError("trailing text after the arguments")
        except ValueError:
            continue
        kept.append(text[pos:m.start()])
        pos = m.end()
        calls.append(ToolCall(id="call_" + uuid.uuid4().hex[:24], name=name,
                              arguments=json.dumps(args, ensure_ascii=False)))
    kept.append(text[pos:])
    return "".join(kept).strip() if calls else text, calls


def _skip(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t\r\n":
        i += 1
    return i


def _value(s: str, i: int) -> tuple[Any, int]:
    """One Gemma value at s[i:]: (the value, the index after it). ValueError where it does not parse."""
    i = _skip(s, i)
    if s.startswith(QUOTE, i):
        end = s.find(QUOTE, i + len(QUOTE))
        if end < 0:
            raise ValueError("unterminated string")
        return s[i + len(QUOTE):end], end + len(QUOTE)
    if i < len(s) and s[i] in "{[":
        close, out = ("}", {}) if s[i] == "{" else ("]", [])
        i = _skip(s, i + 1)
        if s.startswith(close, i):
            return out, i + 1
        while True:
            if close == "}":
                if s.startswith(QUOTE, i):
                    key, i = _value(s, i)
                else:
                    colon = s.find(":", i)
                    if colon < 0:
                        raise ValueError("a key without a value")
                    key, i = s[i:colon].strip().strip('"'), colon
                i = _skip(s, i)
                if not s.startswith(":", i):
                    raise ValueError("a key without ':'")
                out[key], i = _value(s, i + 1)
            else:
                item, i = _value(s, i)
                out.append(item)
            i = _skip(s, i)
            if s.startswith(close, i):
                return out, i + 1
            if not s.startswith(",", i):
                raise ValueError(f"expected ',' or {close!r}")
            i += 1
    m = re.compile(r"[^,}\]]*").match(s, i)
    word = m.group(0).strip()
    if not word:
        raise ValueError("an empty value")
    literals = {"true": True, "false": False, "null": None, "None": None, "True": True, "False": False}
    if word in literals:
        return literals[word], m.end()
    if word.startswith('"'):
        try:
            return json.loads(word), m.end()
        except json.JSONDecodeError:
            pass
    try:
        number = json.loads(word)
        if isinstance(number, (int, float)):
            return number, m.end()
    except json.JSONDecodeError:
        pass
    return word, m.end()  # a bare word: a string the model left unquoted


# ---------------------------------------------------------------- grammar
_NUMERIC = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def _regex(pattern: str) -> str:
    """A JSON schema's `pattern` inside a Lark /regex/: its slashes escaped."""
    return re.sub(r"(?<!\\)/", r"\/", pattern)


_NUMBER = r"/-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/"


class _Lark:
    """Builds a Lark grammar (llguidance's dialect) for Gemma values held to JSON schemas."""

    def __init__(self, tokenizer):
        ids = {t: tokenizer.token_to_id(t) for t in CALL_TOKENS}
        self.call, self.end, self.q = (f"<[{ids[t]}]>" for t in CALL_TOKENS)
        self.rules: list[str] = []
        self.n = 0

    def rule(self, body: str) -> str:
        self.n += 1
        name = f"r{self.n}"
        self.rules.append(f"{name}: {body}")
        return name

    def generic(self) -> str:
        if not any(r.startswith("gvalue:") for r in self.rules):
            self.rules += ['gvalue: gstr | NUMBER | "true" | "false" | "null" | gobj | garr',
                           f"gstr: {self.q} STR {self.q}",
                           "gobj: \"{\" (gpair (\",\" gpair)*)? \"}\"",
                           "gpair: KEY \":\" gvalue",
                           "garr: \"[\" (gvalue (\",\" gvalue)*)? \"]\"",
                           r"KEY: /[A-Za-z_][A-Za-z0-9_]*/",
                           f"NUMBER: {_NUMBER}",
                           "STR: /(?s:.*)/"]
        return "gvalue"

    def literal(self, v: Any) -> str:
        if isinstance(v, str):
            self.generic()
            return f"{self.q} {json.dumps(v)} {self.q}"
        return json.dumps(json.dumps(v))  # true / false / null / a number, as a quoted Lark literal

    def schema(self, s: Any) -> str:
        """A rule (or inline expression) for values valid against schema `s`."""
        if not isinstance(s, Mapping):
            return self.generic()
        alts = [s[k] for k in ("anyOf", "oneOf") if isinstance(s.get(k), list)]
        if alts:
            return "(" + " | ".join(self.schema(x) for x in alts[0]) + ")"
        if isinstance(s.get("enum"), list) and s["enum"]:
            return "(" + " | ".join(self.literal(v) for v in s["enum"]) + ")"
        if "const" in s:
            return self.literal(s["const"])
        kinds = s.get("type")
        kinds = [kinds] if isinstance(kinds, str) else list(kinds) if isinstance(kinds, list) else []
        if s.get("nullable") and "null" not in kinds and kinds:
            kinds.append("null")
        if not kinds:
            return self.generic()
        return "(" + " | ".join(self._typed(k, s) for k in kinds) + ")"

    def _typed(self, kind: str, s: Mapping) -> str:
        if kind == "string":
            self.generic()
            if isinstance(s.get("pattern"), str):
                body = s["pattern"].removeprefix("^").removesuffix("$")
                return f"{self.q} /{_regex(body)}/ {self.q}"
            lo, hi = s.get("minLength"), s.get("maxLength")
            if isinstance(lo, int) or isinstance(hi, int):
                return f"{self.q} /(?s:.{{{lo or 0},{hi if isinstance(hi, int) else ''}}})/ {self.q}"
            return "gstr"
        if kind in ("integer", "number"):  # bare JSON numbers: llguidance holds them to the schema's bounds
            bounds = {k: s[k] for k in _NUMERIC if isinstance(s.get(k), (int, float)) and not isinstance(s[k], bool)}
            return self.rule(f"%json {json.dumps({'type': kind, **bounds})}")
        if kind == "boolean":
            return '("true" | "false")'
        if kind == "null":
            return '"null"'
        if kind == "array":
            item = self.schema(s.get("items")) if isinstance(s.get("items"), Mapping) else self.generic()
            return self.rule(f'"[" ({item} ("," {item})*)? "]"')
        if kind == "object":
            return self.object(s)
        return self.generic()

    def object(self, s: Mapping) -> str:
        """`{k:v,...}` with the schema's properties in sorted key order, required ones present."""
        props = s.get("properties")
        if not isinstance(props, Mapping) or not props:
            self.generic()
            return "gobj"
        required = set(s.get("required") or [])
        keys = sorted(props)
        values = {k: self.schema(props[k]) for k in keys}
        tails: dict[tuple[int, bool], str] = {}

        def tail(j: int, first: bool) -> str:  # the keys from j on; a comma before each but the object's first
            if j == len(keys):
                return ""
            if (j, first) not in tails:
                after = tail(j + 1, False)
                take = f'{json.dumps(("" if first else ",") + keys[j] + ":")} {values[keys[j]]} {after}'.strip()
                body = take if keys[j] in required else f'{take} | {tail(j + 1, first) or chr(34) * 2}'
                tails[j, first] = self.rule(body)
            return tails[j, first]

        return self.rule(f'"{{" {tail(0, True)} "}}"')

    def text(self, start: str) -> str:
        return "\n".join([f"start: {start}", *self.rules]) + "\n"


def tool_grammar(tools: Sequence[Mapping[str, Any]], tokenizer, *, name: str | None = None,
                 parallel: bool = True, thinking: bool = False) -> Grammar:
    """The grammar of calls to `tools` (only to `name` when given): one call, or one or more when `parallel`.
    `thinking`: the calls may follow a thought channel (`<|channel>thought\n...<channel|>`), free text, as a reply
    with thinking on begins."""
    check_tokenizer(tokenizer)
    g = _Lark(tokenizer)
    fns = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not fns:
        raise ToolError(f"no tool named {name!r} is declared")
    alternatives = []
    for f in fns:
        params = f.get("parameters") or {}
        no_args = "properties" in params and not params["properties"]
        args = '"{}"' if not params or no_args else g.object(params)
        alternatives.append(f'{json.dumps(f["name"])} {args}')
    call = g.rule(f'{g.call} "call:" ({" | ".join(alternatives)}) {g.end}')
    grammar = Grammar("tool_call", Grammar.lark(g.text(f"{call}+" if parallel else call)).source)
    return grammar.after_thought(tokenizer) if thinking else grammar
