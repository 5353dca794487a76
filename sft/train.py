"""`pag sft`: supervised fine-tuning of the reference / initial policy on (plain → engineered) prompt pairs.

The GFlowNet target is p(y | x) ∝ p_ref(y | x)^(1/γ) · exp(r / β): the reference must already write
prompt-like text, or the sampler explores gibberish. This module builds training pairs from the
packaged prompt sets and trains the policy with a causal-LM loss on the response tokens only:

    input  = fmt.policy_input(plain)          default "{plain} Rephrase:\\n"
    target = fmt.sft_target(plain, engineered) + EOS     loss = −mean_t log p(target_t | input, target_<t)

`fmt` is `common.formats.PolicyFormat` from `model.input_format` and `sampler.response`; with
`sampler.response=suffix` the input ends with "{plain}," and the target is only the part of the
engineered prompt after the plain one (rule in common/formats.py; pairs with nothing after it are
skipped). A non-default format is part of the cache key.

How pairs are made (`build_pairs`; deterministic for a seed). Only the *train* split of each set is
read, through `common.data.load_train_prompts`, so the paper's four evaluation sets (chatgpt, lexica,
coco, diffusiondb) never contribute; a pair whose plain or target text is in one of them (ignoring
case, spacing and end punctuation) is dropped as well.

1. Engineered sets (`ENGINEERED_SETS`: diffusiondb_ipgo, pickapic — user prompts with style
   modifiers). Each prompt is split at its first separator — ``,`` ``;`` ``|`` ``--`` ``. `` or
   `` by `` — into a *subject* and a *tail*. The plain source is the subject, lower-cased, whitespace
   collapsed, trailing punctuation stripped; the target is the prompt itself. The pair is skipped if
   the plain has fewer than two words or equals the target. A prompt with no separator at all is a
   plain prompt: it joins the plain pool of step 3.
2. Modifier vocabulary. Each tail is cut at the same separators into modifiers (lower-cased;
   ``by <artist>`` keeps its ``by``). Modifiers of at most 4 words and 2–40 characters seen in at least two
   prompts form the vocabulary, weighted by that count (all seen once, if fewer than 10 qualify).
3. Plain sets (every other set: coco_all and the other COCO captions, user files) plus the
   modifier-free prompts of step 1. Each plain prompt is paired with itself (trailing period
   removed) followed by ``, `` and 2–6 modifiers drawn from the vocabulary without replacement,
   proportionally to their counts, so the policy learns "caption → caption, modifiers".

With the default `sampler.datasets` (diffusiondb_ipgo, pickapic, coco_all) and seed 0 this gives
770 pairs: 333 stripped from engineered prompts (3 more dropped: their plain is a diffusiondb eval prompt)
and 437 plain prompts with modifiers appended (252 COCO captions, 185 separator-free engineered-set
prompts; 137 modifiers).

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
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from common.config import Config, ConfigError
from common.formats import PolicyFormat
from common.data import PAPER_EVAL_SETS, load_prompts, load_train_prompts, normalize

logger = logging.getLogger(__name__)

#: bump when the pair rule or the training loop changes meaning: it is part of every cache key
SFT_VERSION = 1
#: sets whose prompts already carry style modifiers; every other set is treated as plain captions
ENGINEERED_SETS = frozenset({"diffusiondb_ipgo", "pickapic"})
SFT_META = "sft.json"

Pair = tuple[str, str]
Log = Callable[[str], None]

_SEPARATOR = re.compile(r"\s*(?:,|;|\||--|\.\s)\s*|\s+by\s+", re.IGNORECASE)
_PIECE_SEPARATOR = re.compile(r"\s*(?:,|;|\||--|\.\s)\s*")


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


# ---------------------------------------------------------------- pairs

def split_modifiers(prompt: str) -> tuple[str, str]:
    """(subject, tail) at the first separator; tail is '' when the prompt has none."""
    match = _SEPARATOR.search(prompt)
    if match is None:
        return prompt, ""
    return prompt[: match.start()], prompt[match.start():]


def plain_of(prompt: str) -> str:
    """The plain source of an engineered prompt: its subject, lower-cased, tidied."""
    subject, _ = split_modifiers(prompt)
    return normalize(subject).lower().strip(" .,;:!-")


def modifiers_of(prompt: str) -> list[str]:
    """The style modifiers in an engineered prompt's tail, lower-cased (``by X`` keeps ``by``)."""
    _, tail = split_modifiers(prompt)
    tail = re.sub(r"^\s*(?:,|;|\||--|\.\s)\s*", "", tail).strip()
    pieces = (normalize(p).lower().strip(" .,;:!-") for p in _PIECE_SEPARATOR.split(tail))
    return [p for p in pieces if p]


