"""Where the tiny preset's UNet cross-attends, timed: on its 16×16 level (the layout before 2026-12-03)
against its 8×8 level (common/models.py now), side by side in this process, as JSON.

    python bench/tiny_unet.py [--batch 48] [--reps 5] [--threads 2]

Batch 48 is 8 prompts × 3 images × 2 (classifier-free guidance), a report's render batch.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from diffusers import UNet2DConditionModel

LAYOUTS = {
    "attention_16x16": (("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D")),
    "attention_8x8": (("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")),
}


def _unet(down, up) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(  # the tiny preset's other settings (common/models.py)
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8, down_block_types=down, up_block_types=up,
    ).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, cond = torch.randn(args.batch, 4, 16, 16), torch.randn(args.batch, 77, 32)
    out = {"batch": args.batch, "reps": args.reps, "threads": args.threads}
    for name, (down, up) in LAYOUTS.items():
        unet = _unet(down, up)
        with torch.no_grad():
            unet(x, 10, cond)  # warm-up
            start = time.perf_counter()
            for _ in range(args.reps):
                unet(x, 10, cond)
        out[name] = {"s_per_forward": (time.perf_counter() - start) / args.reps,
                     "parameters": sum(p.numel() for p in unet.parameters())}
    out["ratio_16x16_over_8x8"] = out["attention_16x16"]["s_per_forward"] / out["attention_8x8"]["s_per_forward"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
