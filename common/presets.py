"""Presets: small functions that override the paper's defaults, as nested dicts; `merge` lays one tree over
another and is the only way config layers combine (preset → method → YAML file → `key=value` overrides,
common/config.py). Methods (common/methods.py) are trees of the same kind.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

Tree = dict[str, Any]

#: the miniature world's shipped weights and prompts (the `world` package sits beside `common`, installed or not;
#: a path, not an import, because common imports nothing above it)
WORLD_ASSETS = Path(__file__).resolve().parents[1] / "world" / "assets"


#: packaged training prompts (IPGO's sets) for the presets that must run offline without an import; sd14 trains on
#: the official Promptist set (`pag datasets import promptist FILE`)
PACKAGED_TRAIN_SETS = ("diffusiondb_ipgo", "pickapic", "coco_all")


def merge(*trees: Tree) -> Tree:
    """The trees laid over each other left to right: a later leaf wins, sections merge key by key."""
    out: Tree = {}
    for tree in trees:
        for key, value in tree.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
    return out


def sd14() -> Tree:
    """The paper: every default, rendered with the UNet and the VAE decoder compiled (torch.compile): on an H200,
    fp16, 4 prompts × 3 images, 1.44× the eager images/s, images within 0.003 of eager, 61 s of compile on the
    first call of each batch shape (docs/benchmarks.md, "First GPU run"). sd14-arch stays eager: bench/gpu.py
    measures every switch against it."""
    return {"reward": {"speed": {"compile_unet": True, "compile_vae": True}}}


def tiny() -> Tree:
    """CPU, offline, minutes: seeded random tiny models, a short run."""
    return {
        "model": {
            "kind": "tiny", "policy": "tiny", "sd": "tiny", "clip_arch": "tiny", "clip_pretrained": "random",
            "sentence_encoder": "auto", "image_size": 32,
        },
        "sampler": {
            "datasets": list(PACKAGED_TRAIN_SETS),
            "prompts_per_batch": 4, "samples_per_prompt": 4, "min_len": 4, "max_len": 16,
            "temp_anneal_steps": 60, "max_pending": 64, "temp_start": 1.5, "temp_end": 0.7,
        },
        "render": {"fp16": False},
        # clip_threshold: the paper's 0.28 is calibrated to real ViT-L/14 scores (~0.2-0.35); the tiny random
        # CLIP scores centre on 0, where 0.28 would make the penalty a near-constant −5.6 for every rewrite.
        # With 0 the per-image hinge 20·min(0, max(0, clip) − 0) is always 0: tiny's reward is the aesthetic gain
        # baseline plain: the miniature world's text encoder (mini inherits this) never saw "Rephrase:", so a
        # templated baseline would be an out-of-vocabulary picture; sd14 keeps the official policy_input
        "reward": {"num_gpus": 0.0, "images": {"steps": 4}, "batch_size": 8, "clip_threshold": 0.0,
                   "baseline": "plain"},
        # per-trajectory priority: tiny's batches of 4 prompts x 4 rewrites make groups too small for the official
        # group softmax (docs/paper.md, "priority")
        "buffer": {"capacity": 2000, "priority_of": "reward"},
        "learner": {
            "steps": 120, "batch_size": 16, "grad_accum": 1, "lr": 3e-4, "flow_lr": 1e-3,
            "reward_temp_anneal_steps": 60, "reactivation_every": 50, "checkpoint_every": 10,
            "checkpoint_every_s": 20.0,
            "num_gpus": 0.0, "flow_hidden": 64,
        },
        # the tiny text encoder is 32 wide, so E is 32 × 16; 6 LMS steps keep an iteration well under a second
        "ipgo": {"rank": 16, "steps": 6, "iterations": 20, "epochs": 2, "num_gpus": 0.0},
        "run": {"log_every": 5},
        # inception off: the FID weights cannot be downloaded here, and on 32-px pictures they would mean little
        "eval": {"images": {"steps": 4}, "min_new_tokens": 4, "max_new_tokens": 16, "inception": False},
    }


def sd14_arch() -> Tree:
    """The paper's settings and full-size architectures (SD v1.4 UNet/VAE/CLIP text encoder, open_clip
    ViT-L-14, GPT-2 124M) with seeded random weights: compute and memory are the paper's, images are
    noise. For measuring speed anywhere without downloads (bench/gpu.py), not for training results."""
    return {"model": {"kind": "arch", "sentence_encoder": "auto"}, "sampler": {"datasets": list(PACKAGED_TRAIN_SETS)},
            "eval": {"inception": False}}  # nothing downloads here, and the FID weights would have to


def tiny_proxy() -> Tree:
    """tiny with a real, offline, text-only reward (issue 13; scoring/style.py): the policy continues
    "{x}," (sampler.response=suffix) and is rewarded by style(rewrite) − style(x) from a classifier of
    engineered prompts on all-MiniLM-L6-v2 embeddings, plus a MiniLM relevance hinge. Nothing is
    rendered (reward.render=false). It is not the paper's image reward."""
    return merge(tiny(), {
        "sampler": {"response": "suffix"},
        "reward": {"scorers": ["style", "relevance_text"], "render": False},
    })


