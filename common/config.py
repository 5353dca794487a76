"""One validated config tree for every role, built from a preset, an optional YAML file and
`key=value` overrides, in that order.

    cfg = load_config("tiny", yaml_path=None, overrides=["learner.lr=3e-5"])

A wrong key or value raises ConfigError naming the field, the bad value and what is allowed,
before anything starts. Derived values live in `Config.derived()`, computed in one place.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import UsageError


class ConfigError(UsageError, ValueError):
    """A config key or value that is wrong; the message names the field and what is allowed."""

    label = "config error"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    kind: Literal["tiny", "pretrained", "arch"] = Field("pretrained", description="tiny: seeded random weights, tiny configs; pretrained: from_pretrained; arch: the real sd14 architectures at full size with seeded random weights (speed and memory measurements, no downloads)")
    policy: str = Field("gpt2", description="GPT-2 hub id or local directory of the policy's starting point")
    sft_checkpoint: Optional[str] = Field(None, description="SFT checkpoint (hub id or dir) for policy and reference; None: `policy` (tiny: auto-SFT, cached)")
    tokenizer: Optional[str] = Field(None, description="tokenizer id/dir; None: the policy's, or the packaged GPT-2 files for tiny")
    sd: str = Field("CompVis/stable-diffusion-v1-4", description="Stable Diffusion hub id or local directory")
    clip_arch: str = Field("ViT-L-14", description="open_clip architecture for aesthetic and relevance")
    clip_pretrained: str = Field("openai", description="open_clip pretrained tag, or a local checkpoint file")
    aesthetic_weights: Optional[str] = Field(None, description="LAION aesthetic MLP weights; None: the packaged sac+logos+ava1-l14-linearMSE")
    sentence_encoder: str = Field("sentence-transformers/paraphrase-MiniLM-L6-v2", description="sentence encoder for text diversity (hub id or dir)")
    image_size: int = Field(512, ge=32, description="SD render size in pixels")
    seed: int = Field(0, description="seed for tiny random weights")
    input_format: Literal["pag", "promptist"] = Field("pag", description="policy input template (common/formats.py): pag '{x} Rephrase:\\n'; promptist '{x} Rephrase:' (no newline, as Promptist's checkpoint expects)")


class SamplerConfig(_Section):
    num_samplers: int = Field(1, ge=1, description="sampler actors")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per sampler actor (fractional allowed)")
    prompts_per_batch: int = Field(16, ge=1, description="plain prompts per sampling batch")
    samples_per_prompt: int = Field(4, ge=1, description="K rewrites sampled per prompt")
    min_len: int = Field(15, ge=1, description="minimum response tokens (EOS masked before)")
    max_len: int = Field(75, ge=2, description="maximum response tokens")
    temp_start: float = Field(2.0, gt=0, description="sampling temperature at step 0")
    temp_end: float = Field(0.5, gt=0, description="sampling temperature after annealing")
    temp_anneal_steps: int = Field(5000, ge=0, description="learner steps to anneal the sampling temperature over")
    max_pending: int = Field(512, ge=1, description="backpressure: wait while the pending stream is longer")
    max_lag_steps: Optional[int] = Field(4, ge=1, description="bounded policy lag: sample a batch only while the queued unscored + unread fresh trajectories, with it, fit in this many learner steps' worth of fresh data (None: only max_pending)")
    response: Literal["full", "suffix"] = Field("full", description="full: the policy writes the whole rewrite; suffix: it continues '{x},' and the rewrite is x + ', ' + continuation (log-probs over the continuation only; common/formats.py)")
    datasets: list[str] = Field(default_factory=lambda: ["diffusiondb_ipgo", "pickapic", "coco_all"], description="training prompt sets (names or files); their train split, minus the paper's four evaluation sets")

    @model_validator(mode="after")
    def _lengths(self) -> "SamplerConfig":
        if self.min_len >= self.max_len:
            raise ValueError(f"min_len ({self.min_len}) must be below max_len ({self.max_len})")
        return self


class RewardConfig(_Section):
    num_workers: int = Field(1, ge=0, description="reward-worker actors at start (scale at run time with `pag workers scale`)")
    num_gpus: float = Field(1.0, ge=0, description="GPUs per reward worker")
    images_per_prompt: int = Field(3, ge=1, description="images rendered per prompt (fixed seeds per index)")
    steps: int = Field(20, ge=1, description="DPM-Solver++ steps")
    guidance: float = Field(7.5, ge=0, description="classifier-free guidance scale")
    seed: int = Field(0, description="base seed; image i uses seed+i for every prompt")
    batch_size: int = Field(8, ge=1, description="trajectories rendered together")
    scorers: list[str] = Field(default_factory=lambda: ["aesthetic", "clip"], description="scorer names from the registry")
    beta: float = Field(0.05, gt=0, description="reward temperature β: log R = r/β")
    clip_threshold: float = Field(0.28, description="relevance penalty applies below this CLIP score")
    clip_weight: float = Field(20.0, ge=0, description="relevance penalty weight")
    render: bool = Field(True, description="render images with SD; false: no images, only text scorers (style, relevance_text) — the tiny-proxy preset, to save CPU")
    text_threshold: float = Field(0.45, description="relevance_text hinge: penalty below this plain/rewrite sentence cosine (calibrated with bench/text_reward.py)")
    text_weight: float = Field(20.0, ge=0, description="relevance_text penalty weight")
    fp16: bool = Field(True, description="half precision on GPU (ignored on CPU)")
    # --- speed switches (issue 12; scoring/sd_speed.py). Defaults are today's behaviour until a GPU run shows a gain.
    attention: Literal["sdpa", "classic"] = Field("sdpa", description="UNet/VAE attention: sdpa (torch scaled_dot_product_attention: flash / memory-efficient kernels) or classic (matmul + softmax)")
    channels_last: bool = Field(False, description="UNet and VAE in channels_last memory format (NHWC convolutions)")
    compile_unet: bool = Field(False, description="torch.compile the UNet (first batch pays the compile time)")
    compile_vae: bool = Field(False, description="torch.compile the VAE decoder")
    cuda_graphs: bool = Field(False, description="compile with mode='reduce-overhead' (CUDA graphs); needs compile_unet or compile_vae, CUDA only")
    vae_fp16: bool = Field(True, description="with fp16: decode in half precision too (False: the VAE stays float32, the upcast safe path)")
    render_batch: Optional[int] = Field(None, ge=1, description="prompts per pipeline call (× images_per_prompt images); None: batch_size")
    overlap_scoring: bool = Field(False, description="score a rendered chunk in a side thread (own CUDA stream) while the next chunk denoises")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per reward worker, e.g. {reward_node: 1}: places workers on nodes started with `ray start --resources`")

    @model_validator(mode="after")
    def _speed(self) -> "RewardConfig":
        if self.cuda_graphs and not (self.compile_unet or self.compile_vae):
            raise ValueError("cuda_graphs needs compile_unet=true or compile_vae=true (CUDA graphs come from torch.compile mode='reduce-overhead')")
        return self

    @model_validator(mode="after")
    def _resources(self) -> "RewardConfig":
        for name, amount in self.resources.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"resources: {name!r} is a built-in Ray resource; use reward.num_gpus for GPUs "
                                 "(CPU is 1 per worker) and resources only for custom ones such as {reward_node: 1}")
            if not amount > 0:
                raise ValueError(f"resources: {name!r} = {amount}: the amount must be > 0")
        return self


class BufferConfig(_Section):
    redis_url: Optional[str] = Field(None, description="redis://[user:pw@]host:port/db; None: a private redis-server per run")
    allow_loopback: bool = Field(False, description="on a Ray cluster, accept a loopback redis_url or a private redis-server (every Ray node runs on this machine); False: an error naming redis_url")
    capacity: int = Field(5000, ge=1, description="trajectories kept")
    eviction: Literal["priority", "fifo"] = Field("priority", description="which trajectory leaves when full")
    prioritization: Literal["reward", "uniform"] = Field("reward", description="replay sampling: P ∝ exp(log R / T) or uniform")
    priority_temperature: float = Field(1.0, gt=0, description="T in P ∝ exp(log R / T)")
    priority_of: Literal["reward", "paper"] = Field("reward", description="reward: each trajectory by exp(log R / T) (exact, O(log N) in Lua); paper: the official per-prompt groups by exp(mean(log p_ref(y|x) + log R) / T), read from an O(N) index (buffer/groups.py)")
    dedup: bool = Field(True, description="keep one copy of an identical (prompt, response), the higher reward")


class LearnerConfig(_Section):
    steps: int = Field(10000, ge=1, description="optimiser steps")
    batch_size: int = Field(64, ge=2, description="trajectories per micro-batch")
    grad_accum: int = Field(4, ge=1, description="micro-batches per optimiser step (256 = 64×4)")
    replay_ratio: float = Field(0.5, ge=0, le=1, description="fraction of a batch drawn from prioritised replay")
    fresh_policy: Literal["wait", "fill"] = Field("wait", description="wait: block until a micro-batch's fresh half is scored (the official balance); fill: fill missing fresh slots from replay (throughput experiments)")
    fresh_timeout_s: float = Field(1800.0, gt=0, description="waiting longer than this for fresh trajectories ends the run with an error naming the reward workers")
    max_updates_per_fresh: Optional[float] = Field(None, gt=0, description="fill: at most this many optimiser steps per step's worth of fresh data, else wait (None: no cap; wait is always 1)")
    objective: Literal["fl-db", "db", "tb", "ppo"] = Field("fl-db", description="fl-db (PAG), db (no decomposition), tb (vanilla GFlowNet), ppo (reward-maximising baseline, Promptist; on-policy: needs replay_ratio=0)")
    lr: float = Field(1e-5, gt=0, description="policy learning rate")
    flow_lr: float = Field(1e-4, gt=0, description="flow head (and log Z) learning rate")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay, policy and flow head (official: AdamW's default 0.01; main.py's weight_decay argument is unused)")
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clip of the policy's parameters (the flow head is not clipped, as officially)")
    reward_temp_start: float = Field(2.0, gt=0, description="τ at step 0 (everything divided by τ)")
    reward_temp_end: float = Field(1.0, gt=0, description="τ after annealing")
    reward_temp_anneal_steps: int = Field(500, ge=0, description="steps to anneal τ over (official reward_sched_horizon)")
    ref_temp: float = Field(1.0, gt=0, description="γ: reference log-probs are divided by γ")
    min_len_penalty: float = Field(0.0, ge=0, description="log-reward penalty per token below sampler.min_len")
    reactivation_every: int = Field(2000, ge=0, description="re-initialise the flow head's last layer every M steps (0: off)")
    reactivation_init: Literal["normal", "default"] = Field("normal", description="normal: last flow layer's weight and bias re-drawn from N(0, 1), optimiser state kept (official); default: PyTorch's Linear init, its Adam moments dropped")
    reactivation_dormant: Optional[float] = Field(None, ge=0, le=1, description="also reactivate when the flow head's dormant ratio exceeds this")
    dormant_tau: float = Field(0.1, gt=0, description="τ of the τ-dormant neuron ratio (Sokar et al., 2023)")
    flow_hidden: int = Field(256, ge=1, description="flow head hidden width")
    publish_every: int = Field(1, ge=1, description="publish weights every K steps")
    checkpoint_every: int = Field(500, ge=1, description="checkpoint every E steps")
    checkpoint_every_s: Optional[float] = Field(1800.0, gt=0, description="also checkpoint when this many seconds passed since the last one (None: steps only); bounds what a killed learner loses")
    max_nonfinite: int = Field(5, ge=1, description="consecutive non-finite losses that stop training")
    num_gpus: float = Field(1.0, ge=0, description="GPUs for the learner actor")
    trainable_blocks: Optional[int] = Field(None, ge=1, description="train only the top N GPT-2 blocks (+ final LayerNorm; embeddings and the tied LM head frozen); None: all. Promptist's PPO trained the top 2")
    # --- objective=ppo (learner/ppo.py), Promptist's values (LMOps promptist/diff_prompter/configs/ppo_config_a100_coco_bsz256_kl0.2.yml)
    ppo_epochs: int = Field(4, ge=1, description="ppo: optimiser steps over each batch (ppo_epochs)")
    ppo_clip: float = Field(0.2, gt=0, description="ppo: ratio clip ε of the surrogate (cliprange)")
    ppo_value_clip: float = Field(0.2, gt=0, description="ppo: value clip around the batch's old values (cliprange_value)")
    ppo_value_coef: float = Field(2.3, ge=0, description="ppo: weight of the value loss (vf_coef)")
    ppo_gamma: float = Field(1.0, gt=0, le=1, description="ppo: GAE discount γ over the rewrite's tokens")
    ppo_lambda: float = Field(0.95, ge=0, le=1, description="ppo: GAE λ")
    ppo_kl_init: float = Field(0.2, ge=0, description="ppo: initial coefficient of the per-token KL penalty to the reference (0: no KL)")
    ppo_kl_target: Optional[float] = Field(0.2, gt=0, description="ppo: adaptive KL target in nats per rewrite (None: fixed coefficient)")
    ppo_kl_horizon: int = Field(10000, ge=1, description="ppo: adaptive KL controller horizon, in trajectories")

    @model_validator(mode="after")
    def _on_policy(self) -> "LearnerConfig":
        if self.objective == "ppo" and self.replay_ratio != 0:
            raise ValueError(f"objective=ppo is on-policy: replay_ratio must be 0, not {self.replay_ratio} "
                             "(`pag train --method ppo` sets it, with the other PPO settings)")
        return self


class IpgoConfig(_Section):
    """IPGO (arXiv 2503.21812): continuous tokens around the text encoder's states, optimised by the
    gradient of an image reward through the last K sampler steps. Defaults are the reference notebook's."""

    prefix_tokens: int = Field(10, ge=0, description="injected tokens before the encoder states")
    suffix_tokens: int = Field(10, ge=0, description="injected tokens after the encoder states")
    rank: int = Field(300, ge=1, description="columns of the orthonormal basis E (text dim × rank); coefficients z_i ∈ [−1, 1]^rank")
    rotation_angles: int = Field(2, ge=0, description="learned Givens angles per token; angle k rotates every coordinate pair (2j+k+i, 2j+1+k+i) of token i")
    bound: Literal["tanh", "clamp"] = Field("tanh", description="how z stays in [−1, 1]: tanh (gradient everywhere) or clamp (the notebook: zero gradient once a coefficient leaves the box)")
    layout: Literal["pad77", "nopad"] = Field("pad77", description="pad77: prompt padded to 77 − tokens, conditioning 77 long (diffusers); nopad: prompt unpadded, L + tokens (the notebook)")
    reward: list[str] = Field(default_factory=lambda: ["aesthetic"], description="differentiable scorers whose scores are summed into the training reward (aesthetic, clip, hps)")
    conformity_weight: float = Field(0.001, ge=0, description="loss = −reward + weight · (1/d)‖mean(C) − mean(H)‖₁")
    steps: int = Field(50, ge=1, description="LMS sampler steps")
    grad_steps: int = Field(2, ge=1, description="K: the last K steps (and the VAE decode) are differentiated, the first steps − K run under no_grad")
    guidance: float = Field(7.5, ge=0, description="classifier-free guidance scale")
    seed: int = Field(0, description="seed of the fixed initial noise (every iteration and prompt) and of the token initialisation")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    lr_step: int = Field(10, ge=1, description="StepLR step size (optimiser steps)")
    lr_gamma: float = Field(0.9, gt=0, le=1, description="StepLR decay factor")
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clip")
    iterations: int = Field(50, ge=1, description="prompt-wise: optimiser steps per prompt (the best iterate by training reward is kept)")
    epochs: int = Field(20, ge=1, description="prompt-batch: passes over the training prompts")
    grad_accum: int = Field(4, ge=1, description="prompt-batch: prompts per optimiser step")
    heldout_fraction: float = Field(0.2, ge=0, lt=1, description="prompt-batch: fraction of the prompt set (by a hash of the text) held out to apply the learned tokens to")
    fp16: bool = Field(True, description="fp16 weights, autocast and a GradScaler on GPU (ignored on CPU)")
    checkpointing: bool = Field(False, description="gradient checkpointing of the K differentiated UNet calls and the VAE decode (less memory, one more forward)")
    num_gpus: float = Field(1.0, ge=0, description="GPUs per prompt-wise Ray task and for the prompt-batch actor")

    @model_validator(mode="after")
    def _ipgo(self) -> "IpgoConfig":
        if self.grad_steps > self.steps:
            raise ValueError(f"grad_steps ({self.grad_steps}) must be at most steps ({self.steps})")
        if self.prefix_tokens + self.suffix_tokens > 77 - 3:
            raise ValueError(f"prefix_tokens + suffix_tokens ({self.prefix_tokens + self.suffix_tokens}) must leave at least "
                             "3 of CLIP's 77 positions for the prompt (start, one token, end)")
        return self


