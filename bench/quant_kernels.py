"""Weight-only matmul on CPU: dgemma's dequantize-then-F.linear (int8, int4, fp8, nvfp4) vs torch's int8 / int4
weight-only kernels.

    python bench/quant_kernels.py [--threads 1] [--repeats 5]

For each layer shape (M tokens x N outputs x K inputs; the 26B model's, and the `small` preset's) it times, with
activations in fp32 and in bf16: F.linear on a dense weight (the unquantized baseline), `QuantLinear` (what dgemma
runs), and `torch.ops.aten._weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` called directly. Median of
`--repeats` rounds, rounds interleaved so a noisy neighbour hits every column alike. Milliseconds per call.
Last, a quantized MoE layer of the `small` preset over a 256-token canvas: its experts one at a time vs all at once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from dgemma.quant import Fp8, Int4, Int8, Nvfp4, QuantLinear

SHAPES = [  # name, M, N, K
    ("26b expert gate_up, 16 tok", 16, 1408, 2816),
    ("26b expert down, 16 tok", 16, 2816, 704),
    ("26b q_proj, 256 tok", 256, 4096, 2816),
    ("26b dense down, 256 tok", 256, 2816, 2112),
    ("26b q_proj, 1 tok", 1, 4096, 2816),
    ("small q_proj, 256 tok", 256, 256, 256),
    ("small expert gate_up, 64 tok", 64, 512, 256),
]


def _time(fn, budget_s=0.15) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        el = time.perf_counter() - t0
        if el > budget_s or n >= 200:
            return el / n * 1e3


def bench_shape(M, N, K, group_size, repeats):
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N, bias=False)
    q8, q4 = QuantLinear.from_linear(lin, Int8()), QuantLinear.from_linear(lin, Int4(group_size))
    qf8, qn4 = QuantLinear.from_linear(lin, Fp8()), QuantLinear.from_linear(lin, Nvfp4())
    cases = {}
    for dt, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        x, w = torch.randn(M, K).to(dt), lin.weight.detach().to(dt)
        s8 = q8.weight_scale.to(dt)
        cases[f"{tag} dense F.linear"] = lambda x=x, w=w: F.linear(x, w)
        cases[f"{tag} int8 dgemma"] = lambda x=x: q8(x)
        cases[f"{tag} int8 dequant+linear"] = lambda x=x: F.linear(x, q8.scheme.dequantize(q8.tensors(), x.dtype))
        cases[f"{tag} int8 _weight_int8pack_mm"] = lambda x=x, s8=s8: torch.ops.aten._weight_int8pack_mm(
            x, q8.weight, s8)
        cases[f"{tag} int4 dgemma (dequant+linear)"] = lambda x=x: q4(x)
        cases[f"{tag} fp8 dgemma"] = lambda x=x: qf8(x)
        cases[f"{tag} nvfp4 dgemma (dequant+linear)"] = lambda x=x: qn4(x)
        if K % group_size == 0:
            codes = torch.cat([q4.weight & 15, q4.weight >> 4], -1).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            sz = torch.stack([q4.weight_scale, q4.weight_zero], -1).transpose(0, 1).contiguous().to(dt)
            cases[f"{tag} int4 _weight_int4pack_mm_for_cpu"] = lambda x=x, p=packed, sz=sz: \
                torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, group_size, sz)
    times = {k: [] for k in cases}
    for _ in range(repeats):
        for k, fn in cases.items():
            times[k].append(_time(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def bench_experts(repeats, tokens=256):
    """A quantized MoE layer of the `small` preset (8 experts, top-2) over a canvas's `tokens` rows: one expert
    dequantized at a time vs every expert expanded at once for one grouped matmul (`QuantExperts.linear`; the
    same bits). ms per call."""
    import dgemma.quant as Q
    from dgemma.config import preset
    from dgemma.model import Experts

    cfg = preset("small")
    torch.manual_seed(0)
    ex = Experts(cfg)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.02)
        ex.down_proj.normal_(0, 0.02)
    idx = torch.stack([torch.randperm(cfg.num_experts)[:cfg.top_k_experts] for _ in range(tokens)])
    cases = {}
    for scheme in (Int8(), Int4(128), Fp8(), Nvfp4()):
        qx = Q.QuantExperts.from_experts(ex, scheme)
        for dt, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            x, w = torch.randn(tokens, cfg.hidden_size).to(dt), torch.rand(tokens, cfg.top_k_experts).to(dt)
            for how, budget in (("one at a time", 0), ("all at once", Q.STACK_BUDGET["cpu"])):
                def run(qx=qx, x=x, w=w, budget=budget):
                    saved, Q.STACK_BUDGET["cpu"] = Q.STACK_BUDGET["cpu"], budget
                    try:
                        with torch.no_grad():
                            qx(x, w, idx)
                    finally:
                        Q.STACK_BUDGET["cpu"] = saved
                cases[f"{tag} {scheme.name} experts, {how}"] = run
    times = {k: [] for k in cases}
    for _ in range(repeats):
        for k, fn in cases.items():
            times[k].append(_time(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--group-size", type=int, default=64, help="int4 group (64 divides every 26B layer's K)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} thread(s), int4 group {args.group_size}; ms per call (median of {args.repeats})")
    results = {}
    for name, M, N, K in SHAPES:
        r = bench_shape(M, N, K, args.group_size, args.repeats)
        results[name] = r
        print(f"\n{name}  (M={M}, N={N}, K={K})")
        for k, v in r.items():
            print(f"  {k:<40}{v:9.3f}")
    r = results["small MoE layer, 256 tok"] = bench_experts(args.repeats)
    print("\nsmall MoE layer, 256 tokens, top-2 of 8 experts")
    for k, v in r.items():
        print(f"  {k:<40}{v:9.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
