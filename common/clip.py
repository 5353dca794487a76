"""CLIP (open_clip) and the LAION aesthetic MLP on its image embeddings: what the image scorers see.

Built from `ModelConfig` like every model (common/models.py): `tiny` is a seeded random open_clip CLIP
with ViT-L/14's 768-d embedding, so the real aesthetic MLP applies to it; `arch` is open_clip's own
ViT-L-14 config with random weights; `pretrained` loads `clip_arch`/`clip_pretrained` through open_clip.
A `clip_arch` that is a directory holding a `transformers.CLIPModel` loads that instead, in any kind (the
miniature world's CLIP, preset `mini`). The aesthetic MLP is the real one in every preset but `mini`
(its weights ship in common/assets/aesthetic/; `model.aesthetic_weights` points elsewhere).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.config import ModelConfig
from common.models import ASSETS, CLIP_CONTEXT, ModelLoadError, load_error, seeded

AESTHETIC_WEIGHTS = ASSETS / "aesthetic" / "sac+logos+ava1-l14-linearMSE.safetensors"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


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

    if (Path(cfg.clip_arch) / "config.json").is_file():
        bundle = hf_clip(Path(cfg.clip_arch))
    elif cfg.kind == "tiny" and cfg.clip_arch == "tiny":
        size = min(cfg.image_size, 64)
        with seeded(cfg.seed + 2):
            model = open_clip.CLIP(
                embed_dim=768,  # ViT-L/14's width, so the real aesthetic MLP applies
                vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=size),
                text_cfg=CLIPTextCfg(context_length=CLIP_CONTEXT, vocab_size=49408, width=64, heads=2, layers=2),
            )
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=CLIP_CONTEXT)
        bundle = ClipBundle(model=model, tokenizer=tokenizer, image_size=size)
    elif cfg.kind == "arch":
        # open_clip's own ViT-L-14 config, random weights; QuickGELU like the `openai` weights the paper scores with
        with seeded(cfg.seed + 2):
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
            raise load_error(
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


class HFCLIP(nn.Module):
    """A `transformers.CLIPModel` behind open_clip's two methods (`encode_image`, `encode_text`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @staticmethod
    def _features(out) -> torch.Tensor:  # transformers 5 returns an output object, 4.x a tensor
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._features(self.model.get_image_features(pixel_values=pixels))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self._features(self.model.get_text_features(input_ids=ids))


def hf_clip(folder: Path) -> ClipBundle:
    """A CLIPModel directory saved with save_pretrained (with its tokenizer), e.g. the miniature world's
    world/assets/clip or a local copy of openai/clip-vit-large-patch14; `model.clip_arch` names it."""
    from transformers import AutoTokenizer, CLIPModel

    try:
        model = CLIPModel.from_pretrained(str(folder), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise load_error("CLIP model", str(folder), exc, "save it with CLIPModel.save_pretrained and its tokenizer") from exc
    context = min(CLIP_CONTEXT, model.config.text_config.max_position_embeddings)

    def tokenize(texts: Sequence[str]) -> torch.Tensor:
        return tokenizer(list(texts), padding="max_length", max_length=context, truncation=True,
                         return_tensors="pt").input_ids
    size = model.config.vision_config.image_size
    return ClipBundle(model=HFCLIP(model), tokenizer=tokenize, image_size=int(size))


class AestheticMLP(nn.Module):
    """LAION improved aesthetic predictor: 768→1024→128→64→16→1 with dropouts, applied to L2-normalised
    CLIP ViT-L/14 image embeddings. Keys match the released state dict. The released predictor has no
    activations (its code has `nn.ReLU()` commented out after each of the first four layers), so it is
    a linear map of the embedding; `relu=True` switches those ReLUs on, with the same keys. A
    .safetensors file says which in its metadata (`"activation": "relu"`; absent: none)."""

    def __init__(self, dim: int = 768, relu: bool = False) -> None:
        super().__init__()
        self.relu = relu
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:  # (N, 768) → (N,)
        x = embeddings
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.relu and isinstance(layer, nn.Linear) and i < len(self.layers) - 1:
                x = torch.relu(x)
        return x.squeeze(-1)

    @property
    def metadata(self) -> dict[str, str]:
        """What a .safetensors file of these weights declares (see the class docstring)."""
        return {"activation": "relu"} if self.relu else {}


def build_aesthetic(cfg: ModelConfig, device: torch.device | str = "cpu") -> AestheticMLP:
    """The LAION MLP with the packaged weights or `model.aesthetic_weights` (float16 files load as float32)."""
    path = Path(cfg.aesthetic_weights) if cfg.aesthetic_weights else AESTHETIC_WEIGHTS
    return load_aesthetic(path).to(device)


def load_aesthetic(path: Path) -> AestheticMLP:
    """The aesthetic MLP in a .safetensors (its metadata naming the activation) or .pth file, frozen, eval."""
    if not path.is_file():
        raise ModelLoadError(f"aesthetic MLP weights not found at {path}; set model.aesthetic_weights to the .safetensors or .pth file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            activation = (f.metadata() or {}).get("activation", "none")
    else:
        state, activation = torch.load(path, weights_only=True, map_location="cpu"), "none"
    if activation not in ("none", "relu"):
        raise ModelLoadError(f"{path}: metadata activation={activation!r}; this predictor knows 'none' and 'relu'")
    mlp = AestheticMLP(relu=activation == "relu")
    try:
        mlp.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as exc:
        raise ModelLoadError(f"{path}: not the LAION aesthetic MLP state dict (768→1024→128→64→16→1): {exc}") from exc
    return mlp.eval().requires_grad_(False)
