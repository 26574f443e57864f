"""Training DiffusionGemma: the block-diffusion objective (SPEC §5), LoRA, data-parallel runs, checkpoints.

    noise.py     per-example randomness and the uniform-state forward corruption
    data.py      JSONL datasets ({"prompt","response"} or {"messages"}) -> token ids -> block-layout batches
    loss.py      the training cache (block-causal attention) and the objective: canvas CE + encoder AR CE
    lora.py      low-rank adapters as a module swap; save, load, merge
    trainer.py   the loop: AdamW, warmup + cosine, clipping, accumulation, DDP, eval, progress
    state.py     checkpoints (HF model or adapter + trainer state), written atomically, resumed exactly
"""
