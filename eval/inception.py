"""The official eval's image diversity: InceptionV3 pool-3 features, reported as a cosine *similarity*.

Official eval.py:304-307 and 372-381 build pytorch-fid's `InceptionV3([BLOCK_INDEX_BY_DIM[2048]])` (the FID
weights, pt_inception-2015-12-05) and feed it each prompt's 48 images (16 rewrites × 3) as float tensors of
their 0-255 PIL pixels -- though the network, with its default `normalize_input=True`, expects [0, 1] and maps
it to [-1, 1]; so its inputs reach ±255. The features (the 2048-d pool, averaged to 1 × 1) are compared by
`batch_cosine_similarity_kernel` (utils.py:46): the mean cosine similarity over distinct pairs, reported as
such (higher = less diverse). `image_similarity_inception` is exactly that, with that input scaling; ours,
`image_diversity`, is 1 − the same mean over CLIP image embeddings.

pytorch-fid is an optional dependency (`pip install 'pag[fid]'`); its weights download once into the torch hub
cache (`$TORCH_HOME/hub/checkpoints`) and load from there offline.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F

from common.models import ModelLoadError
from scoring.registry import ScorerUnavailableError

#: pool-3 width, the official `inception_block_idx = 2048`
DIM = 2048


def build_inception(device: torch.device) -> Any:
    """pytorch-fid's InceptionV3 returning the 2048-d pool-3 block, in eval mode on `device`."""
    try:
        module = importlib.import_module("pytorch_fid.inception")
    except ImportError as exc:
        raise ScorerUnavailableError(
            "eval.inception needs the pip package 'pytorch-fid' (the official eval's image diversity), which is not "
            "installed: `pip install 'pag[fid]'`, or set eval.inception=false") from exc
    try:
        model = module.InceptionV3([module.InceptionV3.BLOCK_INDEX_BY_DIM[DIM]])
    except Exception as exc:  # noqa: BLE001 — offline without the cached weights: say how to get them
        raise ModelLoadError(
            f"cannot load the FID InceptionV3 weights ({type(exc).__name__}: {exc}); with network, run once "
            "`python -c \"from pytorch_fid.inception import InceptionV3; InceptionV3()\"` (it caches "
            f"{module.FID_WEIGHTS_URL.rsplit('/', 1)[-1]} under $TORCH_HOME/hub/checkpoints), or set "
            "eval.inception=false") from exc
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def official_features(model: Any, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) pictures in [0, 1] → (N, 2048) features as eval.py computes them: 8-bit pixels as floats
    0-255 (the PIL round trip), into a network that expects [0, 1]."""
    device = next(model.parameters()).device
    pixels = (images.clamp(0, 1) * 255).round().float().to(device)
    features = model(pixels)[0]
    if features.shape[2:] != (1, 1):
        features = F.adaptive_avg_pool2d(features, (1, 1))
    return features.flatten(1).cpu()
