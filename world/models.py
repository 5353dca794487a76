"""The miniature world's models, with the classes the `sd14` pipeline uses, sized for 2 CPU cores.

* `AutoencoderKL`: 32 x 32 RGB <-> 8 x 8 x 16 latents (three encoder blocks, a 4x reduction);
* a CLIP (`transformers.CLIPModel`): the text tower is a `CLIPTextModel` 64 wide, three layers, on
  CLIP's own BPE vocabulary (the pipeline's tokenizer); the image tower a ViT on 4-px patches; both
  project to 768 dimensions, ViT-L/14's width, so the LAION aesthetic predictor's architecture
  applies unchanged;
* `UNet2DConditionModel`: epsilon-prediction on the 8 x 8 x 16 latents, cross-attending to the text
  tower's last hidden states, as SD v1.4 does;
* the aesthetic predictor: `common.clip.AestheticMLP` (the LAION MLP) on the CLIP image embedding.

Shipped under world/assets/: `sd/` (a StableDiffusionPipeline directory: unet, vae, text_encoder,
tokenizer, scheduler), `clip/` (the CLIPModel) and `aesthetic.safetensors`. They load through the
ordinary factory paths (`StableDiffusionPipeline.from_pretrained`, `build_clip` on a CLIPModel
directory, `build_aesthetic` on a weights file); `world.build` trains them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from common.models import CLIP_CONTEXT as CONTEXT, clip_tokenizer  # noqa: F401  (the pipeline's tokenizer, 77 tokens)

ASSETS = Path(__file__).resolve().parent / "assets"
SD_DIR = ASSETS / "sd"
CLIP_DIR = ASSETS / "clip"
AESTHETIC = ASSETS / "aesthetic.safetensors"

TEXT_WIDTH = 64
#: 16 latent channels, not SD's 4: at equal steps the reader read 0.60 of the attributes off 16-channel
#: reconstructions against 0.51 off 4-channel ones (world/README.md); the UNet's cost barely moves
LATENT_CHANNELS = 16
EMBED_DIM = 768  # ViT-L/14's embedding width: the LAION aesthetic MLP's input
BOS, EOS = 49406, 49407  # CLIP BPE <|startoftext|>, <|endoftext|>
#: SD v1.4's noise schedule (scheduler_config.json), for training and for the pipeline's DPM-Solver++
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1)


def text_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
                          num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=CONTEXT,
                          projection_dim=EMBED_DIM, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)


def vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=128, intermediate_size=256,
                            num_hidden_layers=3, num_attention_heads=4, projection_dim=EMBED_DIM)


def new_clip(seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(text_config=text_config().to_dict(), vision_config=vision_config().to_dict(),
                        projection_dim=EMBED_DIM)
    return CLIPModel(config)


def new_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=16, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        sample_size=32,
    )


def new_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
        block_out_channels=(64, 128),
        norm_num_groups=16, cross_attention_dim=TEXT_WIDTH, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )

