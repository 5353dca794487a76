"""`pag sft`: supervised fine-tuning of the reference / initial policy on (plain → engineered) prompt pairs.

The GFlowNet target is p(y | x) ∝ p_ref(y | x)^(1/γ) · exp(r / β): the reference must already write
prompt-like text, or the sampler explores gibberish. Pairs come from `sft/pairs.py`;
this module trains the policy with a causal-LM loss on the response tokens only:

    input  = fmt.policy_input(plain)          default "{plain} Rephrase:\\n"
    target = fmt.sft_target(plain, engineered) + EOS     loss = −mean_t log p(target_t | input, target_<t)

`fmt` is `common.formats.PolicyFormat` from `model.input_format` and `sampler.response`; with
`sampler.response=suffix` the input ends with "{plain}," and the target is only the part of the
engineered prompt after the plain one (rule in common/formats.py; pairs with nothing after it are
skipped). A non-default format is part of the cache key.

Training: AdamW with warm-up and cosine decay, grad-norm clip 1, `DEFAULTS` per model kind. The tiny
policy uses a sampled softmax (the pairs' ~3.8k tokens plus 2048 sampled others) because the full
50257-way softmax of a 64-d model dominates a CPU step; sft.json's `final_loss` is always the exact NLL.

The `tiny` preset calls `ensure_sft` at start-up: with no `model.sft_checkpoint` it trains once and
caches the checkpoint under ``$PAG_CACHE/sft/tiny-<hash>`` (default ``~/.cache/pag``), the hash
covering the policy architecture, the pairs and the SFT settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from common.config import Config, ConfigError
from common.formats import PolicyFormat
from sft.pairs import Pair, pairs_for

logger = logging.getLogger(__name__)

#: bump when the pair rule or the training loop changes meaning: it is part of every cache key
SFT_VERSION = 1
SFT_META = "sft.json"

Log = Callable[[str], None]


@dataclass(frozen=True)
class SFTSettings:
    """Training hyperparameters of one model kind; every field is part of the cache key."""

    steps: Optional[int]               # optimiser steps; None: `epochs` passes over the pairs
    batch_size: int                    # pairs per step
    lr: float                          # AdamW peak learning rate (10 % linear warm-up, cosine down to 10 %)
    epochs: float = 1.0                # used when steps is None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    negatives: Optional[int] = None    # sampled softmax: negatives per step; None: the exact softmax


#: tiny: a 2-layer 64-d GPT-2 from random weights; on 2 CPU cores the 50257-way softmax would cost most of
#: each step, so it trains with a sampled softmax (see `SampledSoftmax`) and writes prompt-like text in
#: about a minute. pretrained (sd14): GPT-2 small, a few gentle epochs with the exact softmax.
DEFAULTS: dict[str, SFTSettings] = {
    "tiny": SFTSettings(steps=400, batch_size=16, lr=3e-3, negatives=2048),
    "pretrained": SFTSettings(steps=None, epochs=3.0, batch_size=32, lr=5e-5, weight_decay=0.01),
}



def settings_for(cfg: Config, steps: Optional[int] = None, batch_size: Optional[int] = None,
                 lr: Optional[float] = None) -> SFTSettings:
    """The preset's defaults (by model kind) with any explicit value replacing its field."""
    base = DEFAULTS[cfg.model.kind]
    steps = steps if steps is not None else cfg.model.sft_steps
    over = {k: v for k, v in {"steps": steps, "batch_size": batch_size, "lr": lr}.items() if v is not None}
    for key, value in over.items():
        if value <= 0:
            raise ConfigError(f"SFT {key} must be positive, got {value}")
    return replace(base, **over)


def sft_hash(cfg: Config, pairs: Sequence[Pair], settings: SFTSettings) -> str:
    """Key of an SFT checkpoint: what shapes the starting policy, the exact pairs, the settings."""
    model = cfg.model
    part = {
        "version": SFT_VERSION,
        "policy": {"kind": model.kind, "policy": model.policy, "tokenizer": model.tokenizer, "seed": model.seed},
        "pairs": hashlib.sha256(json.dumps(list(pairs)).encode("utf-8")).hexdigest(),
        "settings": asdict(settings),
    }
    fmt = PolicyFormat.from_config(cfg)
    if not fmt.is_default:  # only then: default-format checkpoints keep their cached keys
        part["format"] = {"input_format": fmt.input_format, "response": fmt.response}
    if model.kind == "tiny":  # the architecture models.py builds, so a change there re-trains
        from common.models import build_tokenizer, tiny_gpt2_config

        arch = tiny_gpt2_config(len(build_tokenizer(model))).to_dict()
        arch.pop("transformers_version", None)
        part["architecture"] = arch
    return hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()[:12]


def format_pairs(pairs: Sequence[Pair], fmt: PolicyFormat) -> list[Pair]:
    """The pairs `fmt` can train on (suffix mode skips those with nothing after the plain prompt)."""
    return [(x, y) for x, y in pairs if fmt.sft_target(x, y) is not None]


def encode_pairs(tokenizer, pairs: Sequence[Pair], device: torch.device | str = "cpu",
                 fmt: PolicyFormat = PolicyFormat()) -> dict[str, torch.Tensor]:
    """Pairs → left-padded prompts (B, P) and right-padded responses ending in EOS (B, T), as `fmt` says."""
    eos = tokenizer.eos_token_id
    prompts = [tokenizer(fmt.policy_input(x))["input_ids"] for x, _ in pairs]
    targets = [tokenizer(fmt.sft_target(x, y))["input_ids"] + [eos] for x, y in pairs]
    P, T = max(map(len, prompts)), max(map(len, targets))
    prompt_ids = torch.full((len(pairs), P), eos, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    response_ids = torch.full((len(pairs), T), eos, dtype=torch.long)
    response_mask = torch.zeros_like(response_ids)
    for i, (p, y) in enumerate(zip(prompts, targets)):
        prompt_ids[i, P - len(p):], prompt_mask[i, P - len(p):] = torch.tensor(p), 1
        response_ids[i, : len(y)], response_mask[i, : len(y)] = torch.tensor(y), 1
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
             "response_ids": response_ids, "response_mask": response_mask}
    return {k: v.to(device) for k, v in batch.items()}


class SampledSoftmax:
    """Cross-entropy over the pairs' own tokens C plus k negatives drawn uniformly from the other V − |C|,
    whose logits get + log((V − |C|) / k) so their sum estimates the rest of the partition function
    (sampled softmax, Jean et al. 2015). Every target is in C, so no target is ever left out.
    """

    def __init__(self, target_ids: torch.Tensor, vocab_size: int, negatives: int, seed: int) -> None:
        self.keep = torch.unique(target_ids)  # (|C|,) sorted
        rest = torch.ones(vocab_size, dtype=torch.bool)
        rest[self.keep] = False
        self.rest = rest.nonzero().squeeze(1)
        self.k = min(negatives, len(self.rest))
        self.position = torch.full((vocab_size,), -1, dtype=torch.long)
        self.position[self.keep] = torch.arange(len(self.keep))
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, states: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        device = states.device
        negatives = self.rest[torch.randperm(len(self.rest), generator=self.generator)[: self.k]]
        ids = torch.cat([self.keep, negatives]).to(device)
        correction = torch.zeros(len(ids), device=device)
        correction[len(self.keep):] = math.log(len(self.rest) / max(self.k, 1))
        logits = states.float() @ weight[ids].float().T + correction  # (N, |C| + k)
        return F.cross_entropy(logits, self.position.to(device)[targets])


def response_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                 softmax: Optional[SampledSoftmax] = None) -> torch.Tensor:
    """Mean negative log-likelihood of the response tokens given the prompt, from one forward pass;
    exact unless a `SampledSoftmax` is given."""
    from common.decoding import position_ids_from_mask

    P, T = batch["prompt_ids"].shape[1], batch["response_ids"].shape[1]
    input_ids = torch.cat([batch["prompt_ids"], batch["response_ids"]], dim=1)  # (B, P+T)
    attention_mask = torch.cat([batch["prompt_mask"], batch["response_mask"]], dim=1)
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    mask = batch["response_mask"].bool()
    states = hidden[:, P - 1 : P - 1 + T][mask]  # (N, H): real response states only, before the costly head
    targets = batch["response_ids"][mask]  # (N,)
    head = model.get_output_embeddings()
    if softmax is not None:
        return softmax(states, targets, head.weight)
    return F.cross_entropy(head(states).float(), targets)  # (N, V) logits


@torch.no_grad()
def evaluate_nll(model: torch.nn.Module, tokenizer, pairs: Sequence[Pair], batch_size: int = 32,
                 fmt: PolicyFormat = PolicyFormat()) -> float:
    """Exact token-weighted mean response NLL over `pairs`, in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        batch = encode_pairs(tokenizer, pairs[i : i + batch_size], device, fmt)
        n = int(batch["response_mask"].sum())
        total, count = total + float(response_nll(model, batch)) * n, count + n
    model.train(was_training)
    return total / max(count, 1)


def _lr_factor(step: int, total: int) -> float:
    warmup = max(1, total // 10)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _batches(n: int, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless shuffled epochs of index batches (the last short batch of an epoch is kept)."""
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n, batch_size):
            yield order[i : i + batch_size]