class RunConfig(_Section):
    name: Optional[str] = Field(None, description="run name; None: {preset}__{seed}__{time}")
    runs_dir: str = Field("runs", description="where run directories go")
    storage_path: Optional[str] = Field(None, description="URI the run directory is copied to so that it outlives a node: file:///shared/dir, s3://bucket/prefix (pip install 'pag[s3]'), gs://bucket/prefix ('pag[gcs]'); checkpoints as they are written, config, metrics and report; --resume restores from it. None: run_dir only")
    seed: int = Field(1, description="seed for sampling and training")
    device: str = Field("auto", description="auto, cpu or cuda[:i] for roles that do not get a Ray GPU")
    ray_address: Optional[str] = Field(None, description="Ray cluster address; None: RAY_ADDRESS or a local Ray")
    max_restarts: int = Field(3, ge=0, description="Ray restarts per actor")
    resource_wait_s: float = Field(0.0, ge=0, description="when the cluster cannot host the roles: ask the autoscaler and wait up to this many seconds (0: stop at once with an error)")
    log_every: int = Field(10, ge=1, description="metrics every N learner steps")
    method: Optional[str] = Field(None, description="the named method (common/methods.py) whose overrides this run started from, set by `pag train --method`; None: not a named method")

    @model_validator(mode="after")
    def _known_method(self) -> "RunConfig":
        from common.methods import METHODS

        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not a named method; choose one of {', '.join(METHODS)}")
        return self


