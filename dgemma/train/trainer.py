"""The training loop: AdamW, warmup + cosine, clipping, gradient accumulation, DDP, evaluation, checkpoints.

One optimizer step s:
  1. data      the global batch = items s*B .. s*B+B-1 of the data order (data.Order); rank r takes its slice
  2. noise     every example draws from its own generator seeded by (seed, s, position in the global batch)
  3. forward   micro-batches of the rank's slice through `objective`; each loss is normalised by the global
               batch's token counts, so the summed gradients are those of the global mean loss
  4. backward  DDP all-reduces on the last micro-batch only (no_sync before it)
  5. update    clip the gradient norm, AdamW step, LR schedule step
  6. log, evaluate, checkpoint (rank 0), at their intervals
Because nothing in 1-3 depends on earlier steps, a run resumed from a checkpoint (weights, optimizer, scheduler,
step) continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..runtime import tune_cpu_allocator
from .data import Example, Order, ar_count, draw_for, fingerprint, make_batch
from .dist import DistEnv
from .lora import LoRAConfig, apply_lora, has_lora, load_adapter
from .loss import ObjectiveConfig, objective
from .noise import example_generator
from . import state as S


MOE_LAYOUTS = ("auto", "sorted", "dense")  # TrainConfig.moe, see dense_experts


class TrainError(ValueError):
    """A training option or setup that cannot work, reported as one line."""


class Dataset(Protocol):
    def __len__(self) -> int: ...

    def example(self, index: int, epoch: int) -> Example: ...


class ListDataset:
    """A fixed list of examples (the same in every epoch)."""

    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    def example(self, index: int, epoch: int) -> Example:
        return self.examples[index]


@dataclass
class TrainConfig:
    out: str
    steps: int = 1000
    batch_size: int = 32  # examples per optimizer step, over all ranks and micro-batches
    micro_batch: int | None = None  # examples per forward per rank (default: batch_size / world)
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 100
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0  # max global gradient norm (0 = off)
    eps: float = 1e-3  # t ~ U(eps, 1)
    sc_prob: float = 0.5
    diffusion_weight: float = 1.0
    ar_weight: float = 1.0
    ar_on_prompt: bool = False
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    eval_every: int = 0  # 0: only at the end (when there is eval data)
    eval_examples: int = 256
    keep: int = 3  # checkpoints kept (0 = all)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("all",)
    device: str = "auto"
    bf16: bool = False  # bfloat16 autocast (for CUDA; works on the CPU too); fp32 master weights
    threads: int = 0  # torch CPU threads per process (0 = leave torch's default)
    workers: int = 0  # processes that build the next steps' batches ahead (0 = inline); results are identical
    moe: str = "auto"  # sorted | dense (every expert over every token) | auto: dense on CUDA with few experts
    compile: bool = False  # torch.compile each decoder layer (training passes only; evaluation runs eagerly)
    gradient_checkpointing: bool = False  # keep each layer's input only; the backward reruns the layer

    def __post_init__(self):
        self.lora_targets = tuple(self.lora_targets)
        need = [(self.steps > 0, "--steps must be positive"), (self.batch_size > 0, "--batch-size must be positive"),
                (self.lr > 0, "--lr must be positive"),
                (0 <= self.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]"),
                (self.warmup >= 0, "--warmup must be >= 0"), (0 < self.eps < 1, "--eps must be in (0, 1)"),
                (0 <= self.sc_prob <= 1, "--sc-prob must be in [0, 1]"), (self.clip >= 0, "--clip must be >= 0"),
                (self.diffusion_weight >= 0 and self.ar_weight >= 0, "loss weights must be >= 0"),
                (self.diffusion_weight + self.ar_weight > 0, "at least one loss weight must be positive"),
                (self.micro_batch is None or self.micro_batch > 0, "--micro-batch must be positive"),
                (self.save_every >= 0 and self.eval_every >= 0 and self.log_every > 0, "intervals must be >= 0"),
                (self.lora_rank >= 0, "--lora-rank must be >= 0"), (self.workers >= 0, "--workers must be >= 0"),
                (self.moe in MOE_LAYOUTS, f"--moe must be one of {', '.join(MOE_LAYOUTS)}")]
        for ok, msg in need:
            if not ok:
                raise TrainError(msg)
        if self.lora_rank:
            LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_targets)  # validates the targets

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def objective(self) -> ObjectiveConfig:
        return ObjectiveConfig(self.diffusion_weight, self.ar_weight, self.ar_on_prompt)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup from 0 to 1 over `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


def dense_experts(moe: str, mcfg, device: torch.device) -> bool:
    """Whether training runs every expert over every token (`Experts.dense`). auto: on CUDA when that costs at
    most twice the routed FLOPs (experts <= 2 x top-k), where a small model is bound by kernel count and host syncs
    rather than arithmetic; the routed path elsewhere (the CPU is bound by arithmetic)."""
    if moe == "auto":
        return device.type == "cuda" and mcfg.num_experts <= 2 * mcfg.top_k_experts
    return moe == "dense"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise TrainError(f"bad --device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda asked for, but CUDA is not available")
    return dev


# ---------------------------------------------------------------- the loss as one module (what DDP wraps)
STAT_KEYS = ("canvas_sum", "canvas_correct", "canvas_tokens", "ar_sum", "ar_correct", "ar_tokens")


class LossModule(nn.Module):
    """model + objective in one forward, so DDP sees one call per micro-batch however many passes it makes."""

    def __init__(self, model: nn.Module, ocfg: ObjectiveConfig):
        super().__init__()
        self.model, self.ocfg = model, ocfg

    def forward(self, batch, canvas_norm: float, ar_norm: float):
        loss, stats = objective(self.model, batch, self.ocfg, canvas_norm=canvas_norm, ar_norm=ar_norm)
        vec = torch.tensor([float(stats.get(k, 0)) for k in STAT_KEYS], dtype=torch.float64)
        return loss, vec


@torch.no_grad()
def heldout_stats(module: LossModule, examples: Sequence[Example], *, seed: int = 0, micro: int = 16,
                  eps: float = 1e-3, sc_prob: float = 0.5, pad: int = 0, ar_on_prompt: bool = False,
                  device: str | torch.device = "cpu", autocast=contextlib.nullcontext) -> dict:
    """The objective over held-out examples with fixed noise (example i draws from (seed, -1, i)), per token."""
    model, ocfg = module.model, module.ocfg
    T, vocab = model.cfg.canvas_length, model.cfg.vocab_size
    stats = torch.zeros(len(STAT_KEYS), dtype=torch.float64)
    for lo in range(0, len(examples), micro):
        chunk = examples[lo:lo + micro]
        gens = [example_generator(seed, -1, lo + j) for j in range(len(chunk))]
        draws = draw_for(chunk, gens, canvas=T, vocab=vocab, eps=eps, sc_prob=sc_prob)
        batch = make_batch(chunk, draws, canvas=T, pad=pad, with_ar=ocfg.ar_weight > 0,
                           ar_on_prompt=ar_on_prompt).to(device)
        with autocast():
            _, vec = module(batch, 1.0, 1.0)
        stats += vec
    return summarize(stats, ocfg)


def summarize(vec: torch.Tensor, ocfg: ObjectiveConfig) -> dict:
    c_sum, c_ok, c_n, a_sum, a_ok, a_n = vec.tolist()
    out = {"diffusion_loss": c_sum / max(c_n, 1), "canvas_acc": c_ok / max(c_n, 1)}
    if a_n:
        out.update(ar_loss=a_sum / a_n, ar_acc=a_ok / a_n)
    out["loss"] = ocfg.diffusion_weight * out["diffusion_loss"] + ocfg.ar_weight * out.get("ar_loss", 0.0)
    return out


# ---------------------------------------------------------------- progress line
def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


@dataclass
class HostStep:
    """One optimizer step's data for one rank, built on the host: its micro-batches and the global normalisers."""

    canvas_norm: float
    ar_norm: float
    batches: list


