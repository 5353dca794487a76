"""IPGO's two loops: prompt-wise (one token set per prompt) and prompt-batch (one token set for a set).

One iteration: tokens → C = [prefix; H; suffix] → DRaFT-K image from the fixed noise → reward r (the sum
of the `ipgo.reward` scorers, differentiable) → loss = −r + w·c (c the conformity) → Adam step with the
gradient norm clipped, StepLR, and the angles wrapped back into [−π, π). On a GPU with `render.fp16` the
frozen models are half precision, the forward runs under autocast and a GradScaler scales the loss; the
tokens themselves stay float32.

Prompt-wise keeps the best iterate by *training* reward (the notebook's selection; optimistic, since it is
chosen on the noise it was trained with — `pag eval` also reports held-out seeds).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ipgo.conditioning import PromptEncoder, conformity, inject
from ipgo.draft import DraftSampler
from ipgo.tokens import PromptTokens

Tokens = dict[str, torch.Tensor]  # {"prefix": (P, d), "suffix": (S, d)}: what a run exports


@dataclass
class IpgoModels:
    """The frozen models an IPGO run needs, built once per process (a Ray task reuses them)."""

    cfg: object                  # common.config.Config
    encoder: PromptEncoder
    sampler: DraftSampler
    score: Callable              # differentiable scorer fn(images in [−1, 1], prompts) → {key: (N,)}
    device: torch.device
    half: bool                   # fp16 weights + autocast + GradScaler

    @property
    def dim(self) -> int:
        return self.encoder.text_encoder.config.hidden_size

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.float16) if self.half else contextlib.nullcontext()


def build_models(cfg, device: torch.device | str = "cpu") -> IpgoModels:
    """SD (text encoder, UNet, VAE) and the differentiable reward of `cfg.ipgo.reward`, frozen, on `device`."""
    from diffusers import StableDiffusionPipeline

    from common.models import ModelLoadError, build_sd_pipeline
    from scoring.scorers import build_scorers

    device = torch.device(device)
    half = device.type == "cuda" and cfg.render.fp16
    dtype = torch.float16 if half else torch.float32
    pipe = build_sd_pipeline(cfg.model, device, dtype)
    if not isinstance(pipe, StableDiffusionPipeline):
        raise ModelLoadError(f"IPGO optimises tokens in SD v1.x's single CLIP text space; model.sd = {cfg.model.sd!r} "
                             f"is a {type(pipe).__name__}: point model.sd at an SD v1.x pipeline")
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    ic = cfg.ipgo
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, ic.layout, ic.prefix_tokens, ic.suffix_tokens)
    sampler = DraftSampler(pipe.unet, pipe.vae, pipe.scheduler.config, ic.steps, ic.grad_steps, cfg.render.guidance,
                           ic.checkpointing)
    score = build_scorers(ic.reward, cfg.model, device, dtype, differentiable=True, pixels="signed")
    return IpgoModels(cfg, encoder, sampler, score, device, half)


def reward(models: IpgoModels, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """(N,) training reward: the sum of the configured scorers' scores (each float32, differentiable)."""
    scores = models.score(images, list(prompts))
    return torch.stack(list(scores.values())).sum(0)


@torch.no_grad()
def heldout_seeds(eval_seed: int, k: int, train_seed: int) -> list[int]:
    """The first `k` seeds from eval_seed upward, skipping the training noise's seed."""
    seeds, s = [], eval_seed
    while len(seeds) < k:
        if s != train_seed:
            seeds.append(s)
        s += 1
    return seeds


def mean_reward(models: IpgoModels, prompt: str, tokens: Optional[Tokens], seeds: Sequence[int]) -> float:
    """IPGO's training reward of `prompt` (with `tokens`, or plain with None) averaged over the noise of `seeds`."""
    return sum(render(models, prompt, tokens, s)[1]["reward"] for s in seeds) / len(seeds)