#: the rule-based baseline's fixed modifier suffix (documented in README "Evaluation"): common quality
#: modifiers of engineered Lexica prompts, as the rule-based baselines of Promptist / PAG append
RULE_SUFFIX = ", highly detailed, digital painting, artstation, concept art, sharp focus, illustration, 8k"


class EvalConfig(_Section):
    """`pag eval`: the paper's evaluation protocol (official PAG eval.py), every setting a key."""

    datasets: list[str] = Field(default_factory=lambda: ["lexica", "diffusiondb", "coco", "chatgpt"], description="prompt sets to evaluate (packaged names or .jsonl/.txt files)")
    limit: Optional[int] = Field(None, ge=1, description="first N prompts of each set (None: all)")
    rewrites: int = Field(16, ge=1, description="rewrites per prompt (diverse beam search groups, or i.i.d. samples)")
    decode: Literal["beam", "sample"] = Field("beam", description="beam: diverse beam search (deterministic); sample: i.i.d. samples at eval.temperature")
    temperature: float = Field(1.0, gt=0, description="sampling temperature for decode=sample")
    beams_per_group: int = Field(1, ge=1, description="diverse beam search: beams per group (groups = eval.rewrites)")
    diversity_penalty: float = Field(1.0, ge=0, description="diverse beam search: Hamming diversity penalty")
    length_penalty: float = Field(-1.0, description="diverse beam search: length penalty (score / length**penalty)")
    min_new_tokens: int = Field(15, ge=1, description="rewrites have at least this many tokens (EOS masked before)")
    max_new_tokens: int = Field(75, ge=2, description="rewrites have at most this many tokens")
    images_per_prompt: int = Field(3, ge=1, description="images rendered per text (image i from the noise of seed+i)")
    steps: int = Field(20, ge=1, description="DPM-Solver++ steps")
    guidance: float = Field(7.5, ge=0, description="classifier-free guidance scale")
    seed: int = Field(42, description="image i of every text starts from the noise randn(seed + i)")
    scorers: list[str] = Field(default_factory=list, description="extra scorers from the registry (imagereward, hps), reported beside the reward")
    score_against: Literal["plain", "rewrite"] = Field("plain", description="text the extra scorers judge a rewrite's images against (rewrite: the official variant)")
    rule_suffix: str = Field(RULE_SUFFIX, description="the rule-based method's fixed modifier suffix")
    promptist_input: str = Field("{prompt} Rephrase:", description="Promptist's input template (no newline, as its model card)")
    workers: Optional[int] = Field(None, ge=1, description="render/score actors (one GPU each on GPU presets); None: the cluster's GPUs, else 1 in-process")
    batch_size: int = Field(8, ge=1, description="texts per render/score call of a worker")
    grid_prompts: int = Field(4, ge=1, description="prompts per set in the image grid (plain row + one row per method)")
    thumb_size: int = Field(128, ge=16, description="pixel size of each grid tile")
    cache: Optional[str] = Field(None, description="SQLite results cache; None: {run.runs_dir}/eval-cache.sqlite (shared by every eval there)")

    @model_validator(mode="after")
    def _lengths(self) -> "EvalConfig":
        if self.min_new_tokens >= self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must be below max_new_tokens ({self.max_new_tokens})")
        return self