class StepData(torch.utils.data.Dataset):
    """Optimizer step -> `HostStep` (steps 1-2 of the module docstring). A pure function of the step, so loader
    workers can build steps ahead and a resumed run sees the same batches."""

    def __init__(self, data: Dataset, order: Order, cfg: TrainConfig, *, canvas: int, vocab: int, pad: int,
                 rank: int, local: int, micro: int):
        self.data, self.order, self.cfg = data, order, cfg
        self.canvas, self.vocab, self.pad, self.rank, self.local, self.micro = canvas, vocab, pad, rank, local, micro

    def __len__(self) -> int:
        return self.cfg.steps

    def examples(self, step: int) -> list[Example]:
        return [self.data.example(i, e) for i, e in self.order.indices(step, self.cfg.batch_size)]

    def __getitem__(self, step: int) -> HostStep:
        cfg = self.cfg
        examples = self.examples(step)
        with_ar = cfg.ar_weight > 0
        ar_norm = float(sum(ar_count(ex, cfg.ar_on_prompt) for ex in examples)) if with_ar else 1.0
        lo = self.rank * self.local
        batches = []
        for m in range(self.local // self.micro):
            positions = range(lo + m * self.micro, lo + (m + 1) * self.micro)
            exs = [examples[p] for p in positions]
            gens = [example_generator(cfg.seed, step, p) for p in positions]
            draws = draw_for(exs, gens, canvas=self.canvas, vocab=self.vocab, eps=cfg.eps, sc_prob=cfg.sc_prob)
            batches.append(make_batch(exs, draws, canvas=self.canvas, pad=self.pad, with_ar=with_ar,
                                      ar_on_prompt=cfg.ar_on_prompt))
        return HostStep(float(len(examples) * self.canvas), ar_norm, batches)


class Progress:
    """One status line on stderr, rewritten in place on a terminal; a plain line per log interval otherwise."""

    def __init__(self, total: int, start: int, stream=sys.stderr):
        self.total, self.start, self.stream = total, start, stream
        self.tty = stream.isatty()
        self.t0 = time.perf_counter()
        self.tokens = 0

    def update(self, step: int, metrics: dict, tokens: int, force: bool = False) -> None:
        self.tokens += tokens
        dt = time.perf_counter() - self.t0
        done = step - self.start
        eta = dt / done * (self.total - step) if done else 0.0
        parts = [f"step {step}/{self.total}", f"loss {metrics['loss']:.4f}"]
        if "ar_loss" in metrics:
            parts.append(f"(diff {metrics['diffusion_loss']:.4f}, ar {metrics['ar_loss']:.4f})")
        parts += [f"lr {metrics['lr']:.2e}", f"{self.tokens / dt if dt else 0:,.0f} tok/s",
                  f"elapsed {_fmt_time(dt)}", f"ETA {_fmt_time(eta)}"]
        line = "  ".join(parts)
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if force else ""))
        elif force:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()


