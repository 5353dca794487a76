"""The model factory: tiny builds every real class offline and runs a forward; sd14 fails cleanly offline."""
import time

import pytest
import torch

from common.config import load_config
from common import clip as C
from common import models as M


#: sha256 of the packaged LAION weights (common/assets; the same tensors as ../shared/data/aesthetic/)
AESTHETIC_SHA256_PREFIX = "69d9f732fe8a"


@pytest.fixture(scope="module")
def tiny():
    return load_config("tiny").model


def test_tiny_builds_every_model_and_runs_forward(tiny):
    torch.set_num_threads(2)
    start = time.perf_counter()
    tok = M.build_tokenizer(tiny)
    assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "left"
    policy = M.build_policy(tiny, tok)
    ref = M.build_reference(tiny, tok)
    assert all(not p.requires_grad for p in ref.parameters())
    assert torch.equal(policy.transformer.wte.weight, ref.transformer.wte.weight), "policy and reference start equal"
    batch = tok(["a cat Rephrase:\n", "a dog on a red sofa Rephrase:\n"], return_tensors="pt", padding=True)
    logits = policy(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and logits.shape[-1] == len(tok)

    pipe = M.build_sd_pipeline(tiny)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++" and pipe.safety_checker is None
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert M.count_parameters(part) < 2_000_000
    images = pipe(["a cat"], num_inference_steps=2, guidance_scale=7.5, height=tiny.image_size,
                  width=tiny.image_size, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (1, 3, tiny.image_size, tiny.image_size) and torch.isfinite(images).all()

    clip = C.build_clip(tiny)
    img_emb = clip.encode_images(images)
    txt_emb = clip.encode_text(["a cat"])
    assert img_emb.shape == txt_emb.shape == (1, 768)
    assert torch.allclose(img_emb.norm(dim=-1), torch.ones(1), atol=1e-5)
    aes = C.build_aesthetic(tiny)
    assert aes(img_emb).shape == (1,) and torch.isfinite(aes(img_emb)).all()

    enc = M.build_sentence_encoder(tiny, tok)
    emb = enc.encode(["a cat on a sofa", "a dog in the park"])
    assert emb.shape[0] == 2
    assert time.perf_counter() - start < 120  # generous: the figure that matters is in the issue note


def test_tiny_weights_are_seeded(tiny):
    tok = M.build_tokenizer(tiny)
    a, b = M.build_policy(tiny, tok), M.build_policy(tiny, tok)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    other = M.build_policy(tiny.model_copy(update={"seed": 5}), tok)
    assert not torch.equal(a.lm_head.weight, other.lm_head.weight)


def test_real_aesthetic_weights_load_and_differ_from_random(tiny):
    mlp = C.build_aesthetic(tiny)
    assert mlp.layers[0].weight.shape == (1024, 768)
    # the released predictor is linear (no activations): its score is one affine map, composed here by hand
    emb = torch.nn.functional.normalize(torch.randn(3, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    linears = [m for m in mlp.layers if isinstance(m, torch.nn.Linear)]
    w, b = torch.eye(768), torch.zeros(768)
    for lin in linears:
        w, b = lin.weight @ w, lin.weight @ b + lin.bias
    torch.testing.assert_close(mlp(emb), (emb @ w.T + b).squeeze(-1), rtol=1e-4, atol=1e-4)
    # the released weights, not an init: the file's hash, and scores spread as a trained head's do
    import hashlib

    assert hashlib.sha256(C.AESTHETIC_WEIGHTS.read_bytes()).hexdigest()[:12] == AESTHETIC_SHA256_PREFIX
    assert not mlp.relu and float(mlp(emb).std()) > 1e-3


def test_aesthetic_bad_weights_file(tmp_path, tiny):
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(bad))
    with pytest.raises(M.ModelLoadError, match="not the LAION aesthetic MLP"):
        C.build_aesthetic(tiny.model_copy(update={"aesthetic_weights": str(bad)}))
    with pytest.raises(M.ModelLoadError, match="not found"):
        C.build_aesthetic(tiny.model_copy(update={"aesthetic_weights": str(tmp_path / "none.pth")}))


def test_aesthetic_relu_variant_round_trips_through_its_metadata(tmp_path, tiny):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    relu = C.AestheticMLP(relu=True).eval()
    path = tmp_path / "relu.safetensors"
    save_file(relu.state_dict(), str(path), metadata=relu.metadata)
    loaded = C.build_aesthetic(tiny.model_copy(update={"aesthetic_weights": str(path)}))
    emb = torch.nn.functional.normalize(torch.randn(4, 768), dim=-1)
    assert loaded.relu
    torch.testing.assert_close(loaded(emb), relu(emb))
    linear = C.AestheticMLP().eval()
    linear.load_state_dict(relu.state_dict())  # same keys, same weights: only the activations differ
    assert not torch.allclose(linear(emb), relu(emb))
    save_file(relu.state_dict(), str(path), metadata={"activation": "gelu"})
    with pytest.raises(M.ModelLoadError, match="activation='gelu'"):
        C.build_aesthetic(tiny.model_copy(update={"aesthetic_weights": str(path)}))


@pytest.mark.parametrize("builder, needle", [
    (lambda c: M.build_sd_pipeline(c), "CompVis/stable-diffusion-v1-4"),
    (lambda c: M.build_policy(c, M.build_tokenizer(c.model_copy(update={"tokenizer": str(M.GPT2_TOKENIZER_DIR)}))), "gpt2"),
    (lambda c: M.build_tokenizer(c), "gpt2"),
    (lambda c: C.build_clip(c), "ViT-L-14/openai"),
])
def test_sd14_fails_cleanly_offline(monkeypatch, tmp_path, builder, needle):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to find locally
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    cfg = load_config("sd14").model
    with pytest.raises(M.ModelLoadError) as err:
        builder(cfg)
    text = str(err.value)
    assert needle in text and "pre-download" in text


def test_sd14_local_directory_is_used(tmp_path, tiny):
    """`sd14` accepts a local directory: save the tiny pipeline and load it through the pretrained path."""
    pipe = M.build_sd_pipeline(tiny)
    pipe.save_pretrained(tmp_path / "sd")
    cfg = load_config("sd14", overrides=[f"model.sd={tmp_path / 'sd'}"]).model
    loaded = M.build_sd_pipeline(cfg)
    assert type(loaded.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight)
