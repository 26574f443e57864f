"""Server settings: what `dgemma serve` flags set, validated once at start-up."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerSettings:
    model_name: str = "dgemma"
    model_aliases: tuple[str, ...] = ()  # more names requests may give the base model (vLLM's --served-model-name)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # Bearer token for /v1/* and /metrics; None = open
    max_concurrency: int = 8  # engine rows: canvases denoised together in one forward
    max_queue: int = 64  # rows waiting for a free engine row; beyond that, 429
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for (and the cap on the default)
    max_context: int = 8192  # KV-cache positions per row: prompt + committed canvases (capped by the model)
    max_body_bytes: int = 32 << 20  # larger request bodies get 413 (images come base64 inline)
    cors_origins: tuple[str, ...] = ()  # CORS is off unless origins are named
    retry_after_s: int = 1  # Retry-After on 429
    prefix_cache: bool = False  # reuse the K/V a finished request leaves for the next prompt with its prefix
    prefix_margin: int | None = None  # tokens a cached context may be cut back once past the sliding window
    # LoRA adapters served over the base, each under its own model name: ((name, adapter directory), ...)
    lora_modules: tuple[tuple[str, str], ...] = ()
    allow_runtime_lora: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (paths on this host)
    # load-adaptive step budget (rows, min steps): past that many engine rows, canvases get fewer steps (Engine)
    adaptive_steps: tuple[int, int] | None = None
    # chunked prefill: at most this many prompt tokens of a row per engine step (None: a prompt at once)
    prefill_chunk: int | None = None
    # vLLM's: "fcfs" (arrival order) or "priority" (a request's `priority`, lower first, then arrival)
    scheduling_policy: str = "fcfs"
    # Responses API: the last this many responses kept in memory for previous_response_id (0: none)
    responses_store: int = 1000
    # ... and the conversations of the Conversations API; with a directory, both are kept there too (a restart
    # reads them back)
    responses_dir: str | None = None
    # OpenAI's Files and Batches APIs, their files and batches kept under this directory (None: the APIs are off)
    batch_dir: str | None = None
    batch_max_file_bytes: int = 200 << 20  # the largest file /v1/files takes (OpenAI's limit is 200 MB)
    # image URLs (media.py): hosts whose http(s) images may be fetched ("*": any; none: data: URLs only), and the
    # directory file:// images may be read from (None: none)
    allowed_media_domains: tuple[str, ...] = ()
    allowed_local_media_path: str | None = None
    # uvicorn's: the path prefix a proxy serves the app under, HTTPS, and its line per request
    root_path: str = ""
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    access_log: bool = True
    # vLLM's --seed: the seeds of requests that name none are drawn from a generator seeded with this, in the order
    # the server plans them (None: each from the OS's randomness)
    seed: int | None = None
    # vLLM's --limit-mm-per-prompt '{"image": N}': at most N images in one request (None: no limit but the body's)
    limit_images: int | None = None
    # vLLM's --max-lora-rank: adapters of a higher rank are refused, at start-up and at run time (None: any rank)
    max_lora_rank: int | None = None
    # vLLM's --trust-request-chat-template: requests may bring their own Jinja chat template (off: a 400)
    trust_request_chat_template: bool = False

    def __post_init__(self) -> None:
        self.cors_origins = tuple(self.cors_origins)
        self.allowed_media_domains = tuple(d.strip().lower() for d in self.allowed_media_domains if d.strip())
        for name in ("max_concurrency", "max_tokens_limit", "max_context", "max_body_bytes", "retry_after_s",
                     "batch_max_file_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)!r}")
        if self.prefix_margin is not None and (not isinstance(self.prefix_margin, int) or self.prefix_margin < 0):
            raise ValueError(f"prefix-cache-margin must be >= 0, got {self.prefix_margin!r}")
        if self.adaptive_steps is not None:
            self.adaptive_steps = tuple(self.adaptive_steps)
            if len(self.adaptive_steps) != 2 or not all(isinstance(v, int) and v >= 1 for v in self.adaptive_steps):
                raise ValueError(f"adaptive-steps takes ROWS[:MIN_STEPS], both >= 1, got {self.adaptive_steps!r}")
        if self.prefill_chunk is not None and (not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 1):
            raise ValueError(f"prefill-chunk must be a positive number of tokens, got {self.prefill_chunk!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling-policy must be fcfs or priority, got {self.scheduling_policy!r}")
        if not isinstance(self.responses_store, int) or self.responses_store < 0:
            raise ValueError(f"responses-store must be >= 0, got {self.responses_store!r}")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"max-queue must be >= 0, got {self.max_queue!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api-key is empty")
        if not self.model_name:
            raise ValueError("model-name is empty")
        if self.limit_images is not None and (not isinstance(self.limit_images, int) or self.limit_images < 0):
            raise ValueError(f"the image limit must be >= 0, got {self.limit_images!r}")
        if self.max_lora_rank is not None and (not isinstance(self.max_lora_rank, int) or self.max_lora_rank < 1):
            raise ValueError(f"max-lora-rank must be a positive integer, got {self.max_lora_rank!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        self.model_aliases = tuple(self.model_aliases)
        bases = [self.model_name, *self.model_aliases]
        if any(not n or bases.count(n) > 1 for n in bases):
            raise ValueError(f"served model names must be non-empty and distinct, got {bases}")
        self.lora_modules = tuple((str(n), str(p)) for n, p in self.lora_modules)
        names = [n for n, _ in self.lora_modules]
        for n in names:
            if not n or n in bases or names.count(n) > 1:
                raise ValueError(f"LoRA module name {n!r} must be non-empty, unique and not the base model's name "
                                 f"({', '.join(map(repr, bases))})")
