"""The config sections of the training system, one class per concept, each field documented by its
docstring (`pag config --list` prints them): model, sampler, render (what every role that renders shares),
`ImagesConfig` (the images one role renders), reward (with `reward.images` and `reward.speed`), buffer,
learner (with `learner.ppo`) and run.
`pag eval`'s and `pag ipgo`'s sections are in common/sections_eval.py; the tree and its loading in
common/config.py.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated, field docstrings are docs."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(Section):
    kind: Literal["tiny", "pretrained", "arch"] = "pretrained"
    """tiny: a tiny GPT-2 policy (auto-SFT, cached) and, unless sd / clip_arch name directories (preset mini),
    tiny SD and CLIP with seeded random weights; pretrained: from_pretrained; arch: the real sd14 architectures
    at full size with seeded random weights (speed and memory measurements, no downloads)"""
    policy: str = "gpt2"
    """GPT-2 hub id or local directory of the policy's starting point"""
    sft_checkpoint: Optional[str] = None
    """SFT checkpoint (hub id or dir) for policy and reference; None: `policy` (tiny: auto-SFT, cached)"""
    sft_pairs: Optional[str] = None
    """.jsonl of {"plain", "engineered"} pairs for SFT; None: pairs mined from sampler.datasets (sft/pairs.py)"""
    sft_steps: Optional[int] = Field(None, ge=1)
    """optimiser steps of the automatic SFT (`pag sft --steps` wins); None: the kind's default (tiny 400)"""
    tokenizer: Optional[str] = None
    """tokenizer id/dir; None: the policy's, or the packaged GPT-2 files for tiny"""
    sd: str = "CompVis/stable-diffusion-v1-4"
    """Stable Diffusion hub id or local directory"""
    clip_arch: str = "ViT-L-14"
    """open_clip architecture for aesthetic and relevance, or a directory holding a transformers CLIPModel"""
    clip_pretrained: str = "openai"
    """open_clip pretrained tag, or a local checkpoint file"""
    aesthetic_weights: Optional[str] = None
    """LAION aesthetic MLP weights; None: the packaged sac+logos+ava1-l14-linearMSE"""
    sentence_encoder: str = "sentence-transformers/paraphrase-MiniLM-L6-v2"
    """sentence encoder for text diversity (hub id or dir)"""
    image_size: int = Field(512, ge=32)
    """SD render size in pixels, for every role; a model setting because the tiny models are built for it"""
    seed: int = 0
    """seed for tiny random weights"""
    input_format: Literal["pag", "promptist"] = "pag"
    """policy input template (common/formats.py TEMPLATES): pag '{x} Rephrase:\\n'; promptist '{x} Rephrase:'"""


class SamplerConfig(Section):
    num_samplers: int = Field(1, ge=1)
    """sampler actors"""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per sampler actor (fractional allowed)"""
    prompts_per_batch: int = Field(1, ge=1)
    """plain prompts per sampling batch (official: 1, gfn_trainer.py:433-436)"""
    samples_per_prompt: int = Field(64, ge=1)
    """K rewrites sampled per prompt (official: the batch size, 64)"""
    min_len: int = Field(15, ge=1)
    """minimum response tokens (EOS masked before)"""
    max_len: int = Field(75, ge=2)
    """maximum response tokens"""
    temp_start: float = Field(2.0, gt=0)
    """sampling temperature at step 0"""
    temp_end: float = Field(0.5, gt=0)
    """sampling temperature after annealing"""
    temp_anneal_steps: int = Field(5000, ge=0)
    """learner steps to anneal the sampling temperature over"""
    max_pending: int = Field(512, ge=1)
    """backpressure: wait while the pending stream is longer"""
    max_lag_steps: Optional[int] = Field(4, ge=1)
    """bounded policy lag: sample a batch only while the queued unscored + unread fresh trajectories, with it,
    fit in this many learner steps' worth of fresh data (None: only max_pending)"""
    response: Literal["full", "suffix"] = "full"
    """full: the policy writes the whole rewrite; suffix: it continues '{x},' and the rewrite is x + ', ' +
    continuation (log-probs over the continuation only; common/formats.py)"""
    datasets: list[str] = Field(default_factory=lambda: ["promptist"])
    """training prompt sets (names or files); their train split, minus the paper's evaluation sets. promptist (the
    official set) must be imported once: `pag datasets import promptist FILE`"""

    @model_validator(mode="after")
    def _lengths(self) -> "SamplerConfig":
        if self.min_len >= self.max_len:
            raise ValueError(f"min_len ({self.min_len}) must be below max_len ({self.max_len})")
        return self


