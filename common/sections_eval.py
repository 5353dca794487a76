"""The config sections of the two tools beside training: `pag eval` (the paper's evaluation protocol) and
`pag ipgo` (embedding optimisation). Both render with the shared `render` section (common/sections.py).
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from common.data import PAPER_EVAL_SETS
from common.sections import ImagesConfig, Section


class IpgoConfig(Section):
    """IPGO (arXiv 2503.21812): continuous tokens around the text encoder's states, optimised by the
    gradient of an image reward through the last K sampler steps. Defaults are the reference notebook's
    (Demos750/IPGO, Colab_Notebook_for_IPGO.ipynb) except `bound` (tanh; the notebook clamps) and `layout`
    (pad77; the notebook does not pad) -- ours, see their docs -- and the model (SD v1.4; the notebook's is
    SD v1.5): preset `ipgo-notebook` sets all three as the notebook has them."""

    prefix_tokens: int = Field(10, ge=0)
    """injected tokens before the encoder states"""
    suffix_tokens: int = Field(10, ge=0)
    """injected tokens after the encoder states"""
    rank: int = Field(300, ge=1)
    """columns of the orthonormal basis E (text dim × rank); coefficients z_i ∈ [−1, 1]^rank"""
    rotation_angles: int = Field(2, ge=0)
    """learned Givens angles per token; angle k rotates every coordinate pair (2j+k+i, 2j+1+k+i) of token i"""
    bound: Literal["tanh", "clamp"] = "tanh"
    """how z stays in [−1, 1]: tanh (gradient everywhere) or clamp (the notebook: zero gradient once a coefficient
    leaves the box)"""
    layout: Literal["pad77", "nopad"] = "pad77"
    """pad77: prompt padded to 77 − tokens, conditioning 77 long (diffusers); nopad: prompt unpadded, L + tokens (the
    notebook)"""
    reward: list[str] = Field(default_factory=lambda: ["aesthetic"])
    """differentiable scorers whose scores are summed into the training reward (aesthetic, clip, hps)"""
    conformity_weight: float = Field(0.001, ge=0)
    """loss = −reward + weight · (1/d)‖mean(C) − mean(H)‖₁"""
    steps: int = Field(50, ge=1)
    """LMS sampler steps (IPGO's own differentiable sampler; guidance and precision are `render`'s)"""
    grad_steps: int = Field(2, ge=1)
    """K: the last K steps (and the VAE decode) are differentiated, the first steps − K run under no_grad"""
    seed: int = 0
    """seed of the fixed initial noise (every iteration and prompt) and of the token initialisation"""
    lr: float = Field(1e-3, gt=0)
    """Adam learning rate"""
    lr_step: int = Field(10, ge=1)
    """prompt-wise StepLR step size (optimiser steps; the notebook's prompt-wise cell: 10)"""
    lr_gamma: float = Field(0.9, gt=0, le=1)
    """prompt-wise StepLR decay factor (the notebook: 0.9)"""
    batch_lr_step: int = Field(15, ge=1)
    """prompt-batch StepLR step size (the notebook's prompt-batch cell: 15; with 0.9 every 10 steps the rate
    would be near 0 after a few epochs of 300 prompts)"""
    batch_lr_gamma: float = Field(0.95, gt=0, le=1)
    """prompt-batch StepLR decay factor (the notebook: 0.95)"""
    grad_clip: float = Field(1.0, gt=0)
    """gradient-norm clip"""
    iterations: int = Field(50, ge=1)
    """prompt-wise: optimiser steps per prompt (the best iterate by training reward is kept)"""
    epochs: int = Field(20, ge=1)
    """prompt-batch: passes over the training prompts"""
    grad_accum: int = Field(4, ge=1)
    """prompt-batch: prompts per optimiser step"""
    heldout_fraction: float = Field(0.2, ge=0, lt=1)
    """prompt-batch: fraction of the prompt set (by a hash of the text) held out to apply the learned tokens to"""
    heldout_seeds: int = Field(3, ge=0)
    """prompt-batch: held-out prompts are also scored on this many seeds other than `seed` (eval.images.seed
    upward, as `pag eval` does), so their reward is measured on neither the training prompts nor the training
    noise"""
    checkpointing: bool = False
    """gradient checkpointing of the K differentiated UNet calls and the VAE decode (less memory, one more forward)"""
    num_gpus: float = Field(1.0, ge=0)
    """GPUs per prompt-wise Ray task and for the prompt-batch actor"""

    @model_validator(mode="after")
    def _ipgo(self) -> "IpgoConfig":
        if self.grad_steps > self.steps:
            raise ValueError(f"grad_steps ({self.grad_steps}) must be at most steps ({self.steps})")
        if self.prefix_tokens + self.suffix_tokens > 77 - 3:
            raise ValueError(f"prefix_tokens + suffix_tokens ({self.prefix_tokens + self.suffix_tokens}) must leave "
                             "at least 3 of CLIP's 77 positions for the prompt (start, one token, end)")
        return self


#: the rule-based baseline's fixed modifier suffix (documented in README "Evaluation"): common quality
#: modifiers of engineered Lexica prompts, as the rule-based baselines of Promptist / PAG append
RULE_SUFFIX = ", highly detailed, digital painting, artstation, concept art, sharp focus, illustration, 8k"


class EvalImagesConfig(ImagesConfig):
    seed: int = 42
    """the eval's seed: image i of every text starts from randn(seed + i), and decode=sample draws from it; 42
    keeps evaluation apart from training's seeds"""


class EvalConfig(Section):
    """`pag eval`: the paper's evaluation protocol (official PAG eval.py), every setting a key."""

    datasets: list[str] = Field(default_factory=lambda: list(PAPER_EVAL_SETS))
    """prompt sets to evaluate (packaged names or .jsonl/.txt files); default: the paper's four"""
    limit: Optional[int] = Field(None, ge=1)
    """first N prompts of each set (None: all)"""
    rewrites: int = Field(16, ge=1)
    """rewrites per prompt (diverse beam search groups, or i.i.d. samples)"""
    decode: Literal["beam", "sample"] = "beam"
    """beam: diverse beam search (deterministic); sample: i.i.d. samples at eval.temperature"""
    temperature: float = Field(1.0, gt=0)
    """sampling temperature for decode=sample"""
    beams_per_group: int = Field(1, ge=1)
    """diverse beam search: beams per group (groups = eval.rewrites)"""
    diversity_penalty: float = Field(1.0, ge=0)
    """diverse beam search: Hamming diversity penalty"""
    length_penalty: float = -1.0
    """diverse beam search: length penalty (score / length**penalty)"""
    min_new_tokens: int = Field(15, ge=1)
    """rewrites have at least this many tokens (EOS masked before)"""
    max_new_tokens: int = Field(75, ge=2)
    """rewrites have at most this many tokens"""
    images: EvalImagesConfig = Field(default_factory=EvalImagesConfig)
    """the protocol's images (the paper's 3 per text, 20 steps), from seeds training never rendered with"""
    inception: bool = True
    """also report the official image diversity, `image_similarity_inception`: the mean pairwise cosine similarity
    of pytorch-fid InceptionV3 pool-3 features with eval.py's input scaling (eval/inception.py; `pip install
    'pag[fid]'`, weights cached once); tiny and mini: off"""
    scorers: list[str] = Field(default_factory=list)
    """extra scorers from the registry (imagereward, hps), reported beside the reward"""
    score_against: Literal["plain", "rewrite"] = "rewrite"
    """text the extra scorers judge a rewrite's images against: rewrite, its own text (official, eval.py:193-212:
    the baseline's images are judged against the baseline text, and the report adds `<scorer>_gain`); plain: the
    plain prompt's baseline text"""
    reward_metric: Literal["aesthetic", "imagereward"] = "aesthetic"
    """the image term of the reward column: aesthetic (the LAION MLP's gain, the paper's tables) or imagereward
    (ImageReward's gain over the baseline images, as the official eval.py --reward_metric imagereward; needs
    imagereward or imagereward-package in eval.scorers)"""
    rule_suffix: str = RULE_SUFFIX
    """the rule-based method's fixed modifier suffix"""
    workers: Optional[int] = Field(None, ge=1)
    """render/score actors (one GPU each on GPU presets); None: the cluster's GPUs, else 1 in-process"""
    batch_size: int = Field(8, ge=1)
    """texts per render/score call of a worker"""
    grid_prompts: int = Field(4, ge=1)
    """prompts per set in the image grid (plain row + one row per method)"""
    thumb_size: int = Field(128, ge=16)
    """pixel size of each grid tile"""
    cache: Optional[str] = None
    """SQLite results cache; None: {run.runs_dir}/eval-cache.sqlite (shared by every eval there)"""
    text_encoder_fallback: bool = False
    """when model.sentence_encoder cannot load, measure text diversity with the packaged all-MiniLM-L6-v2
    (the report names it) instead of failing; off: the paper's paraphrase-MiniLM-L6-v2 or nothing"""

    @model_validator(mode="after")
    def _lengths(self) -> "EvalConfig":
        if self.min_new_tokens >= self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must be below "
                             f"max_new_tokens ({self.max_new_tokens})")
        if self.reward_metric == "imagereward" and not {"imagereward", "imagereward-package"} & set(self.scorers):
            raise ValueError("reward_metric=imagereward needs an ImageReward scorer: add imagereward (the official "
                             "eval's preprocessing) or imagereward-package to eval.scorers (--scorers imagereward)")
        return self
