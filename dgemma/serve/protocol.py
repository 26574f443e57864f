"""Request and response types of the OpenAI-compatible API (pydantic), plus dgemma's extra body fields.

Requests reject unknown fields (as OpenAI does: "Unrecognized request argument"), so a typo in a diffusion option
is an error rather than a silently ignored knob. OpenAI fields we cannot honour yet (penalties, the deprecated
`functions`) are declared so that `completions.py` can refuse them with a clear 400.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from ..sampler import MAX_RESTARTS
from .errors import invalid

SEED_LIMIT = 2**63


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far


class DiffusionOptions(_Strict):
    """dgemma's extra body fields (pass them with the openai client's `extra_body=`)."""

    steps: int | None = Field(None, ge=1, le=4096, validation_alias=AliasChoices("steps", "max_denoising_steps"))
    entropy_bound: float | None = Field(None, ge=0)
    t_min: float | None = Field(None, gt=0)
    t_max: float | None = Field(None, gt=0)
    stability_threshold: int | None = Field(None, ge=0)
    confidence_threshold: float | None = Field(None, ge=0)
    restarts: int | None = Field(None, ge=0, le=MAX_RESTARTS)  # a canvas that never stops early starts over
    ar: bool = False  # autoregressive decoding of the same weights (the baseline)
    stream_drafts: bool = False  # also stream every step's draft canvas (see app.py for the chunk shape)
    ignore_eos: bool = False  # keep going past EOS until max_tokens (benchmarks that force a length)
    ar_fallback: float | None = Field(None, ge=0)  # a canvas ending above this mean entropy is decoded AR instead
    # warm start: the first canvas starts from this text (or these token ids) instead of noise, a draft to correct
    draft: str | list[int] | None = None
    # OpenAI's Predicted Outputs (chat's field; on completions too), {"type": "content", "content": text or text
    # parts}: diffusion starts every canvas from the predicted text after the output so far
    prediction: dict[str, Any] | None = None

    def sampler_options(self) -> dict[str, Any]:
        opts = dict(steps=self.steps, entropy_bound=self.entropy_bound, t_min=self.t_min, t_max=self.t_max,
                    stability_threshold=self.stability_threshold, confidence_threshold=self.confidence_threshold,
                    restarts=self.restarts)
        return {k: v for k, v in opts.items() if v is not None}


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` body field: exactly one constraint on the output."""

    # a JSON schema (dict or its text); the body's key is "json" (a name pydantic's BaseModel keeps for itself)
    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")
    json_object: bool | None = None  # any JSON object
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # a Lark grammar (llguidance's dialect)


