"""Zero-shot transfer (issue 19, item 11): `model.sd` / `pag eval --target-model` may name any diffusers
text-to-image pipeline -- SD v1.x, SDXL, SD3 -- loaded by the real code from a saved directory; the reward
workers' renderer and speed switches drive its UNet or transformer, and IPGO refuses what it cannot optimise.
Tiny random pipelines of the real classes (tests/conftest.py), saved and loaded as a user's would be."""
from __future__ import annotations

import pytest
import torch

from common.config import load_config
from common.models import ModelLoadError, build_sd_pipeline, denoiser, load_text_to_image


@pytest.mark.parametrize("kind, cls, scheduler, net", [
    ("sd3", "StableDiffusion3Pipeline", "FlowMatchEulerDiscreteScheduler", "SD3Transformer2DModel"),
    ("sdxl", "StableDiffusionXLPipeline", "EulerDiscreteScheduler", "UNet2DConditionModel"),
])
def test_any_text_to_image_pipeline_loads_and_keeps_its_own_scheduler(transfer_target, kind, cls, scheduler, net):
    pipe = load_text_to_image(str(transfer_target(kind)))
    assert type(pipe).__name__ == cls and type(pipe.scheduler).__name__ == scheduler
    assert type(denoiser(pipe)).__name__ == net


def test_a_saved_sd_pipeline_gets_dpm_solver_as_in_training(tmp_path):
    cfg = load_config("tiny").model
    build_sd_pipeline(cfg).save_pretrained(str(tmp_path / "sd"))
    loaded = build_sd_pipeline(cfg.model_copy(update={"sd": str(tmp_path / "sd")}))
    assert type(loaded).__name__ == "StableDiffusionPipeline" and loaded.safety_checker is None
    assert type(loaded.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert loaded.scheduler.config.algorithm_type == "dpmsolver++"


def test_a_folder_that_is_no_pipeline_is_named_in_the_error(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load diffusion pipeline .*not_a_pipeline"):
        load_text_to_image(str(tmp_path / "not_a_pipeline"))


@pytest.mark.parametrize("kind", ["sd3", "sdxl"])
def test_the_renderer_draws_fixed_noise_images_with_a_transfer_target(transfer_target, kind):
    """Image i of every text starts from the same noise (the contract the plain baseline relies on), the
    pipeline's denoiser calls are counted (SD3's transformer takes its latents by keyword), and the speed
    switches apply to it."""
    from common.sections import SpeedConfig
    from scoring.render import Renderer
    from scoring.sd_speed import apply_speed

    pipe = build_sd_pipeline(load_config("tiny", overrides=[f"model.sd={transfer_target(kind)}"]).model)
    info = apply_speed(pipe, SpeedConfig(channels_last=True))
    assert info["unet_dtype"] == "float32"
    renderer = Renderer(pipe, images_per_prompt=2, steps=2, guidance=3.0, seed=7, size=32, max_prompts_per_call=1)
    both = renderer(["a red circle", "a blue square"])
    again = renderer(["a blue square"])
    assert both.shape == (4, 3, 32, 32) and torch.isfinite(both).all()
    assert torch.allclose(both[2:], again, atol=1e-5)  # the same text, alone or in a batch: the same images
    assert not torch.allclose(both[0], both[1])  # two noise indices, two pictures
    assert renderer.unet_calls == 3 * 2 and renderer.unet_rows == 3 * 2 * 2 * 2  # calls x steps; x2 images x2 CFG


def test_classic_attention_is_refused_on_a_transformer_pipeline(transfer_target):
    from common.sections import SpeedConfig
    from scoring.sd_speed import apply_speed

    pipe = load_text_to_image(str(transfer_target("sd3")))
    with pytest.raises(ValueError, match="classic is for UNet pipelines; StableDiffusion3Pipeline"):
        apply_speed(pipe, SpeedConfig(attention="classic"))


def test_ipgo_refuses_a_pipeline_it_cannot_optimise_through(transfer_target):
    from ipgo.optimize import build_models

    cfg = load_config("tiny", overrides=[f"model.sd={transfer_target('sdxl')}"])
    with pytest.raises(ModelLoadError, match="IPGO optimises tokens in SD v1.x.*StableDiffusionXLPipeline"):
        build_models(cfg)


def test_the_paper_reference_is_the_transfer_figure_when_rendering_with_another_model():
    from pathlib import Path

    from eval.paper import PUBLISHED, TRANSFER, published

    assert published(load_config("sd14")) is PUBLISHED
    transfer = published(load_config("sd14", overrides=["model.sd=stabilityai/stable-diffusion-3-medium-diffusers"]))
    assert transfer is TRANSFER
    text = (Path(__file__).resolve().parents[2] / "docs" / "paper-numbers.md").read_text()
    table = TRANSFER["table"]
    pag, best = table["pag"]["SD3 transfer"]["reward"], table["best baseline"]["SD3 transfer"]["reward"]
    assert f"applied to SD3: PAG {pag:.2f} vs {best:.2f} for the best baseline" in text
