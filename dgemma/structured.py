"""Structured output: decode under a grammar (a JSON schema, any JSON object, a regular expression, a Lark
grammar, or a choice of strings), so that the text is guaranteed to match it.

A grammar is checked left to right, token by token; a diffusion canvas is denoised everywhere at once. The engine
joins the two at acceptance (`Engine._grammar_walk` in generate.py): each denoising step samples every position as
usual, then walks the canvas from its *frontier* (the first position not yet committed) to the right, masking each
position's logits to the tokens the grammar allows after the ones before it, and commits that run of positions while
their entropies stay within the step's EntropyBound budget (at least one per step). Committed positions are one-hot
from then on: the model sees them as certain, its self-conditioning carries them, and the positions after the
frontier keep denoising freely as the draft the next steps refine. The last budgeted step of a canvas commits all of
it. Tokens the grammar forces (a JSON key, a closing brace) have zero entropy, so they cost nothing: runs of them are
committed in one step. When the grammar is complete only EOS may follow, and the rest of the canvas is EOS.

Matching is done by llguidance (Microsoft's Rust grammar engine, one of vLLM's structured-output backends), which
reads the tokenizer.json itself, so token boundaries (a `",` token, a byte-fallback piece) are handled exactly.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .tokenizer import THOUGHT_CLOSE, THOUGHT_OPEN


class GrammarError(ValueError):
    """A grammar that cannot be compiled (a bad schema, regex or Lark text), or no grammar engine installed."""


def _llg():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a core dependency; only a broken install lacks it
        raise GrammarError("structured output needs the llguidance package: pip install llguidance") from None
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """What the output must match. Build one with a classmethod; `source` is llguidance's grammar (a JSON string)."""

    kind: str
    source: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> Grammar:
        """Any JSON value valid against a JSON schema (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
        try:
            # One line, ", " and ": " between items, no other whitespace: the model's own spacing choices would
            # spend entropy on nothing, and free whitespace lets a weak model pad the canvas with blanks.
            return cls("json_schema", _llg().LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}))
        except (ValueError, TypeError) as e:
            raise GrammarError(f"invalid JSON schema: {e}") from None

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
        g = cls.json_schema({"type": "object"})
        return cls("json_object", g.source)

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        """Text matching a regular expression, whole (Rust `regex` syntax, as in vLLM's `structured_outputs`)."""
        if not isinstance(pattern, str) or not pattern:
            raise GrammarError("a regex must be a non-empty string")
        return cls("regex", _llg().LLMatcher.grammar_from_regex(pattern))

    @classmethod
    def lark(cls, text: str) -> Grammar:
        """Text in the language of a Lark grammar (llguidance's dialect; its start rule is `start`)."""
        if not isinstance(text, str) or not text.strip():
            raise GrammarError("a Lark grammar must be a non-empty string")
        return cls("lark", _llg().LLMatcher.grammar_from_lark(text))

    @classmethod
    def choice(cls, options: Sequence[str]) -> Grammar:
        """Exactly one of the given strings."""
        if isinstance(options, str) or not options or any(not isinstance(o, str) or not o for o in options):
            raise GrammarError("a choice must be a non-empty list of non-empty strings")
        # JSON string literals are Lark string literals (the same escapes), whatever the options hold.
        alternatives = " | ".join(json.dumps(o, ensure_ascii=True) for o in dict.fromkeys(options))
        return cls("choice", _llg().LLMatcher.grammar_from_lark(f"start: {alternatives}\n"))

    def check(self, tokenizer) -> None:
        """Compile the grammar against a tokenizer; a GrammarError says what is wrong with it. A grammar that
        compiled once for a tokenizer is not compiled again for it (a request is checked several times)."""
        ll = ll_tokenizer(tokenizer)
        if self.__dict__.get("_checked") is ll:
            return
        matcher = _llg().LLMatcher(ll, self.source, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"invalid {self.kind.replace('_', ' ')}: {_one_line(matcher.get_error())}")
        matcher.compute_bitmask()  # with no token that can begin it, llguidance stops at once (EOS only)
        if matcher.is_stopped() and not matcher.is_accepting():
            raise GrammarError(f"no token of this model's tokenizer can begin text that matches the "
                               f"{self.kind.replace('_', ' ')}")
        self.__dict__["_checked"] = ll  # not a field: equality and hashing ignore it

    def after_thought(self, tokenizer) -> Grammar:
        """This grammar after an optional thought channel, free text (`<|channel>thought\n...<channel|>`): how a
        Gemma 4 reply begins with thinking on, so the model thinks first and the grammar holds the answer, as vLLM
        applies a grammar once reasoning ends. A tokenizer without the channel tokens gets the grammar unchanged."""
        ids = [tokenizer.token_to_id(t) for t in (THOUGHT_OPEN, THOUGHT_CLOSE)]
        if None in ids:
            return self
        try:
            grammars = json.loads(self.source)["grammars"]
        except (json.JSONDecodeError, TypeError, KeyError):  # llguidance gives a Lark grammar as its text
            grammars = [{"lark_grammar": self.source}]
        name = grammars[0].get("name") or "answer"
        head = (f"start: thought? @{name}\n"
                f'thought: <[{ids[0]}]> "thought\\n" THOUGHT <[{ids[1]}]>\n'
                "THOUGHT: /(?s:.*)/\n")
        return Grammar(self.kind, json.dumps({"grammars": [{"lark_grammar": head}, dict(grammars[0], name=name),
                                                           *grammars[1:]]}))

    def accepts(self, tokenizer, text: str) -> bool:
        """Whether `text`, as `tokenizer` encodes it, matches the whole grammar."""
        m = self.matcher(tokenizer, tokenizer.vocab_size)
        try:
            for t in tokenizer.encode(text):
                m.consume(t)
        except GrammarError:
            return False
        return m.accepting

    def matcher(self, tokenizer, vocab: int) -> Matcher:
        return Matcher(self, tokenizer, vocab)


def _one_line(message: str) -> str:
    """llguidance's error on one line: its first line and any `error:` line, without the source excerpts and
    carets it draws under them."""
    lines = message.strip().splitlines() or [""]
    return " ".join([lines[0].strip()] + [x.strip() for x in lines[1:] if x.strip().startswith("error:")])


_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def ll_tokenizer(tokenizer):
    """llguidance's view of a dgemma Tokenizer, built once per tokenizer (about 3 s at Gemma's 262,144 tokens,
    milliseconds for small vocabularies) and kept as long as the tokenizer lives."""
    with _LOCK:
        ll = _TOKENIZERS.get(tokenizer)
        if ll is None:
            llg = _llg()
            try:
                ll = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size,
                                     eos_token=sorted(tokenizer.eos_ids))
            except ValueError as e:  # e.g. "can't determine decoder type": a word-level or WordPiece vocabulary
                raise GrammarError("structured output needs a byte-level BPE or byte-fallback (SentencePiece) "
                                   f"tokenizer, as Gemma's and the shipped models' are; this one is neither ({e})"
                                   ) from None
            _TOKENIZERS[tokenizer] = ll
        return ll


