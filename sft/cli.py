"""`pag sft`: fine-tune the reference / initial policy and print a few sampled rewrites."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from common.presets import default_preset
from common.config import Config, ConfigError
from common.formats import PolicyFormat
from sft.cache import default_out_dir
from sft.pairs import Pair, pairs_for
from sft.train import DEFAULTS, settings_for, train_sft


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sft", help="fine-tune the reference / initial policy on (plain → engineered) prompt pairs",
        description="Supervised fine-tuning of the GPT-2 policy on (plain → engineered) prompt pairs built from the "
                    "train split of sampler.datasets (never the paper's evaluation sets): engineered prompts with "
                    "their style modifiers stripped, and plain captions with sampled modifiers appended. "
                    "The loss covers the response tokens of '{plain} Rephrase:\\n' → '{engineered}<eos>'.",
        epilog="The tiny preset runs this automatically (cached under $PAG_CACHE/sft, default ~/.cache/pag) when "
               "model.sft_checkpoint is unset. For the paper: `pag sft --preset sd14 --out ckpt/sft` then "
               "`pag train --preset sd14 model.sft_checkpoint=ckpt/sft`.",
    )
    p.add_argument("--preset", default=default_preset(), choices=["tiny", "tiny-proxy", "mini", "sd14"],
                   help="tiny (random 2-layer GPT-2, CPU, about a minute), mini (the same on the miniature world's "
                        "pairs) or sd14 (gpt2 from the hub)")
    p.add_argument("--config", dest="config_file", help="YAML file with sections model/sampler/…")
    p.add_argument("--out", help="checkpoint directory (default: $PAG_CACHE/sft/<preset>-<hash>, where tiny's "
                                 "automatic SFT looks)")
    tiny, sd14 = DEFAULTS["tiny"], DEFAULTS["pretrained"]
    p.add_argument("--steps", type=int, help=f"optimiser steps (default: model.sft_steps, else tiny {tiny.steps}; "
                                             f"sd14 {sd14.epochs:g} epochs over the pairs)")
    p.add_argument("--batch-size", type=int, help=f"pairs per step (default: tiny {tiny.batch_size}, "
                                                  f"sd14 {sd14.batch_size})")
    p.add_argument("--lr", type=float, help=f"peak AdamW learning rate (default: tiny {tiny.lr:g}, sd14 {sd14.lr:g})")
    p.add_argument("--samples", type=int, default=4, help="rewrites to sample and print after training (0: none)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. model.seed=1 "
                                                "sampler.datasets=[pickapic,coco_all]")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from common.config import load_config
    from common.data import DatasetError

    cfg = load_config(args.preset, args.config_file, args.overrides)
    settings = settings_for(cfg, args.steps, args.batch_size, args.lr)
    try:
        pairs = pairs_for(cfg)
    except DatasetError as exc:
        raise ConfigError(f"sampler.datasets: {exc}") from exc
    out = Path(args.out) if args.out else default_out_dir(cfg, pairs, settings)
    train_sft(cfg, out, args.steps, args.batch_size, args.lr, log=print, pairs=pairs)
    if args.samples > 0:
        plains = [x for x, _ in pairs[:: max(1, len(pairs) // args.samples)]][: args.samples]
        print("sampled rewrites:")
        for plain, rewrite in sample_rewrites(cfg, str(out), plains):
            print(f"  {plain!r}\n    → {rewrite!r}")
    print(f"use it with: model.sft_checkpoint={out}")
    return 0


def sample_rewrites(cfg: Config, checkpoint: Optional[str], plains: Sequence[str], temperature: float = 0.7,
                    seed: int = 0) -> list[Pair]:
    """(plain, sampled rewrite) with `common.decoding.sample` (a quick look at what a checkpoint writes)."""
    from common.models import build_policy, build_tokenizer
    from common.decoding import encode_prompts, sample

    base = cfg.model.model_copy(update={"sft_checkpoint": None})  # checkpoint None: the untrained policy
    tokenizer = build_tokenizer(base)
    model = build_policy(base, tokenizer, checkpoint=checkpoint).eval()
    fmt = PolicyFormat.from_config(cfg)
    ids, mask = encode_prompts(tokenizer, list(plains), torch.device("cpu"), fmt)
    ids, mask = sample(model, ids, mask, max_len=cfg.sampler.max_len,
                       min_len=cfg.sampler.min_len, temperature=temperature, eos_id=tokenizer.eos_token_id,
                       generator=torch.Generator().manual_seed(seed))
    texts = [fmt.rewrite(x, tokenizer.decode(row[m.bool()], skip_special_tokens=True))
             for x, row, m in zip(plains, ids, mask)]
    return list(zip(plains, texts))