def render(models: IpgoModels, prompt: str, tokens: Optional[Tokens] = None, seed: Optional[int] = None,
           scorers: Optional[Callable] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Image (3, H, W) in [0, 1] on the CPU and its scores, for the plain prompt (tokens=None) or the prompt
    with learned tokens; `seed` None: the training noise. `scorers` (a no-grad fn taking [−1, 1] images)
    adds other scores, e.g. for a reward-hacking check."""
    seed = models.cfg.ipgo.seed if seed is None else seed
    enc = models.encoder.encode(prompt, injected=tokens is not None)
    cond = enc.states if tokens is None else inject(enc.states, tokens["prefix"].to(models.device),
                                                    tokens["suffix"].to(models.device))
    with models.autocast():
        images = models.sampler(cond, enc.uncond, models.sampler.noise(seed, models.cfg.model.image_size))
        out = {"reward": float(reward(models, images, [prompt])[0])}
        if scorers is not None:
            out.update({k: float(v[0]) for k, v in scorers(images, [prompt]).items()})
    return (images[0].float() / 2 + 0.5).clamp(0, 1).cpu(), out


class _Trainer:
    """Adam + StepLR + grad-norm clip + GradScaler around one PromptTokens."""

    def __init__(self, models: IpgoModels, batch: bool = False) -> None:
        ic = models.cfg.ipgo
        self.models, self.ic = models, ic
        self.tokens = PromptTokens.from_config(ic, models.dim).to(models.device)
        self.opt = torch.optim.Adam(self.tokens.parameters(), lr=ic.lr)
        step, gamma = (ic.batch_lr_step, ic.batch_lr_gamma) if batch else (ic.lr_step, ic.lr_gamma)  # the notebook's
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=step, gamma=gamma)
        self.scaler = torch.amp.GradScaler("cuda", enabled=models.half)
        self.noise = models.sampler.noise(ic.seed, models.cfg.model.image_size)

    def forward_backward(self, prompt: str, scale: float = 1.0) -> tuple[float, float, torch.Tensor]:
        """One prompt's loss, backpropagated (× scale, for accumulation): (reward, conformity, image)."""
        enc = self.models.encoder.encode(prompt)
        prefix, suffix = self.tokens()
        cond = inject(enc.states.float(), prefix, suffix)  # (1, T, d) float32: the tokens' precision
        with self.models.autocast():
            image = self.models.sampler(cond, enc.uncond, self.noise)
            r = reward(self.models, image, [prompt])
        c = conformity(cond, enc.states)
        loss = (-r.mean() + self.ic.conformity_weight * c) * scale
        if not torch.isfinite(loss):
            raise FloatingPointError(f"IPGO loss is {loss.item()} for prompt {prompt!r} (reward {r.tolist()}, conformity {c.item()})")
        self.scaler.scale(loss).backward()
        return float(r.detach().mean()), float(c.detach()), image.detach()

    def save(self, path: Path, progress: dict) -> None:
        """Tokens, Adam moments and the schedule to `path`.safetensors + `path`.json (no pickle), atomically;
        `progress` (JSON) is stored beside them."""
        from safetensors.torch import save_file

        tensors = {f"tokens.{k}": v.detach().cpu().contiguous() for k, v in self.tokens.state_dict().items()}
        opt = self.opt.state_dict()
        for index, state in opt["state"].items():
            for key, value in state.items():
                tensors[f"adam.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        meta = {"param_groups": opt["param_groups"], "sched": self.sched.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None, "progress": progress}
        for suffix, write in ((".safetensors", lambda t: save_file(tensors, str(t))),
                              (".json", lambda t: t.write_text(json.dumps(meta)))):
            tmp = path.with_suffix(suffix + ".tmp")
            write(tmp)
            os.replace(tmp, path.with_suffix(suffix))

    def load(self, path: Path) -> dict:
        """Restore what `save` wrote; returns its `progress`."""
        from safetensors.torch import load_file

        tensors = load_file(str(path.with_suffix(".safetensors")))
        meta = json.loads(path.with_suffix(".json").read_text())
        self.tokens.load_state_dict({k.removeprefix("tokens."): v for k, v in tensors.items() if k.startswith("tokens.")})
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("adam."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value.to(self.models.device) if name != "step" else value
        self.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.sched.load_state_dict(meta["sched"])
        if meta["scaler"] is not None:
            self.scaler.load_state_dict(meta["scaler"])
        return meta["progress"]

    def step(self) -> None:
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.tokens.parameters(), self.ic.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.tokens.wrap_()


@dataclass
class PromptResult:
    """What prompt-wise IPGO keeps for one prompt."""

    prompt: str
    initial_reward: float            # the plain prompt, same noise
    best_reward: float               # best training reward over the iterations
    best_iteration: int
    curve: list[float]               # training reward per iteration
    conformity: list[float]
    tokens: Tokens                   # the best iterate's tokens
    best_image: torch.Tensor         # (3, H, W) in [0, 1]
    initial_image: torch.Tensor
    truncated: bool
    seconds: float
    peak_memory_bytes: Optional[int] = None  # GPU only


def _peak_start(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> Optional[int]:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def optimize_prompt(models: IpgoModels, prompt: str, iterations: Optional[int] = None,
                    on_iteration: Optional[Callable[[int, float], None]] = None) -> PromptResult:
    """Prompt-wise IPGO: `iterations` (default ipgo.iterations) steps on one prompt; keeps the best iterate."""
    iterations = models.cfg.ipgo.iterations if iterations is None else iterations
    initial_image, initial = render(models, prompt)
    _peak_start(models.device)
    start = time.perf_counter()
    trainer = _Trainer(models)
    best = (-math.inf, -1, None, None)
    curve, conf = [], []
    truncated = models.encoder.encode(prompt).truncated
    for it in range(iterations):
        r, c, image = trainer.forward_backward(prompt)
        curve.append(r)
        conf.append(c)
        if r > best[0]:  # the tokens that produced r: exported before the step moves them
            best = (r, it, trainer.tokens.export(), image)
        trainer.step()
        if on_iteration is not None:
            on_iteration(it, r)
    seconds = time.perf_counter() - start
    image = (best[3][0].float() / 2 + 0.5).clamp(0, 1).cpu()
    return PromptResult(prompt, initial["reward"], best[0], best[1], curve, conf, best[2], image, initial_image,
                        truncated, seconds, _peak(models.device))


@dataclass
class BatchResult:
    """What prompt-batch IPGO learns: one token set for the training prompts."""

    tokens: Tokens
    epoch_reward: list[float]        # mean training reward per epoch
    train_prompts: list[str]
    seconds: float
    peak_memory_bytes: Optional[int] = None
    steps: int = 0
    curve: list[float] = field(default_factory=list)  # every prompt's training reward, in order


def optimize_batch(models: IpgoModels, prompts: Sequence[str], epochs: Optional[int] = None,
                   on_prompt: Optional[Callable[[int, int, float], None]] = None,
                   state: Optional[Path] = None) -> BatchResult:
    """Prompt-batch IPGO: `epochs` passes over `prompts` in a seeded shuffled order, one optimiser step per
    `ipgo.grad_accum` prompts (the loss of each divided by the accumulation count). With `state` (a path
    without suffix) the trainer is saved after every epoch and a rerun continues after the last saved one
    with the same prompt order."""
    if not prompts:
        raise ValueError("prompt-batch IPGO needs at least one training prompt")
    ic = models.cfg.ipgo
    epochs = ic.epochs if epochs is None else epochs
    _peak_start(models.device)
    start = time.perf_counter()
    trainer = _Trainer(models, batch=True)
    rng = random.Random(ic.seed)
    epoch_reward, curve, steps, first = [], [], 0, 0
    if state is not None and state.with_suffix(".json").is_file():
        progress = trainer.load(state)
        if progress["prompts"] != list(prompts):
            raise ValueError(f"{state.with_suffix('.json')}: saved for another prompt set; remove it or use a new run")
        first, steps = progress["epochs_done"], progress["steps"]
        epoch_reward, curve = progress["epoch_reward"], progress["curve"]
        for _ in range(first):
            rng.shuffle(list(prompts))  # the skipped epochs' draws: later orders stay those of an uninterrupted run
    for epoch in range(first, epochs):
        order = list(prompts)
        rng.shuffle(order)
        rewards = []
        for j, prompt in enumerate(order):
            group = min(ic.grad_accum, len(order) - (j // ic.grad_accum) * ic.grad_accum)  # the last group may be short
            r, _, _ = trainer.forward_backward(prompt, scale=1.0 / group)
            rewards.append(r)
            if (j + 1) % ic.grad_accum == 0 or j + 1 == len(order):
                trainer.step()
                steps += 1
            if on_prompt is not None:
                on_prompt(epoch, j, r)
        epoch_reward.append(sum(rewards) / len(rewards))
        curve.extend(rewards)
        if state is not None:
            trainer.save(state, {"epochs_done": epoch + 1, "steps": steps, "epoch_reward": epoch_reward,
                                 "curve": curve, "prompts": list(prompts)})
    return BatchResult(trainer.tokens.export(), epoch_reward, list(prompts), time.perf_counter() - start,
                       _peak(models.device), steps, curve)