_SHIFTS = torch.arange(8, dtype=torch.uint8)


class Matcher:
    """One row's position in a grammar: which tokens may come next, and the tokens taken so far."""

    def __init__(self, grammar: Grammar, tokenizer, vocab: int):
        self.grammar = grammar
        self.vocab = vocab
        self._m = _llg().LLMatcher(ll_tokenizer(tokenizer), grammar.source, log_level=0)
        if self._m.is_error():
            raise GrammarError(f"invalid {grammar.kind.replace('_', ' ')}: {_one_line(self._m.get_error())}")

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but EOS may follow."""
        return self._m.is_stopped()

    @property
    def accepting(self) -> bool:
        """The tokens so far match the whole grammar (EOS may follow, perhaps more)."""
        return self._m.is_accepting()

    def allowed(self) -> torch.Tensor:
        """bool [vocab]: the tokens the grammar allows next (EOS among them once it may end). Ids past the
        tokenizer's vocabulary (a model's padded rows) are never allowed."""
        bits = torch.frombuffer(bytearray(self._m.compute_bitmask()), dtype=torch.uint8)
        mask = ((bits[:, None] >> _SHIFTS) & 1).bool().flatten()  # little-endian words: bit j of byte b = 8b + j
        if mask.numel() >= self.vocab:
            return mask[:self.vocab]
        return torch.cat([mask, mask.new_zeros(self.vocab - mask.numel())])

    def consume(self, token: int) -> None:
        if not self._m.consume_token(int(token)):
            raise GrammarError(f"token {token} does not fit the grammar here: {self._m.get_error()}")
