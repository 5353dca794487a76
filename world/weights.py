"""The world's weights on disk: the CLIP text tower as the pipeline's `CLIPTextModel`, the pipeline
assembled from the trained parts, float16 saving, loading, and MANIFEST.json records (sha256, size,
command, seed per file; each stage's figures under "_build")."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch

from common.models import load_kwargs
from world import models as wm

MANIFEST = wm.ASSETS / "MANIFEST.json"


def text_tower(clip):
    """The CLIP text tower as the pipeline's `CLIPTextModel` (the same weights)."""
    from transformers import CLIPTextModel

    text = CLIPTextModel(clip.config.text_config)
    text.load_state_dict(clip.text_model.state_dict())  # transformers 5: CLIPModel.text_model is a CLIPTextModel
    return text.eval().requires_grad_(False)


def pipeline(vae, clip, unet):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler(**wm.SCHEDULE, algorithm_type="dpmsolver++", solver_order=2)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_tower(clip), tokenizer=wm.clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _save_half(model, folder: Path) -> None:
    """save_pretrained in float16 (the shipped size), leaving `model` in float32."""
    model.to(torch.float16).save_pretrained(str(folder), safe_serialization=True)
    model.float()


def _drop_load_paths(folder: Path) -> None:
    """Remove `_name_or_path` from the configs written under `folder`: a model loaded from a directory (a resumed
    stage) would otherwise ship the path of the machine that built it."""
    for config in folder.rglob("config.json"):
        raw = json.loads(config.read_text())
        if raw.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def save_stage(stage: str, model, root: Path) -> list[Path]:
    """Write one stage's weights under `root` (world/assets by default); the files written."""
    paths = _save_stage(stage, model, root)
    for path in paths:
        if path.is_dir():
            _drop_load_paths(path)
    return paths


def _save_stage(stage: str, model, root: Path) -> list[Path]:
    if stage == "vae":
        _save_half(model, root / "sd" / "vae")
        return [root / "sd" / "vae"]
    if stage == "sight":  # the image tower changed, the text tower (sd/text_encoder) did not
        _save_half(model, root / "clip")
        wm.clip_tokenizer().save_pretrained(str(root / "clip"))
        return [root / "clip"]
    if stage == "clip":
        _save_half(model, root / "clip")
        wm.clip_tokenizer().save_pretrained(str(root / "clip"))
        _save_half(text_tower(model), root / "sd" / "text_encoder")
        return [root / "clip", root / "sd" / "text_encoder"]
    if stage == "unet":  # the whole pipeline directory: model_index.json, scheduler, tokenizer, unet
        pipe = model
        pipe.to(torch.float16).save_pretrained(str(root / "sd"), safe_serialization=True)
        pipe.to(torch.float32)
        return [root / "sd"]
    from safetensors.torch import save_file

    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(root / "aesthetic.safetensors"),
              metadata=model.metadata)
    return [root / "aesthetic.safetensors"]


def load_vae(root: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(root / "sd" / "vae"), **load_kwargs(torch.float32)).eval()


def load_clip(root: Path):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(str(root / "clip"), dtype=torch.float32).eval()


def load_pipeline(root: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(root / "sd"), **load_kwargs(torch.float32), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _files(paths: Sequence[Path]) -> list[Path]:
    out = []
    for path in paths:
        out.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    return out


def record(root: Path, stage: str, paths: Sequence[Path], seed: int, figures: dict, command: str) -> None:
    """MANIFEST.json: sha256, size, command and seed of every file a stage wrote, and its figures."""
    manifest_path = root / MANIFEST.name
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    for path in _files(paths):
        rel = path.relative_to(root).as_posix()
        manifest[rel] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size,
                         "command": command, "seed": seed, "what": f"world {stage} stage"}
    manifest.setdefault("_build", {})[stage] = figures
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