class _Common(DiffusionOptions):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=128)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)  # diffusion: ignored (fixed schedule); AR: 0 = greedy
    # AR (`ar: true`) samples with these, as vLLM does; diffusion's sampler ignores them (its schedule is fixed)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's: -1 or 0 = all tokens
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # vLLM's sampling extras: a seen token's logit / p when positive, * p when negative (after logit_bias)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    min_tokens: int = Field(0, ge=0)  # no EOS, stop token or stop string before this many tokens
    stop_token_ids: list[int] | None = None  # tokens that end the output as EOS does
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = None  # only these tokens can be sampled
    bad_words: list[str] | None = None  # vLLM's: words never written
    truncate_prompt_tokens: int | None = Field(None, ge=-1)  # keep the prompt's last k tokens (-1: the context)
    return_token_ids: bool = False  # vLLM's: the prompt's and each choice's token ids in the response
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # vLLM's: each prompt token's logprob, rank and top n
    priority: int = 0  # vLLM's: with --scheduling-policy priority, lower is admitted first
    # vLLM's: with --prefix-cache, this request reuses (and leaves) cached keys only among requests of this salt
    cache_salt: str | None = Field(None, min_length=1)
    # vLLM's: true leaves the special tokens the model writes out of the text (None / false: kept, dgemma's
    # default); chat with tools or thinking keeps them, to read the calls and the thought from them
    skip_special_tokens: bool | None = None
    # vLLM's: accepted and, as in vLLM with a fast tokenizer (the only kind dgemma reads), without effect
    spaces_between_special_tokens: bool = True
    user: str | None = None
    # structured output: OpenAI's response_format (text / json_object / json_schema), or vLLM's structured_outputs
    response_format: dict[str, Any] | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's older names for the same constraints (its `guided_*` fields, before structured_outputs), read as them;
    # the backend choice is accepted and, dgemma having one engine of its own, changes nothing
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None

    @model_validator(mode="after")
    def _guided(self):
        given = {k: v for k, v in (("json", self.guided_json), ("regex", self.guided_regex),
                                   ("choice", self.guided_choice), ("grammar", self.guided_grammar)) if v is not None}
        if not given:
            return self
        if len(given) > 1 or self.structured_outputs is not None or self.response_format is not None:
            raise ValueError("send one constraint: one guided_* field, or structured_outputs, or response_format")
        self.structured_outputs = StructuredOutputs(**given)
        return self


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo and logprobs: score the prompt alone
    suffix: str | None = None
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    # Lenient: clients echo back assistant messages with refusal/annotations/audio fields set to null.
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # vLLM's: a Jinja template for this request (--trust-request-chat-template)
    # vLLM's: continue_final_message continues the last (assistant) message instead of opening a new reply;
    # add_generation_prompt false renders the conversation without opening the model's turn
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a text prompt, or chat messages rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool = True  # text prompts: BOS first, as /v1/completions encodes them
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None
    return_token_strs: bool = False


class LoadLoRARequest(_Strict):
    """vLLM's POST /v1/load_lora_adapter."""

    lora_name: str
    lora_path: str


class UnloadLoRARequest(_Strict):
    """vLLM's POST /v1/unload_lora_adapter (`lora_int_id` is accepted and not needed)."""

    lora_name: str
    lora_int_id: int | None = None


class BatchCreateRequest(_Strict):
    """OpenAI's POST /v1/batches."""

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(default=None, max_length=16)


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # OpenAI's: prompt tokens the KV cache held already (prefix caching, `dgemma serve --prefix-cache`)
    prompt_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    # dgemma's additions: how hard the sampler worked for these tokens.
    steps_per_canvas: float | None = None  # mean denoising steps per canvas (None for AR)
    tokens_per_forward: float | None = None  # generated tokens per decoder forward (AR: per encoder forward)
    forward_passes: int = 0  # decoder forwards (diffusion) or encoder forwards (AR), all choices together
    canvases: int = 0
    # OpenAI's, with a prediction: accepted_prediction_tokens / rejected_prediction_tokens
    completion_tokens_details: dict[str, int] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    dgemma: dict[str, Any] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the answer is tool calls alone, as in OpenAI's responses
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None  # the thought channel, with chat_template_kwargs.enable_thinking


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    dgemma: dict[str, Any] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dgemma"
    root: str | None = None  # a LoRA module: its adapter directory
    parent: str | None = None  # a LoRA module: the base model it runs over
    max_model_len: int | None = None  # vLLM's: the context a request may use (clients size prompts by it)
    dgemma: dict[str, Any] | None = None  # canvas length, context, default sampler options


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- OpenAI's list object
def page(data: list[dict], has_more: bool = False) -> dict:
    """OpenAI's list object."""
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0].get("id") if data else None, "last_id": data[-1].get("id") if data else None}


def items_page(items: list[dict], limit: int = 20, order: str = "desc", after: str | None = None) -> dict:
    """A page of items (a response's input items, a conversation's): `order` asc or desc, `after` an item id (the
    cursor), at most `limit` (1..100) of them; 400 for a bad limit or order."""
    if order not in ("asc", "desc"):
        raise invalid("order must be 'asc' or 'desc'", "order")
    if not 1 <= limit <= 100:
        raise invalid("limit must be 1..100", "limit")
    items = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [i.get("id") for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return page(items[:limit], len(items) > limit)