# ---------------------------------------------------------------- the trainer
class Trainer:
    """Trains `model` (a base model: LoRA is applied here when asked) on `train_data` as `cfg` says.

    resume_from: a checkpoint directory; full fine-tuning expects `model` to hold that checkpoint's weights
    already (see `build_model`), LoRA loads the adapter from it here. The optimizer, scheduler and step always come
    from the checkpoint.
    """

    def __init__(self, model: nn.Module, train_data: Dataset, cfg: TrainConfig, *, eval_data: Dataset | None = None,
                 tokenizer=None, generation_config: dict | None = None,
                 eval_hook: Callable[[nn.Module], dict] | None = None, resume_from: Path | None = None,
                 dist: DistEnv | None = None, base: str | None = None, quiet: bool = False):
        self.cfg, self.data, self.eval_data = cfg, train_data, eval_data
        self.tok, self.gen_cfg, self.eval_hook, self.base = tokenizer, generation_config, eval_hook, base
        self.dist = dist or DistEnv.from_env()
        self.out = Path(cfg.out)
        self.quiet = quiet or not self.dist.main
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu":
            tune_cpu_allocator()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.T = model.cfg.canvas_length
        self.vocab = model.cfg.vocab_size
        self.pad = model.cfg.pad_token_id
        self.ocfg = cfg.objective()
        world = self.dist.world
        if cfg.batch_size % world:
            raise TrainError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
        self.local = cfg.batch_size // world
        self.micro = min(cfg.micro_batch or self.local, self.local)
        if self.local % self.micro:
            raise TrainError(f"the per-process batch ({self.local}) is not a multiple of --micro-batch {self.micro}")
        if len(train_data) == 0:
            raise TrainError("the training set is empty")
        # model, adapters, optimizer
        from ..quant import QuantConfig

        q = QuantConfig.of(model.cfg)
        if q is not None and not cfg.lora_rank:
            raise TrainError(f"the model is {q.scheme}-quantized: its layers are frozen codes. Train a LoRA adapter "
                             "over it (QLoRA: --lora-rank R), or fine-tune the full-precision checkpoint")
        if cfg.lora_rank and not has_lora(model):
            apply_lora(model, LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets), seed=cfg.seed)
        if resume_from is not None and has_lora(model):
            load_adapter(model, resume_from)
        self.model = model.to(self.device).train()
        model.set_dense_experts(dense_experts(cfg.moe, model.cfg, self.device))
        model.gradient_checkpointing_enable(cfg.gradient_checkpointing)
        if cfg.compile:
            from torch import _dynamo

            # one graph per layer kind x pass (encoder, denoiser with and without gradients), dynamic row counts
            _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 64)
            for layer in model.layers:
                layer.compile(dynamic=True)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise TrainError("the model has no trainable parameters")
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.params = params
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                     fused=self.device.type == "cuda" or None)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, cfg.warmup, cfg.steps, cfg.min_lr_ratio))
        self.order = Order(len(train_data), cfg.seed)
        self.step_data = StepData(train_data, self.order, cfg, canvas=self.T, vocab=self.vocab, pad=self.pad,
                                  rank=self.dist.rank, local=self.local, micro=self.micro)
        self.data_fp = fingerprint(_Fp(train_data))
        self.step = 0
        if resume_from is not None:
            self._load(resume_from)
        self.dist.init(self.device)
        self.module = LossModule(model, self.ocfg)
        self.ddp = None
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index or 0] if self.device.type == "cuda" else None
            # Self-conditioning weights sit idle in steps where no example self-conditions.
            # broadcast_buffers=False: the buffers (RoPE tables, layer scalars) are constants that every rank
            # computes or loads identically, and DDP pairs buffers by position, while the model registers its
            # RoPE tables in set() order, which differs between processes (PYTHONHASHSEED): broadcasting them
            # would write one layer type's table into the other's.
            self.ddp = DDP(self.module, device_ids=ids, find_unused_parameters=True, broadcast_buffers=False)

    def close(self) -> None:
        """End the run's process group, if any. DDP's reducer goes first: freed after the group is destroyed (when
        the Trainer is collected, at exit) it can hang there, as CI saw under load; then every rank tears the
        group down together (`DistEnv.close`)."""
        self.ddp = None
        gc.collect()
        self.dist.close()

    # ------------------------------------------------------------ state
    def _load(self, ckpt: Path) -> None:
        st = S.load_state(ckpt)
        if st.get("data_fingerprint") != self.data_fp:
            raise S.CheckpointStateError(f"the training data differs from the data of the run being resumed "
                                         f"({ckpt}); resume needs the same data")
        if st.get("batch_size") != self.cfg.batch_size:
            raise S.CheckpointStateError("--batch-size differs from the run being resumed")
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.step = int(st["step"])
        S.set_rng_state(st["rng"])

    def _state(self) -> dict:
        return {"step": self.step, "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "rng": S.rng_state(), "examples_seen": self.step * self.cfg.batch_size,
                "epoch": self.step * self.cfg.batch_size // len(self.data), "data_fingerprint": self.data_fp,
                "batch_size": self.cfg.batch_size, "world_size": self.dist.world, "config": self.cfg.to_dict()}

    def save(self) -> Path | None:
        path = None
        if self.dist.main:
            path = S.save_checkpoint(self.out, self.step, self.model, self._state(), tokenizer=self.tok,
                                     generation_config=self.gen_cfg, base=self.base, keep=self.cfg.keep)
        self.dist.barrier()
        return path

    # ------------------------------------------------------------ one step
    def _host_steps(self):
        """HostStep for self.step, self.step + 1, ...: inline, or from `cfg.workers` loader processes."""
        if not self.cfg.workers:
            return (self.step_data[s] for s in range(self.step, self.cfg.steps))
        return iter(torch.utils.data.DataLoader(
            self.step_data, sampler=range(self.step, self.cfg.steps), batch_size=None, num_workers=self.cfg.workers,
            prefetch_factor=4, pin_memory=self.device.type == "cuda"))

    def train_step(self, host: HostStep | None = None) -> dict:
        """Steps 1-5 of the module docstring for optimizer step `self.step`; returns the global metrics."""
        world = self.dist.world
        host = host if host is not None else self.step_data[self.step]
        stats = torch.zeros(len(STAT_KEYS), dtype=torch.float64)
        enc_tokens = 0
        runner = self.ddp or self.module
        n_micro = len(host.batches)
        for m, cpu_batch in enumerate(host.batches):
            batch = cpu_batch.to(self.device)
            enc_tokens += int(cpu_batch.enc_len.sum())
            sync = self.ddp is None or m == n_micro - 1
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()), self._autocast():
                loss, vec = runner(batch, host.canvas_norm, host.ar_norm)
            # DDP averages gradients over ranks; the normalised losses must be summed, hence * world.
            (loss * world).backward()
            stats += vec
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip if self.cfg.clip else float("inf"))
        lr = self.sched.get_last_lr()[0]  # the rate this update uses
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        glob = self.dist.sum(torch.cat([stats, torch.tensor([float(enc_tokens)], dtype=torch.float64)]))
        metrics = summarize(glob[:-1], self.ocfg)
        metrics.update(lr=lr, grad_norm=float(grad_norm),
                       tokens=int(glob[-1].item() + glob[2].item()))
        return metrics

    def _autocast(self):
        # bf16 autocast also on the CPU (slower there than fp32), so the CPU tests cover the GPU path's code
        if self.cfg.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out objective with fixed noise (the same draws at every evaluation), plus the eval hook."""
        out = {}
        model = self.model.eval()
        stance = torch.compiler.set_stance("force_eager") if self.cfg.compile else contextlib.nullcontext()
        try:
            with stance:
                if self.eval_data is not None and len(self.eval_data):
                    n = min(len(self.eval_data), self.cfg.eval_examples)
                    stats = heldout_stats(self.module, [self.eval_data.example(i, 0) for i in range(n)],
                                          seed=self.cfg.seed, micro=self.micro, eps=self.cfg.eps,
                                          sc_prob=self.cfg.sc_prob, pad=self.pad, ar_on_prompt=self.cfg.ar_on_prompt,
                                          device=self.device, autocast=self._autocast)
                    out.update({f"eval_{k}": v for k, v in stats.items()})
                if self.eval_hook is not None:
                    out.update(self.eval_hook(model))
        finally:
            model.train()
        return out

    # ------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg, dist = self.cfg, self.dist
        if dist.main:
            S.check_writable(self.out)
            S.remove_stale(self.out)
            S.truncate_log(self.out, self.step)
        dist.barrier()
        prog = Progress(cfg.steps, self.step) if not self.quiet else None
        if prog and self.step:
            prog.note(f"resuming at step {self.step}/{cfg.steps} from {self.out}")
        log = open(self.out / S.LOG_FILE, "a") if dist.main else None
        last: dict = {}
        host_steps = self._host_steps()
        try:
            while self.step < cfg.steps:
                metrics = self.train_step(next(host_steps))
                last = metrics
                at_end = self.step == cfg.steps
                want_eval = (cfg.eval_every and self.step % cfg.eval_every == 0) or (
                    at_end and (self.eval_data is not None or self.eval_hook is not None))
                if want_eval:
                    if dist.main:
                        metrics.update(self.evaluate())
                    dist.barrier()
                logged = self.step % cfg.log_every == 0 or at_end or want_eval
                if dist.main and logged:
                    log.write(json.dumps({"step": self.step, **{k: _round(v) for k, v in metrics.items()},
                                          "time": round(time.time(), 2)}) + "\n")
                    log.flush()
                if prog:
                    prog.update(self.step, metrics, metrics["tokens"], force=logged)
                    if want_eval:
                        prog.note("  eval: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                        if k.startswith("eval") or k.startswith("solve")))
                if (cfg.save_every and self.step % cfg.save_every == 0) or at_end:
                    self.save()
            if dist.main:
                S.save_final(self.out, self.model, tokenizer=self.tok, generation_config=self.gen_cfg,
                             base=self.base)
            dist.barrier()
        finally:
            if log:
                log.close()
        return last


def _round(v):
    return round(v, 6) if isinstance(v, float) else v


class _Fp:
    """Adapter so `fingerprint` reads epoch-0 examples of any Dataset."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds.example(i, 0)


# ---------------------------------------------------------------- model for a run
def build_model(cfg: TrainConfig, *, base_model: Callable[[], nn.Module], resume_from: Path | None):
    """The model a run starts from: on a full fine-tuning resume the checkpoint itself, otherwise the base
    (a preset built from scratch, or a loaded checkpoint), onto which the Trainer puts LoRA adapters."""
    if resume_from is not None and not cfg.lora_rank:
        from ..weights import load_model

        return own_memory(load_model(resume_from, dtype=torch.float32, quiet=True))
    return own_memory(base_model())


@torch.no_grad()
def own_memory(model: nn.Module) -> nn.Module:
    """Give every parameter and buffer a fresh, allocator-aligned copy. Loaded tensors are memory-mapped views
    of the safetensors file; besides not being ours to update in place, their alignment differs from freshly
    allocated ones, and BLAS kernels may round differently for different alignments, which would make a resumed
    run drift from the uninterrupted one in the last bits."""
    for p in model.parameters():
        p.data = p.data.clone()
    for mod in model.modules():
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = b.clone()
    return model
