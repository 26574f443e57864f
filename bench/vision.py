"""Image input at the released vision tower's size: what one image costs before the text stack sees it.

    python bench/vision.py [--threads 2] [--dtypes float32,bfloat16] [--soft 70,280]

The released tower's shape (SPEC §1: 27 layers, hidden 1152, 16 heads of 72, 3x3 pooling; ~550M parameters) with
random weights, projecting into the 26B model's hidden size (2816). Timed: reading and preprocessing a 1280x960
JPEG (decode, bicubic resize, patches), and the tower's forward (`VisionTower.features`) for an image of 70 and of
280 soft tokens (630 and 2,520 patches; 280 is the released config's default), per dtype; the median of 3 runs
after a warm-up. The prompt then holds the soft tokens plus boi/eoi, encoded with the text like any other tokens.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _results import write_results  # noqa: E402
from dgemma.vision import RELEASED_VISION_CONFIG, VisionTower, load_image  # noqa: E402


def jpeg(w: int, h: int) -> bytes:
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * 255 // w), (y * 255 // h), ((x + y) * 7) % 256], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def timed(fn, runs: int = 3) -> float:
    fn()  # warm-up
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--soft", default="70,280", help="images of these many soft tokens")
    ap.add_argument("--out", default="bench/results-vision.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = jpeg(1280, 960)
    soft = [int(s) for s in args.soft.split(",")]
    pre = {s: timed(lambda s=s: load_image(data, max_soft_tokens=s)) for s in soft}
    images = {s: load_image(data, max_soft_tokens=s) for s in soft}
    tower = VisionTower(RELEASED_VISION_CONFIG, 2816)
    with torch.no_grad():
        for t in tower.state_dict().values():
            if t.is_floating_point():
                t.normal_(0, 0.02)
    params = sum(p.numel() for p in tower.parameters())
    print(f"released vision tower: {params / 1e6:.0f}M parameters; {args.threads} threads, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'dtype':>9}{'soft tokens':>12}{'patches':>9}{'image size':>12}{'preprocess s':>14}{'tower s':>9}"
          f"{'patches/s':>11}")
    results = []
    for name in args.dtypes.split(","):
        dt = getattr(torch, name)
        tw = tower.to(dt)
        for s in soft:
            img = images[s]
            sec = timed(lambda: tw.features(img, cached=False))  # the forward each time, not the features cache
            n = img.patches.shape[0]
            results.append({"dtype": name, "soft_tokens": img.tokens, "patches": n, "size": list(img.size),
                            "preprocess_s": pre[s], "tower_s": sec, "patches_per_s": n / sec})
            print(f"{name:>9}{img.tokens:>12}{n:>9}{'%dx%d' % img.size:>12}{pre[s]:>14.3f}{sec:>9.2f}"
                  f"{n / sec:>11.0f}", flush=True)
    write_results(args.out, "vision.py", argv, args.threads, tower_params=params, source_image="1280x960 JPEG",
                  results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