def _fit(model: torch.nn.Module, tokenizer, pairs: Sequence[Pair], settings: SFTSettings, total: int,
         softmax: Optional[SampledSoftmax], seed: int, fmt: PolicyFormat = PolicyFormat()) -> list[float]:
    """The optimisation loop: AdamW, warm-up + cosine, grad-norm clip; returns the loss of every step."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total))
    batches = _batches(len(pairs), settings.batch_size, random.Random(seed))
    losses: list[float] = []
    bar = tqdm(range(total), desc="sft", unit="step", dynamic_ncols=True, mininterval=2.0)
    for _ in bar:
        batch = encode_pairs(tokenizer, [pairs[i] for i in next(batches)], device, fmt)
        loss = response_nll(model, batch, softmax)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"SFT loss is {loss.item()} at step {len(losses)}; lower the lr (now {settings.lr:g})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    return losses


def train_sft(cfg: Config, out_dir: str | Path, steps: Optional[int] = None, batch_size: Optional[int] = None,
              lr: Optional[float] = None, log: Log = logger.info, *, pairs: Optional[Sequence[Pair]] = None) -> Path:
    """Fine-tune the starting policy (`model.policy`; tiny: seeded random weights) on `build_pairs` of
    `sampler.datasets` and save it into `out_dir`: model and tokenizer with save_pretrained, plus sft.json.
    Atomic: everything is written to a temporary sibling directory renamed into place at the end.
    """
    from common.models import build_policy, build_tokenizer, resolve_device

    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / SFT_META).is_file():
        raise FileExistsError(f"{out_dir} exists and is not an SFT checkpoint (no {SFT_META}); choose another --out")
    settings = settings_for(cfg, steps, batch_size, lr)
    seed = cfg.model.seed
    fmt = PolicyFormat.from_config(cfg)
    pairs = format_pairs(list(pairs) if pairs is not None else pairs_for(cfg), fmt)
    if not pairs:
        raise ConfigError(f"sampler.response = {fmt.response}: no SFT pair has text after its plain prompt")
    total = settings.steps or max(1, math.ceil(settings.epochs * len(pairs) / settings.batch_size))

    device = resolve_device(cfg.run.device)
    base = cfg.model.model_copy(update={"sft_checkpoint": None})  # SFT always starts from model.policy
    tokenizer = build_tokenizer(base)
    model = build_policy(base, tokenizer).to(device).train()
    softmax = None
    if settings.negatives:
        all_targets = torch.tensor([t for x, y in pairs for t in tokenizer(fmt.sft_target(x, y))["input_ids"]]
                                   + [tokenizer.eos_token_id])
        softmax = SampledSoftmax(all_targets, len(tokenizer), settings.negatives, seed)
    log(f"SFT {cfg.preset}: {len(pairs)} pairs, {total} steps × {settings.batch_size}, lr {settings.lr:g}, "
        f"{'exact softmax' if softmax is None else f'sampled softmax ({len(softmax.keep)} + {softmax.k} tokens)'}, "
        f"device {device} → {out_dir}")
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # leave the caller's RNG alone
        torch.manual_seed(seed)  # dropout (gpt2)
        losses = _fit(model, tokenizer, pairs, settings, total, softmax, seed, fmt)
    probe = list(pairs[:: max(1, len(pairs) // 64)])[:64]  # exact NLL on an even sample of the pairs
    tail = losses[-min(10, len(losses)):]
    meta = {
        "version": SFT_VERSION, "preset": cfg.preset, "config_hash": sft_hash(cfg, pairs, settings),
        "steps": total, "pairs": len(pairs), "final_loss": round(evaluate_nll(model, tokenizer, probe, fmt=fmt), 4),
        "train_loss": round(sum(tail) / len(tail), 4), "first_loss": round(losses[0], 4),
        "settings": asdict(settings), "datasets": [str(d) for d in cfg.sampler.datasets], "seed": seed,
        "policy": cfg.model.policy, "seconds": round(time.perf_counter() - start, 1),
        "created_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SFT_META).write_text(json.dumps(meta, indent=2) + "\n")  # last: it marks a whole checkpoint
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"SFT done in {meta['seconds']} s: loss {meta['first_loss']:.3f} → {meta['final_loss']:.3f} "
        f"(exact NLL on {len(probe)} pairs), saved {out_dir}")
    return out_dir


def _replace_dir(src: Path, dst: Path) -> None:
    """Move `src` to `dst`; an existing `dst` is moved aside first and deleted after."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        os.rename(dst, old)
    os.rename(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