class RenderConfig(Section):
    """How Stable Diffusion renders, the same for every role that renders: the reward workers, `pag eval`
    and IPGO. What a role chooses for itself sits in its own section: how many images, from which seeds,
    with how many solver steps (`reward.images`, `eval.images`), IPGO's differentiable LMS sampler
    (`ipgo.steps`, `ipgo.seed`); the size is `model.image_size`."""

    guidance: float = Field(7.5, ge=0)
    """classifier-free guidance scale"""
    fp16: bool = True
    """half precision on GPU (ignored on CPU); IPGO adds autocast and a GradScaler"""


class ImagesConfig(Section):
    """The images a role renders per text: image i of every text starts from the noise randn(seed + i), so
    a rewrite and its plain prompt meet identical noise. One type for the reward and the eval protocol."""

    per_prompt: int = Field(3, ge=1)
    """images rendered per text"""
    steps: int = Field(20, ge=1)
    """DPM-Solver++ steps"""
    seed: int = 0
    """base seed: image i of every text starts from randn(seed + i)"""


class SpeedConfig(Section):
    """Speed switches of the SD pipeline (issue 12; scoring/sd_speed.py), applied by the reward workers
    and `pag eval`'s workers. Defaults: eager; the sd14 preset compiles the UNet and VAE decoder, the one switch
    the first GPU run showed a gain for (docs/benchmarks.md, "First GPU run")."""

    attention: Literal["sdpa", "classic"] = "sdpa"
    """sdpa (torch scaled_dot_product_attention: flash / memory-efficient kernels) or classic (matmul + softmax)"""
    channels_last: bool = False
    """UNet and VAE in channels_last memory format (NHWC convolutions)"""
    compile_unet: bool = False
    """torch.compile the UNet (first batch pays the compile time)"""
    compile_vae: bool = False
    """torch.compile the VAE decoder"""
    cuda_graphs: bool = False
    """compile with mode='reduce-overhead' (CUDA graphs); needs compile_unet or compile_vae, CUDA only"""
    vae_fp16: bool = True
    """with render.fp16: decode in half precision too (False: the VAE stays float32, the upcast safe path)"""
    render_batch: Optional[int] = Field(None, ge=1)
    """reward workers: prompts per pipeline call (× images.per_prompt images); None: reward.batch_size"""
    overlap_scoring: bool = False
    """reward workers: score a rendered chunk in a side thread (own CUDA stream) while the next one denoises"""

    @model_validator(mode="after")
    def _cuda_graphs(self) -> "SpeedConfig":
        if self.cuda_graphs and not (self.compile_unet or self.compile_vae):
            raise ValueError("cuda_graphs needs compile_unet=true or compile_vae=true "
                             "(CUDA graphs come from torch.compile mode='reduce-overhead')")
        return self


class RewardConfig(Section):
    num_workers: int = Field(1, ge=0)
    """reward-worker actors at start (scale at run time with `pag workers scale`)"""
    num_gpus: float = Field(1.0, ge=0)
    """GPUs per reward worker"""
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    """the training reward's images (per-index seeds make a score independent of its batch-mates)"""
    batch_size: int = Field(8, ge=1)
    """trajectories rendered together"""
    scorers: list[str] = Field(default_factory=lambda: ["aesthetic", "clip"])
    """scorer names from the registry"""
    beta: float = Field(0.05, gt=0)
    """reward temperature β: log R = r/β"""
    baseline: Literal["policy_input", "plain"] = "policy_input"
    """the text of the baseline images a rewrite's aesthetic gain is measured against, and that relevance is
    judged against, in training and in `pag eval`: policy_input renders the policy's template ("x Rephrase:\n",
    as the official gfn_trainer.py:635-686 and eval.py:154-215 do); plain renders the user's x alone"""
    clip_threshold: float = 0.28
    """relevance penalty applies below this CLIP score"""
    clip_weight: float = Field(20.0, ge=0)
    """relevance penalty weight"""
    render: bool = True
    """render images with SD; false: no images, only text scorers (style, relevance_text): tiny-proxy"""
    text_threshold: float = 0.45
    """relevance_text hinge: penalty below this plain/rewrite sentence cosine (bench/text_reward.py)"""
    text_weight: float = Field(20.0, ge=0)
    """relevance_text penalty weight"""
    speed: SpeedConfig = Field(default_factory=SpeedConfig)
    """speed switches of the SD pipeline"""
    resources: dict[str, float] = Field(default_factory=dict)
    """custom Ray resources per reward worker, e.g. {reward_node: 1}: places workers on nodes started with
    `ray start --resources`"""

    @model_validator(mode="after")
    def _resources(self) -> "RewardConfig":
        for name, amount in self.resources.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"resources: {name!r} is a built-in Ray resource; use reward.num_gpus for GPUs "
                                 "(CPU is 1 per worker) and resources only for custom ones such as {reward_node: 1}")
            if not amount > 0:
                raise ValueError(f"resources: {name!r} = {amount}: the amount must be > 0")
        return self