def modifier_vocabulary(prompts: Sequence[str], min_count: int = 2) -> list[tuple[str, int]]:
    """(modifier, number of prompts holding it), most frequent first, ties alphabetical."""
    counts: dict[str, int] = {}
    for prompt in prompts:
        for mod in set(modifiers_of(prompt)):
            if len(mod.split()) <= 4 and 2 <= len(mod) <= 40 and re.search(r"[a-z]", mod):
                counts[mod] = counts.get(mod, 0) + 1
    vocab = sorted(((m, c) for m, c in counts.items() if c >= min_count), key=lambda mc: (-mc[1], mc[0]))
    if len(vocab) < 10:
        vocab = sorted(counts.items(), key=lambda mc: (-mc[1], mc[0]))
    return vocab


def _weighted_sample(rng: random.Random, vocab: Sequence[tuple[str, int]], k: int) -> list[str]:
    """k distinct items with P ∝ count (Efraimidis–Spirakis keys u^(1/w)); deterministic given rng."""
    keyed = sorted(((rng.random() ** (1.0 / w), m) for m, w in vocab), reverse=True)
    return [m for _, m in keyed[:k]]


def _key(text: str) -> str:
    """What two prompts share when they are 'the same' for the eval-set ban: case, spaces, end punctuation."""
    return normalize(text).lower().strip(" .,;:!-")


def _set_names(names: Sequence[str | Path]) -> tuple[list[str | Path], list[str | Path]]:
    engineered = [n for n in names if str(n) in ENGINEERED_SETS]
    plain = [n for n in names if str(n) not in ENGINEERED_SETS]
    return engineered, plain


def build_pairs(prompt_set_names: Sequence[str | Path], seed: int = 0) -> list[Pair]:
    """(plain, engineered) training pairs from the train split of the given sets (rule in the module doc)."""
    names = [n for n in prompt_set_names if str(n) not in PAPER_EVAL_SETS]
    if len(names) < len(prompt_set_names):
        logger.warning("SFT never trains on the paper evaluation sets: ignoring %s",
                       [str(n) for n in prompt_set_names if str(n) in PAPER_EVAL_SETS])
    engineered_names, plain_names = _set_names(names)
    banned = {_key(p) for name in PAPER_EVAL_SETS for p in load_prompts(name, "all").prompts}
    rng = random.Random(seed)

    engineered = load_train_prompts(engineered_names).prompts if engineered_names else []
    pairs: list[Pair] = []
    plain_pool: list[str] = []
    for prompt in engineered:
        if not split_modifiers(prompt)[1]:
            plain_pool.append(prompt)  # nothing to strip: it is a plain prompt
            continue
        plain = plain_of(prompt)
        if len(plain.split()) >= 2 and plain != prompt.lower():
            pairs.append((plain, prompt))
    n_stripped = len(pairs)

    if plain_names:
        plain_pool.extend(load_train_prompts(plain_names).prompts)
    vocab = modifier_vocabulary(engineered)
    if plain_pool and not vocab:
        raise ConfigError(f"sampler.datasets = {[str(n) for n in prompt_set_names]}: no style modifiers to append to "
                          f"plain prompts; include an engineered set ({', '.join(sorted(ENGINEERED_SETS))})")
    for prompt in plain_pool:
        mods = _weighted_sample(rng, vocab, rng.randint(2, 6))
        pairs.append((prompt, prompt.rstrip(" .") + ", " + ", ".join(mods)))

    kept = [(x, y) for x, y in pairs if _key(x) not in banned and _key(y) not in banned and x != y]
    if len(kept) < len(pairs):
        logger.info("dropped %d pair(s) touching the paper evaluation sets", len(pairs) - len(kept))
    logger.info("SFT pairs: %d stripped from engineered prompts, %d plain prompts + modifiers (%d modifiers), "
                "%d kept", n_stripped, len(pairs) - n_stripped, len(vocab), len(kept))
    if not kept:
        raise ConfigError(f"sampler.datasets = {[str(n) for n in prompt_set_names]}: no SFT pairs left after the "
                          f"train split and the removal of the paper evaluation sets")
    return kept


