"""Image scorers: a registry of factories (ddpo-pytorch style).

A factory does the expensive set-up once and returns a plain function

    fn(images, prompts) -> {score_name: tensor (N,)}

where `images` is (N, 3, H, W) in [0, 1] and `prompts[i]` is the text image i is judged against
(the reward worker passes the *plain* prompt x, also for a rewrite's images). Scores are float32
on the CPU. Registered names (the `reward.scorers` config entries) and what they return:

- `aesthetic` → `aes`: LAION MLP on the L2-normalised open_clip image embedding
- `clip`      → `clip`: raw cosine between the image and text embeddings (no ×100, no clamp)
- `imagereward` → `imagereward` (pip package `image-reward`; the official eval's preprocessing, and
  `imagereward-package` → the same key through the package's own `score`), `hps` → `hps` (pip package `hpsv2`)
- `world`     → `taste` and `mode_<name>` per taste mode: the miniature world's attribute reader on the pictures
  (scoring/world_scorer.py; for `pag eval --preset mini --scorers world`)

`aesthetic` and `clip` share one open_clip model and one image embedding per batch.

Text scorers (registered with `text=True`) judge the rewrite's text instead of images:
`fn(texts, prompts) -> {score_name: tensor (N,)}` with `texts[i]` the rewrite and `prompts[i]` the plain
prompt (scoring/text_scorers.py: `style` → `style`, `relevance_text` → `text_cos`). The combined function
is `score_all(images, prompts, texts=None)`: images may be None when only text scorers are configured
(`reward.render=false`).

`build_scorers(..., differentiable=True)` returns the same function with autograd on: the scores keep a
graph back to `images` (IPGO ascends them through the sampler). `aesthetic`, `clip` and `hps` have that
path — one code path: the factories are the same and only `torch.no_grad` is lifted, except that `hps`
then loads HPS v2's ViT-H-14 weights into an open_clip model, since the `hpsv2` package scores PIL
images. `imagereward` has no differentiable path. `pixels="signed"` takes images in [−1, 1] (a VAE
decode) instead of [0, 1].
"""
from __future__ import annotations

from typing import Callable, Literal, Optional, Sequence

import torch

from common.config import ModelConfig
from common.clip import OPENAI_MEAN, OPENAI_STD, ClipBundle, build_aesthetic
from common.models import ModelLoadError
# the registry's names are part of this module's interface (`from scoring.scorers import SCORERS, …`)
from scoring.registry import (DIFFERENTIABLE, SCORE_KEYS, SCORERS, TEXT, Factory, ScoreFn,  # noqa: F401
                              ScorerContext, ScorerUnavailableError, UnknownScorerError, check_known,
                              register_scorer, require_package, score_keys)
# the text scorers register `style` and `relevance_text` when imported
from scoring import text_scorers  # noqa: F401,E402
# and the miniature world's ground truth registers `world` (an eval scorer: taste and modes read from the pictures)
from scoring import world_scorer  # noqa: F401,E402


def _to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def _per_prompt(images: torch.Tensor, prompts: Sequence[str], score: Callable[[str, list], list[float]]) -> torch.Tensor:
    """Call a (prompt, [PIL]) → [float] scorer once per distinct prompt, keep the image order."""
    pil = _to_pil(images)
    out = torch.empty(len(pil), dtype=torch.float32)
    for text in dict.fromkeys(prompts):
        index = [i for i, p in enumerate(prompts) if p == text]
        values = score(text, [pil[i] for i in index])
        values = values if isinstance(values, (list, tuple)) else [values]
        out[index] = torch.tensor([float(v) for v in values], dtype=torch.float32)
    return out


@register_scorer("aesthetic", keys=("aes",), differentiable=True)
def aesthetic_scorer(ctx: ScorerContext) -> ScoreFn:
    mlp = build_aesthetic(ctx.model, ctx.device)

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"aes": mlp(ctx.image_embeddings(images).to(ctx.device)).float().cpu()}

    return fn