class BufferConfig(Section):
    redis_url: Optional[str] = None
    """redis://[user:pw@]host:port/db; None: a private redis-server per run"""
    capacity: int = Field(5000, ge=1)
    """trajectories kept"""
    eviction: Literal["priority", "fifo"] = "priority"
    """which trajectory leaves when full"""
    prioritization: Literal["reward", "uniform"] = "reward"
    """replay sampling: P ∝ exp(log R / T) or uniform"""
    priority_temperature: float = Field(1.0, gt=0)
    """T in P ∝ exp(log R / T)"""
    priority_of: Literal["reward", "paper"] = "paper"
    """paper: the official per-prompt groups by exp(mean(log p_ref(y|x) + log R) / T), read from an O(N) index
    (buffer/groups.py); reward: each trajectory by exp(log R / T) (exact, O(log N) in Lua)"""
    dedup: bool = True
    """keep one copy of an identical (prompt, response), the higher reward"""
    allow_loopback: bool = False
    """on a Ray cluster, accept a loopback redis_url or a private redis-server (every Ray node runs on this
    machine); False: an error naming redis_url"""
    max_outage_s: float = Field(300.0, gt=0)
    """how long `pag train` waits for a Redis it cannot reach before it stops with a checkpoint (exit 3;
    `--resume` continues once Redis is back)"""


class PPOConfig(Section):
    """objective=ppo (learner/ppo.py): Promptist's values (LMOps promptist/diff_prompter/configs/
    ppo_config_a100_coco_bsz256_kl0.2.yml); Promptist's names in brackets."""

    epochs: int = Field(4, ge=1)
    """optimiser steps over each batch (ppo_epochs)"""
    clip: float = Field(0.2, gt=0)
    """ratio clip ε of the surrogate (cliprange)"""
    value_clip: float = Field(0.2, gt=0)
    """value clip around the batch's old values (cliprange_value)"""
    value_coef: float = Field(2.3, ge=0)
    """weight of the value loss (vf_coef)"""
    gamma: float = Field(1.0, gt=0, le=1)
    """GAE discount γ over the rewrite's tokens (gamma)"""
    gae_lambda: float = Field(0.95, ge=0, le=1)
    """GAE λ (lam)"""
    kl_coef: float = Field(0.2, ge=0)
    """initial coefficient of the per-token KL penalty to the reference; 0: no KL (init_kl_coef)"""
    kl_target: Optional[float] = Field(0.2, gt=0)
    """adaptive KL target in nats per rewrite; None: kl_coef stays fixed (target)"""
    kl_horizon: int = Field(10000, ge=1)
    """adaptive KL controller horizon, in trajectories (horizon)"""