def mini() -> Tree:
    """The miniature world (world/README.md): the unchanged system on small models trained here with the real
    classes -- a StableDiffusionPipeline (UNet2DConditionModel, AutoencoderKL, CLIPTextModel) on 32-px scenes,
    a CLIP for relevance, the LAION MLP trained on the world's hidden taste -- and a tiny GPT-2 policy SFT'd on
    the world's "human-engineered" pairs. The policy writes modifiers after "{x}," (sampler.response=suffix).
    CPU, offline, minutes. Not the default yet: most of its quality gates (bench/world.py) are not met."""
    prompts = WORLD_ASSETS / "prompts"
    return merge(tiny(), {
        "model": {
            "sd": str(WORLD_ASSETS / "sd"), "clip_arch": str(WORLD_ASSETS / "clip"),
            "aesthetic_weights": str(WORLD_ASSETS / "aesthetic.safetensors"),
            "sft_pairs": str(prompts / "world_sft_pairs.jsonl"), "image_size": 32,
            # 400 steps (1.3 epochs) leave the reference near unigram popularity: 7 % of its rewrites within
            # one value of a mode (the corpus: 41 %); 2,000 (90 s on 2 cores): 25 %, 2.8 % complete (world/README.md)
            "sft_steps": 2000,
        },
        "sampler": {"response": "suffix", "datasets": [str(prompts / "world_train.txt")], "min_len": 3,
                    "max_len": 24, "temp_start": 1.0, "temp_end": 1.0},
        "render": {"guidance": 5.0},
        # clip_threshold: the world CLIP's cosines are not ViT-L/14's; MINI_CLIP_THRESHOLD is measured (see below).
        # beta 0.2, tau 1, T 1, no reactivation: what moved the policy towards the modes in 120 steps (README.md,
        # "The miniature world"); tau from 2 and T 1.5 made token soup, beta 0.05 a loss growing tenfold, beta 0.5
        # a third of the movement, and tiny's reactivation every 50 steps re-drew the flow head twice a run
        "reward": {"images": {"steps": 10}, "clip_threshold": MINI_CLIP_THRESHOLD, "beta": 0.2},
        "learner": {"reward_temp_start": 1.0, "reactivation_every": 0},
        "eval": {"datasets": [str(prompts / "world_heldout.txt")], "images": {"steps": 10},
                 "min_new_tokens": 3, "max_new_tokens": 24},
    })


#: the paper's c = 0.28 sits below typical real CLIP scores of matching pairs. The world CLIP's cosine between a
#: generated picture of a held-out caption and that caption's plain part (`python bench/world.py`,
#: figures.faithfulness.relevance_cosine) has p10 0.27 and median 0.44 with the shipped weights (the sight stage's
#: CLIP); the reward renderer's pictures of plain held-out prompts p10 0.38, mean 0.49. 0.3 penalises a picture that
#: shows its caption clearly worse than usual (the monochrome "ink noir" mode of a coloured caption: mean 0.36, p10
#: 0.20; "blurry, cluttered": 0.33, 0.19) and leaves the plain prompt's own pictures untouched (world/README.md)
MINI_CLIP_THRESHOLD = 0.3


def ipgo_notebook() -> Tree:
    """IPGO as the reference notebook runs it (Demos750/IPGO Colab_Notebook_for_IPGO.ipynb): SD v1.5, the prompt
    unpadded with the tokens around it, coefficients clamped; the learning-rate schedules are the defaults."""
    return {"model": {"sd": "sd-legacy/stable-diffusion-v1-5"}, "ipgo": {"layout": "nopad", "bound": "clamp"}}


PRESETS: dict[str, Callable[[], Tree]] = {"sd14": sd14, "tiny": tiny, "sd14-arch": sd14_arch,
                                           "tiny-proxy": tiny_proxy, "mini": mini, "ipgo-notebook": ipgo_notebook}


#: the preset of every command run without --preset, unless $PAG_PRESET names another (the test suite sets tiny)
DEFAULT_PRESET = "tiny"
PRESET_HELP = (f"tiny (random weights, CPU, minutes), mini (the miniature world: models trained here, CPU, minutes), "
               f"tiny-proxy (text-only reward), sd14 (the paper), sd14-arch (full-size, random weights), "
               f"ipgo-notebook (IPGO's notebook: SD v1.5); "
               f"default: $PAG_PRESET, else {DEFAULT_PRESET}")


def default_preset() -> str:
    """--preset when none is given: $PAG_PRESET if set, else DEFAULT_PRESET."""
    return os.environ.get("PAG_PRESET") or DEFAULT_PRESET