def _cosine_fn(bundle: ClipBundle, embed: Callable[[torch.Tensor], torch.Tensor], key: str) -> ScoreFn:
    """fn(images, prompts) → {key: cosine(image i, prompts[i])}; the text side is never differentiated."""
    def fn(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        texts = list(dict.fromkeys(prompts))  # each distinct text encoded once
        text_emb = bundle.encode_text(texts)  # (P, D)
        rows = torch.tensor([texts.index(p) for p in prompts], device=text_emb.device)
        image_emb = embed(images).to(text_emb.device)  # (N, D)
        return {key: (image_emb * text_emb[rows]).sum(-1).float().cpu()}

    return fn


@register_scorer("clip", differentiable=True)
def clip_scorer(ctx: ScorerContext) -> ScoreFn:
    return _cosine_fn(ctx.clip(), ctx.image_embeddings, "clip")


#: the official eval's BLIP token length for ImageReward (eval.py:45-47; the package's own `score` uses 35)
IMAGEREWARD_TOKENS = 75


def official_imagereward_pixels(images: torch.Tensor) -> torch.Tensor:
    """The official eval's ImageReward input from (N, 3, H, W) images in [0, 1]: each image as an 8-bit picture
    through CLIP's preprocess (bicubic resize of the short side to 224, centre crop, to [0, 1], CLIP
    normalisation), then `rm_preprocess` (the same resize and crop, which leave a 224² tensor as it is, and the
    CLIP normalisation a second time) -> (N, 3, 224, 224) (eval.py:38-43, 125-130)."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    normalize = Normalize(OPENAI_MEAN, OPENAI_STD)
    clip_preprocess = Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224), ToTensor(),
                               normalize])
    return normalize(torch.stack([clip_preprocess(picture) for picture in _to_pil(images)]))


def _imagereward_model(ctx: ScorerContext, scorer: str):
    rm = require_package("image-reward", "ImageReward", scorer, "imagereward")
    try:
        return rm.load("ImageReward-v1.0", device=str(ctx.device))
    except Exception as exc:
        raise ModelLoadError(f"cannot load ImageReward-v1.0: {type(exc).__name__}: {exc}; run `python -c \"import "
                             "ImageReward; ImageReward.load('ImageReward-v1.0')\"` once with network") from exc


@register_scorer("imagereward")
def imagereward_scorer(ctx: ScorerContext) -> ScoreFn:
    """ImageReward as the official eval computes it: the doubled CLIP normalisation (`official_imagereward_pixels`),
    the text as BLIP tokens padded and cut to 75, `score_gard` (eval.py:33-50, 125-130)."""
    model = _imagereward_model(ctx, "imagereward")

    @torch.no_grad()
    def fn(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = model.blip.tokenizer(list(prompts), padding="max_length", truncation=True,
                                      max_length=IMAGEREWARD_TOKENS, return_tensors="pt")
        pixels = official_imagereward_pixels(images).to(ctx.device)
        scores = model.score_gard(tokens.input_ids.to(ctx.device), tokens.attention_mask.to(ctx.device), pixels)
        return {"imagereward": scores.reshape(len(prompts)).float().cpu()}

    return fn


@register_scorer("imagereward-package", keys=("imagereward",))
def imagereward_package_scorer(ctx: ScorerContext) -> ScoreFn:
    """ImageReward through the package's own `score` (its BLIP preprocessing: one normalisation, 35 tokens): what
    this project reported before it followed the official eval; the same `imagereward` column."""
    model = _imagereward_model(ctx, "imagereward-package")

    @torch.no_grad()
    def fn(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"imagereward": _per_prompt(images, prompts, model.score)}

    return fn


#: HPS v2.1: open_clip ViT-H-14 fine-tuned on human preferences; the score is the image–text cosine
HPS_CHECKPOINT = ("xswu/HPSv2", "HPS_v2.1_compressed.pt")


def _hps_bundle(ctx: ScorerContext) -> ClipBundle:
    """HPS v2.1 as an open_clip ViT-H-14 with the HPS weights (for the differentiable path)."""
    import open_clip

    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(*HPS_CHECKPOINT)
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        model = open_clip.create_model("ViT-H-14", pretrained=None)
        model.load_state_dict(state)
    except Exception as exc:
        raise ModelLoadError(f"cannot load HPS v2.1 ({'/'.join(HPS_CHECKPOINT)}): {type(exc).__name__}: {exc}; "
                             f"run `hf download {HPS_CHECKPOINT[0]} {HPS_CHECKPOINT[1]}` once with network") from exc
    model.eval().requires_grad_(False).to(device=ctx.device, dtype=ctx.dtype)
    return ClipBundle(model=model, tokenizer=open_clip.get_tokenizer("ViT-H-14"), image_size=224)


@register_scorer("hps", differentiable=True)
def hps_scorer(ctx: ScorerContext) -> ScoreFn:
    hpsv2 = require_package("hpsv2", "hpsv2", "hps", "hps")
    if ctx.differentiable:
        bundle = _hps_bundle(ctx)
        return _cosine_fn(bundle, bundle.embed_images, "hps")

    def score(text: str, pil: list) -> list[float]:
        try:
            return hpsv2.score(pil, text, hps_version="v2.1")
        except (OSError, RuntimeError) as exc:  # first call downloads the checkpoint
            raise ModelLoadError(f"cannot load HPS v2.1: {exc}; run hpsv2.score once with network") from exc

    @torch.no_grad()
    def fn(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"hps": _per_prompt(images, prompts, score)}

    return fn


def build_scorers(names: Sequence[str], model: ModelConfig, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, differentiable: bool = False,
                  pixels: Literal["unit", "signed"] = "unit") -> ScoreFn:
    """One function running every named scorer; raises UnknownScorerError / ScorerUnavailableError
    at set-up, not at the first batch. `differentiable=True`: the scores carry autograd back to the
    images (only scorers in DIFFERENTIABLE). `pixels`: "unit" images in [0, 1], "signed" in [−1, 1]."""
    check_known(names)
    if pixels not in ("unit", "signed"):
        raise ValueError(f"pixels must be 'unit' ([0, 1]) or 'signed' ([-1, 1]), not {pixels!r}")
    if differentiable:
        missing = [n for n in names if n not in DIFFERENTIABLE]
        if missing:
            raise UnknownScorerError(f"scorer {missing[0]!r} has no differentiable path; differentiable scorers: "
                                     f"{', '.join(sorted(DIFFERENTIABLE))}")
    ctx = ScorerContext(model=model, device=torch.device(device), dtype=dtype, differentiable=differentiable)
    fns = {name: SCORERS[name](ctx) for name in dict.fromkeys(names)}

    def score_all(images: Optional[torch.Tensor], prompts: Sequence[str],
                  texts: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
        """Scores of item i = (images[i] or None, plain prompts[i], rewrite texts[i] or None)."""
        if images is None and any(name not in TEXT for name in fns):
            raise ValueError(f"image scorers {[n for n in fns if n not in TEXT]} need images (reward.render=true)")
        if images is not None and (images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != len(prompts)):
            raise ValueError(f"images must be (N,3,H,W) with N = len(prompts) = {len(prompts)}, got {tuple(images.shape)}")
        if any(name in TEXT for name in fns) and (texts is None or len(texts) != len(prompts)):
            raise ValueError(f"text scorers {[n for n in fns if n in TEXT]} need one rewrite text per prompt "
                             f"({len(prompts)}), got {None if texts is None else len(texts)}")
        if images is not None and pixels == "signed":
            images = (images / 2 + 0.5).clamp(0, 1)
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            return _score(images, prompts, texts)

    def _score(images: Optional[torch.Tensor], prompts: Sequence[str],
               texts: Optional[Sequence[str]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, fn in fns.items():
            for key, value in (fn(texts, prompts) if name in TEXT else fn(images, prompts)).items():
                if key in out:
                    raise ValueError(f"scorer {name!r} returns {key!r}, which another scorer already returned")
                if value.shape != (len(prompts),):
                    raise ValueError(f"scorer {name!r} returned {key!r} of shape {tuple(value.shape)}, expected ({len(prompts)},)")
                out[key] = value
        ctx._last = None  # drop the memoised embedding with the batch
        return out

    return score_all