class Config(_Section):
    preset: str = "sd14"
    model: ModelConfig = Field(default_factory=ModelConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    ipgo: IpgoConfig = Field(default_factory=IpgoConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def derived(self) -> dict[str, Any]:
        """Values computed from the config, in one place."""
        per_step = self.learner.batch_size * self.learner.grad_accum
        replay = int(round(self.learner.batch_size * self.learner.replay_ratio))
        return {
            "trajectories_per_step": per_step,
            "replay_per_micro_batch": replay,
            "fresh_per_micro_batch": self.learner.batch_size - replay,
        }

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        """Short hash of what changes the data (model and reward), stored in the run's meta."""
        # where the workers run (reward.resources) does not change the data
        part = {"model": self.model.model_dump(mode="json"),
                "reward": self.reward.model_dump(mode="json", exclude={"resources"})}
        return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:12]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# ---------------------------------------------------------------- presets

def _preset_sd14() -> dict[str, Any]:
    return {}  # the base is the paper


def _preset_tiny() -> dict[str, Any]:
    return {
        "model": {
            "kind": "tiny", "policy": "tiny", "sd": "tiny", "clip_arch": "tiny", "clip_pretrained": "random",
            "sentence_encoder": "auto", "image_size": 32,
        },
        "sampler": {
            "prompts_per_batch": 4, "samples_per_prompt": 4, "min_len": 4, "max_len": 16,
            "temp_anneal_steps": 60, "max_pending": 64, "temp_start": 1.5, "temp_end": 0.7,
        },
        # clip_threshold: the paper's 0.28 is calibrated to real ViT-L/14 scores (~0.2-0.35); the tiny random
        # CLIP scores centre on 0, where 0.28 would make the penalty a near-constant −5.6 for every rewrite.
        # With 0 the per-image hinge 20·min(0, max(0, clip) − 0) is always 0: tiny's reward is the aesthetic gain
        "reward": {"num_gpus": 0.0, "steps": 4, "batch_size": 8, "images_per_prompt": 3, "fp16": False,
                   "clip_threshold": 0.0},
        "buffer": {"capacity": 2000},
        "learner": {
            "steps": 120, "batch_size": 16, "grad_accum": 1, "lr": 3e-4, "flow_lr": 1e-3,
            "reward_temp_anneal_steps": 60, "reactivation_every": 50, "checkpoint_every": 10,
            "checkpoint_every_s": 20.0,
            "num_gpus": 0.0, "flow_hidden": 64,
        },
        # the tiny text encoder is 32 wide, so E is 32 × 16; 6 LMS steps keep an iteration well under a second
        "ipgo": {"rank": 16, "steps": 6, "iterations": 20, "epochs": 2, "num_gpus": 0.0, "fp16": False},
        "run": {"log_every": 5},
        "eval": {"steps": 4, "min_new_tokens": 4, "max_new_tokens": 16},
    }


def _preset_sd14_arch() -> dict[str, Any]:
    """The paper's settings and full-size architectures (SD v1.4 UNet/VAE/CLIP text encoder, open_clip
    ViT-L-14, GPT-2 124M) with seeded random weights: compute and memory are the paper's, images are
    noise. For measuring speed anywhere without downloads (bench/gpu.py), not for training results."""
    return {"model": {"kind": "arch", "sentence_encoder": "auto"}}


def _preset_tiny_proxy() -> dict[str, Any]:
    """tiny with a real, offline, text-only reward (issue 13; scoring/style.py): the policy continues
    "{x}," (sampler.response=suffix) and is rewarded by style(rewrite) − style(x) from a classifier of
    engineered prompts on all-MiniLM-L6-v2 embeddings, plus a MiniLM relevance hinge. Nothing is
    rendered (reward.render=false). It is not the paper's image reward."""
    return _merge(_preset_tiny(), {
        "sampler": {"response": "suffix"},
        "reward": {"scorers": ["style", "relevance_text"], "render": False},
    })


PRESETS = {"sd14": _preset_sd14, "tiny": _preset_tiny, "sd14-arch": _preset_sd14_arch,
           "tiny-proxy": _preset_tiny_proxy}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _allowed(section: type[BaseModel]) -> list[str]:
    return list(section.model_fields)


def _check_keys(tree: dict[str, Any], model: type[BaseModel], where: str, source: str) -> None:
    for key, value in tree.items():
        fields = model.model_fields
        if key not in fields:
            hint = difflib.get_close_matches(key, list(fields), n=1)
            name = f"{where}{key}"
            raise ConfigError(
                f"{source}: unknown config key '{name}'"
                + (f" (did you mean '{where}{hint[0]}'?)" if hint else "")
                + f"; allowed under '{where.rstrip('.') or 'top level'}': {', '.join(fields)}"
            )
        annotation = fields[key].annotation
        if isinstance(value, dict) and isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _check_keys(value, annotation, f"{where}{key}.", source)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`learner.lr=3e-5` → (['learner', 'lr'], 3e-05); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value (e.g. learner.lr=3e-5)")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def _format_validation(exc: ValidationError, tree: dict[str, Any], source: str) -> ConfigError:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        bad = err.get("input")
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{loc}'")
        elif isinstance(bad, dict):  # a cross-field check on a whole section: the message names the fields
            lines.append(f"section '{loc}': {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"field '{loc}' = {bad!r}: {err['msg']}")
    return ConfigError(f"{source}: invalid config: " + "; ".join(lines))


def load_config(
    preset: str = "tiny",
    yaml_path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    method: Optional[str] = None,
) -> Config:
    """Preset → method (common/methods.py) → YAML file → key=value overrides, validated; raises ConfigError."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    tree: dict[str, Any] = _merge({"preset": preset}, PRESETS[preset]())
    source = f"preset {preset!r}"
    if method is not None:
        from common.methods import method_overrides

        try:
            for text in method_overrides(method):
                tree = _merge(tree, _nest(*parse_override(text)))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        source = f"method {method!r}"
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        loaded.pop("preset", None)
        _check_keys(loaded, Config, "", f"config file {path}")
        tree = _merge(tree, loaded)
        source = f"config file {path}"
    for text in overrides:
        path_parts, value = parse_override(text)
        nested = _nest(path_parts, value)
        _check_keys(nested, Config, "", f"override {text!r}")
        tree = _merge(tree, nested)
        source = f"override {text!r}" if len(overrides) == 1 else "overrides " + " ".join(overrides)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise _format_validation(exc, tree, source) from None


def describe(model: type[BaseModel] = Config, where: str = "") -> list[str]:
    """One line per leaf field: `section.key (default): description` — used by `pag config --list`."""
    lines = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.extend(describe(annotation, f"{where}{name}."))
        else:
            default = info.default if info.default_factory is None else info.default_factory()
            lines.append(f"{where}{name} = {default!r}  # {info.description or ''}")
    return lines
