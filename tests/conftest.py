"""Shared fixtures: tiny random DiffusionGemma configs and the transformers reference built from the same weights."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from dgemma.config import FULL, SLIDING, ModelConfig

# Two torch threads at most; under pytest-xdist (`make test` runs one worker per core) a core per worker.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
# The CPU's default dtype follows its instructions (bf16 where it has native bf16: runtime.cpu_dtype). Pin it so
# the suite runs the same arithmetic on every machine CI lands on; the bf16 path has tests of its own that ask
# for it by name (test_parity, test_runtime). Subprocesses (CLI, server) inherit the pin.
os.environ["DGEMMA_CPU_DTYPE"] = "float32"
# torch.compile (`--compile`) builds its CPU kernels with a C++ compiler; its tests skip where there is none.
HAVE_CXX = shutil.which("g++") is not None or shutil.which("c++") is not None

# Three tiny configs that differ in head dims, KV heads, window, number of experts and top-k.
TINY_CONFIGS = {
    "a": dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, num_global_key_value_heads=1, head_dim=16, global_head_dim=32,
              sliding_window=8, layer_types=[SLIDING, SLIDING, FULL, FULL], num_experts=4, top_k_experts=2,
              moe_intermediate_size=32, canvas_length=16),
    "b": dict(vocab_size=256, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6,
              num_key_value_heads=3, num_global_key_value_heads=2, head_dim=8, global_head_dim=24,
              sliding_window=5, layer_types=[SLIDING, FULL, FULL], num_experts=6, top_k_experts=3,
              moe_intermediate_size=24, canvas_length=12),
    "c": dict(vocab_size=288, hidden_size=32, intermediate_size=40, num_hidden_layers=6, num_attention_heads=2,
              num_key_value_heads=1, num_global_key_value_heads=2, head_dim=16, global_head_dim=16,
              sliding_window=12, num_experts=8, top_k_experts=1, moe_intermediate_size=16, canvas_length=20,
              final_logit_softcapping=20.0),
}


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (use with pytestmark): on a shared 2-core machine, two OpenMP threads competing
    with other jobs run many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(name: str = "a", **kw) -> ModelConfig:
    return ModelConfig(**{**TINY_CONFIGS[name], "max_position_embeddings": 1024,
                          "vision_soft_tokens_per_image": None, **kw})


def randomize(model, seed: int = 0):
    """Random weights, with norms, scales and layer scalars away from 1 so that w vs 1+w bugs cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.init_weights(seed)
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name:
                continue
            if name.endswith(("norm.weight", "router.scale", "per_expert_scale")) or "layernorm" in name:
                t.copy_(1.0 + 0.15 * torch.randn(t.shape, generator=g))
            elif "layer_scalar" in name:
                t.copy_(0.7 + 0.5 * torch.rand(t.shape, generator=g))
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    return model


@pytest.fixture(params=sorted(TINY_CONFIGS))
def cfg_name(request):
    return request.param