class LearnerConfig(Section):
    steps: int = Field(10000, ge=1)
    """optimiser steps"""
    batch_size: int = Field(64, ge=2)
    """trajectories per micro-batch"""
    grad_accum: int = Field(4, ge=1)
    """micro-batches per optimiser step (256 = 64×4)"""
    replay_ratio: float = Field(0.5, ge=0, le=1)
    """fraction of a batch drawn from prioritised replay"""
    fresh_policy: Literal["wait", "fill"] = "wait"
    """wait: block until a micro-batch's fresh half is scored (the official balance); fill: fill missing fresh
    slots from replay (throughput experiments)"""
    fresh_timeout_s: float = Field(1800.0, gt=0)
    """waiting longer than this for fresh trajectories ends the run with an error naming the reward workers"""
    max_updates_per_fresh: Optional[float] = Field(None, gt=0)
    """fill: at most this many optimiser steps per step's worth of fresh data, else wait (None: no cap)"""
    objective: Literal["fl-db", "db", "tb", "ppo"] = "fl-db"
    """fl-db (PAG), db (no decomposition), tb (vanilla GFlowNet), ppo (reward-maximising baseline, Promptist;
    on-policy: needs replay_ratio=0)"""
    lr: float = Field(1e-5, gt=0)
    """policy learning rate"""
    flow_lr: float = Field(1e-4, gt=0)
    """flow head (and log Z) learning rate"""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay, policy and flow head (official: AdamW's default; main.py's argument is unused)"""
    grad_clip: float = Field(1.0, gt=0)
    """gradient-norm clip of the policy's parameters (the flow head is not clipped, as officially)"""
    reward_temp_start: float = Field(2.0, gt=0)
    """τ at step 0 (everything divided by τ)"""
    reward_temp_end: float = Field(1.0, gt=0)
    """τ after annealing"""
    reward_temp_anneal_steps: int = Field(500, ge=0)
    """steps to anneal τ over (official reward_sched_horizon)"""
    ref_temp: float = Field(1.0, gt=0)
    """γ: reference log-probs are divided by γ"""
    min_len_penalty: float = Field(0.0, ge=0)
    """log-reward penalty per token below sampler.min_len"""
    reactivation_every: int = Field(2000, ge=0)
    """re-initialise the flow head's last layer every M steps (0: off)"""
    reactivation_init: Literal["normal", "default"] = "normal"
    """normal: last flow layer's weight and bias re-drawn from N(0, 1), optimiser state kept (official);
    default: PyTorch's Linear init, its Adam moments dropped"""
    reactivation_dormant: Optional[float] = Field(None, ge=0, le=1)
    """also reactivate when the flow head's dormant ratio exceeds this"""
    dormant_tau: float = Field(0.1, gt=0)
    """τ of the τ-dormant neuron ratio (Sokar et al., 2023)"""
    flow_hidden: int = Field(256, ge=1)
    """flow head hidden width"""
    flow_head: Literal["official", "film"] = "official"
    """official: ReLU(W h_t) modulated by scale, shift from the prompt's hidden states summed but the last token,
    random init (gfn_trainer.py:25-41, 300); film: LayerNorm, the prompt averaged, FiLM (1 + scale) before the ReLU,
    started at identity (learner/flow.py)"""
    publish_every: int = Field(1, ge=1)
    """publish weights every K steps"""
    checkpoint_every: int = Field(500, ge=1)
    """checkpoint every E steps"""
    checkpoint_every_s: Optional[float] = Field(1800.0, gt=0)
    """also checkpoint when this many seconds passed since the last one (None: steps only); bounds what a
    killed learner loses"""
    max_nonfinite: int = Field(5, ge=1)
    """consecutive non-finite losses that stop training"""
    num_gpus: float = Field(1.0, ge=0)
    """GPUs for the learner actor"""
    trainable_blocks: Optional[int] = Field(None, ge=1)
    """train only the top N GPT-2 blocks (+ final LayerNorm; embeddings and the tied LM head frozen); None: all.
    Promptist's PPO trained the top 2"""
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    """objective=ppo only"""

    @model_validator(mode="after")
    def _on_policy(self) -> "LearnerConfig":
        if self.objective == "ppo" and self.replay_ratio != 0:
            raise ValueError(f"objective=ppo is on-policy: replay_ratio must be 0, not {self.replay_ratio} "
                             "(`pag train --method ppo` sets it, with the other PPO settings)")
        return self


class RunConfig(Section):
    name: Optional[str] = None
    """run name; None: {preset}__{seed}__{time}"""
    runs_dir: str = "runs"
    """where run directories go"""
    seed: int = 1
    """seed for sampling and training"""
    device: str = "auto"
    """auto, cpu or cuda[:i] for roles that do not get a Ray GPU"""
    ray_address: Optional[str] = None
    """Ray cluster address; None: RAY_ADDRESS or a local Ray"""
    max_restarts: int = Field(3, ge=0)
    """Ray restarts per actor"""
    resource_wait_s: float = Field(0.0, ge=0)
    """when the cluster cannot host the roles: ask the autoscaler and wait up to this many seconds (0: stop at
    once with an error)"""
    log_every: int = Field(10, ge=1)
    """metrics every N learner steps"""
    method: Optional[str] = None
    """the named method (common/methods.py) this run started from, set by `pag train --method`; None: none"""
    storage_path: Optional[str] = None
    """URI the run directory is copied to so that it outlives a node: file:///shared/dir, s3://bucket/prefix
    (pip install 'pag[s3]'), gs://bucket/prefix ('pag[gcs]'); checkpoints as they are written, config, metrics
    and report; --resume restores from it. None: run_dir only"""

    @model_validator(mode="after")
    def _known_method(self) -> "RunConfig":
        from common.methods import METHODS

        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not a named method; choose one of {', '.join(METHODS)}")
        return self
