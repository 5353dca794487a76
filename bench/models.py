"""Time to build every model of a preset (default tiny) on this machine, as JSON.

    python bench/models.py [--preset tiny] [--threads 2]

Each builder runs once in this process after the imports (import time reported separately), so the
figures are what an actor pays at start-up.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    t0 = time.perf_counter()
    import torch

    from common import clip as C
    from common import models as M
    from common.config import load_config

    torch.set_num_threads(args.threads)
    imports = time.perf_counter() - t0
    cfg = load_config(args.preset).model
    timings, params = {}, {}

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - start, 3)
        return out

    tok = timed("tokenizer", lambda: M.build_tokenizer(cfg))
    policy = timed("policy", lambda: M.build_policy(cfg, tok))
    timed("reference", lambda: M.build_reference(cfg, tok))
    pipe = timed("sd_pipeline", lambda: M.build_sd_pipeline(cfg))
    clip = timed("clip", lambda: C.build_clip(cfg))
    timed("aesthetic", lambda: C.build_aesthetic(cfg))
    timed("sentence_encoder", lambda: M.build_sentence_encoder(cfg, tok))
    params = {"policy": M.count_parameters(policy), "unet": M.count_parameters(pipe.unet),
              "vae": M.count_parameters(pipe.vae), "text_encoder": M.count_parameters(pipe.text_encoder),
              "clip": M.count_parameters(clip.model)}
    print(json.dumps({"preset": args.preset, "threads": args.threads, "cpus": os.cpu_count(),
                      "import_s": round(imports, 3), "build_s": timings,
                      "build_total_s": round(sum(timings.values()), 3),
                      "total_with_imports_s": round(imports + sum(timings.values()), 3),
                      "parameters": params}, indent=1))


if __name__ == "__main__":
    main()