# ---------------------------------------------------------------- training

def settings_for(cfg: Config, steps: Optional[int] = None, batch_size: Optional[int] = None,
                 lr: Optional[float] = None) -> SFTSettings:
    """The preset's defaults (by model kind) with any explicit value replacing its field."""
    base = DEFAULTS[cfg.model.kind]
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
    pairs = format_pairs(list(pairs) if pairs is not None else build_pairs(cfg.sampler.datasets, seed), fmt)
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


# ---------------------------------------------------------------- cache

def cache_root() -> Path:
    return Path(os.environ.get("PAG_CACHE") or "~/.cache/pag").expanduser()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (flock) for the `with` block; without fcntl, rely on the atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def require_sft(cfg: Config) -> None:
    """Stop before anything starts when a pretrained policy has no SFT checkpoint.

    Falling back to vanilla GPT-2 for the policy *and* the reference changes the target distribution
    itself (R(y|x) · p_ref(y|x)^(1/γ)), so the run would not be the paper's. `tiny` trains its own;
    `sd14-arch` (random weights, speed only) needs none."""
    model = cfg.model
    if model.sft_checkpoint or model.kind != "pretrained":
        return
    raise ConfigError(
        f"model.sft_checkpoint is not set for preset {cfg.preset!r}: the policy and the frozen reference must start "
        "from an SFT checkpoint, vanilla GPT-2 changes the target distribution. Get one with "
        f"`pag sft --preset {cfg.preset}` (trains GPT-2 on the packaged plain -> engineered pairs and prints the "
        "checkpoint directory), or use a copy of the Promptist SFT model (a Hugging Face directory or hub id; set "
        "model.input_format=promptist for it), then pass model.sft_checkpoint=DIR.")


def ensure_sft(cfg: Config, *, log: Log = logger.info) -> str:
    """The checkpoint the policy and reference start from.

    `model.sft_checkpoint` set: that. tiny without one: ``$PAG_CACHE/sft/tiny-<hash>``, trained first if
    missing (a file lock makes concurrent callers wait for one training run). A pretrained policy
    (sd14) without one: ConfigError (`require_sft`); sd14-arch: `model.policy` (random weights).
    """
    model = cfg.model
    if model.sft_checkpoint:
        return model.sft_checkpoint
    require_sft(cfg)
    if model.kind != "tiny":
        return model.policy
    pairs = build_pairs(cfg.sampler.datasets, model.seed)
    out_dir = default_out_dir(cfg, pairs, settings_for(cfg))
    done = out_dir / SFT_META
    if done.is_file():
        return str(out_dir)
    with _file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if not done.is_file():  # another process may have finished while we waited
            log(f"no cached SFT checkpoint for the tiny policy: training one into {out_dir} (once)")
            train_sft(cfg, out_dir, log=log, pairs=pairs)
    return str(out_dir)


def default_out_dir(cfg: Config, pairs: Sequence[Pair], settings: SFTSettings) -> Path:
    return cache_root() / "sft" / f"{cfg.preset}-{sft_hash(cfg, pairs, settings)}"


# ---------------------------------------------------------------- CLI

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
    p.add_argument("--preset", default="tiny", choices=["tiny", "tiny-proxy", "sd14"],
                   help="tiny (random 2-layer GPT-2, CPU, about a minute) or sd14 (gpt2 from the hub)")
    p.add_argument("--config", dest="config_file", help="YAML file with sections model/sampler/…")
    p.add_argument("--out", help="checkpoint directory (default: $PAG_CACHE/sft/<preset>-<hash>, where tiny's "
                                 "automatic SFT looks)")
    tiny, sd14 = DEFAULTS["tiny"], DEFAULTS["pretrained"]
    p.add_argument("--steps", type=int, help=f"optimiser steps (default: tiny {tiny.steps}; sd14 {sd14.epochs:g} "
                                             "epochs over the pairs)")
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
        pairs = build_pairs(cfg.sampler.datasets, cfg.model.seed)
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
