"""Shared fixtures: a real redis-server on a free loopback port (never the machine's 6379),
offline Hugging Face, one SFT cache per session, and a local Ray cluster for the integration tests.

Tiers: tests/unit (no server, no subprocess), tests/integration (a real redis-server and/or a local
Ray), tests/e2e (the `pag` command end to end, in subprocesses)."""
from __future__ import annotations

import os
import sys
import tempfile
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Serve's proxy gets 5 s to start by default, too few on a busy 2-core machine (serving/cli.py); Ray reads it
# when the session's local Ray starts
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
# commands run without --preset use tiny (random weights, seconds), not the default mini world
os.environ["PAG_PRESET"] = "tiny"
# One cache for the whole session, seen by every test and every `pag` subprocess it starts: the tiny preset's
# automatic SFT (~40 s on 2 cores) is trained once, by the first test that needs it (sft/cache.py holds a file
# lock meanwhile), instead of once per test directory. Tests of the cache itself set their own PAG_CACHE.
# Under pytest-xdist every worker imports this file: they share one cache, named after the run's id.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if _RUN:
    os.environ.setdefault("PAG_CACHE", os.path.join(tempfile.gettempdir(), f"pag-test-cache-{_RUN}"))
else:
    os.environ.setdefault("PAG_CACHE", tempfile.mkdtemp(prefix="pag-test-cache-"))

from common.redis_server import RedisServer  # noqa: E402

# Under mutmut (bench/mutants.py) every mutant's tests run in a process forked from one that collected the tests
# once. transformers and diffusers import their model classes lazily, on first use, so without this each fork
# would import GPT-2's modelling code (and diffusers', open_clip's) again: ~2.5 s of a learner test's set-up,
# paid per mutant. Importing them here, in the forking process, pays it once. A plain pytest run is unchanged.
if "mutmut" in sys.modules:
    import diffusers  # noqa: E402, F401
    import open_clip  # noqa: E402, F401
    import transformers  # noqa: E402

    for _lazy in ("GPT2LMHeadModel", "GPT2Config", "GPT2TokenizerFast", "CLIPTextModel", "CLIPTokenizer", "CLIPModel"):
        getattr(transformers, _lazy)
    for _lazy in ("AutoencoderKL", "UNet2DConditionModel", "StableDiffusionPipeline", "DPMSolverMultistepScheduler"):
        getattr(diffusers, _lazy)
    from common.data import default_token_counter  # noqa: E402

    default_token_counter()  # the packaged GPT-2 tokenizer every prompt set is counted with (cached)


def pytest_collection_modifyitems(config, items):
    """Under mutmut (bench/mutants.py) a mutant's tests run fastest first; elsewhere the order is left alone."""
    from bench.mutants import fastest_first

    fastest_first(items, os.environ.get("MUTANT_UNDER_TEST", ""))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """URL of the suite's private server, emptied before each test (it is ours alone)."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def tiny_sft() -> str:
    """The tiny preset's automatic SFT checkpoint in the session cache, trained here once (~40 s on 2 cores)
    so that the `pag train` subprocesses of the e2e tests find it and their timeouts measure only the run."""
    from common.config import load_config
    from sft.cache import ensure_sft

    return ensure_sft(load_config("tiny"))


@pytest.fixture
def run_name() -> str:
    return "t" + uuid.uuid4().hex[:8]


@pytest.fixture
def make_redis_server(tmp_path):
    """Factory for tests that kill and restart their own server."""
    servers: list[RedisServer] = []

    def make(**kwargs) -> RedisServer:
        server = RedisServer(kwargs.pop("data_dir", tmp_path / f"redis{len(servers)}"), **kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.kill()


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster for the whole session (starting one costs seconds)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


#: a learner small enough for a unit test: 2 prompts × 4 rewrites of 2–8 tokens, batch 8, no reactivation,
#: nothing periodic (checkpoints, logging) unless a test asks for it
SMALL_LEARNER = (
    "sampler.prompts_per_batch=2", "sampler.samples_per_prompt=4", "sampler.min_len=2", "sampler.max_len=8",
    "learner.batch_size=8", "learner.grad_accum=1", "learner.checkpoint_every=1000", "learner.steps=1000",
    "learner.reactivation_every=0", "run.log_every=1000",
)


@pytest.fixture(scope="session")
def small_learner_config():
    """`small_learner_config(*overrides)`: the `tiny` preset at SMALL_LEARNER sizes; later overrides win."""
    import torch

    from common.config import load_config

    def build(*overrides: str):
        torch.set_num_threads(2)
        return load_config("tiny", overrides=[*SMALL_LEARNER, *overrides])

    return build


@pytest.fixture
def buffer(redis_url, run_name):
    """A ReplayBuffer on the session's redis-server, under a fresh run name, seeded."""
    from buffer import ReplayBuffer

    buf = ReplayBuffer(redis_url, run_name, seed=0)
    yield buf
    buf.close()


@pytest.fixture
def fresh_root_logging():
    """main() calls logging.basicConfig on the stderr of the moment (capsys's); undo it after each test."""
    import logging

    root = logging.getLogger()
    before = list(root.handlers)
    yield
    root.handlers[:] = before


def _tiny_clip_text(kind: str):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=49408, max_position_embeddings=77, projection_dim=32)
    return (CLIPTextModelWithProjection if kind == "projected" else CLIPTextModel)(cfg)


def _save_tiny_pipeline(kind: str, folder) -> None:
    """A tiny, seeded, random-weight SD3 or SDXL pipeline of the real classes, saved with save_pretrained
    (SD3 without its optional T5 encoder, as diffusers allows)."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                           SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)

    from common.models import clip_tokenizer

    torch.manual_seed(0)
    tok = clip_tokenizer()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32, shift_factor=0.0)
    if kind == "sd3":
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
            text_encoder=_tiny_clip_text("projected"), tokenizer=tok, text_encoder_2=_tiny_clip_text("projected"),
            tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)
    else:
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            norm_num_groups=8, cross_attention_dim=64, attention_head_dim=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=_tiny_clip_text("plain"), tokenizer=tok,
                                         text_encoder_2=_tiny_clip_text("projected"), tokenizer_2=tok, unet=unet,
                                         scheduler=EulerDiscreteScheduler())
    pipe.save_pretrained(str(folder))


@pytest.fixture(scope="session")
def transfer_target(tmp_path_factory):
    """`transfer_target("sd3" | "sdxl")`: the directory of a tiny saved pipeline of that family (built once)."""
    built = {}

    def get(kind: str):
        if kind not in built:
            built[kind] = tmp_path_factory.mktemp(f"tiny_{kind}")
            _save_tiny_pipeline(kind, built[kind])
        return built[kind]

    return get


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A `tiny` run directory with a config.yaml and one checkpoint (random policy weights): what `pag adapt`,
    `pag serve` and `pag eval` load from a trained run."""
    import torch

    from common.config import load_config
    from common.models import build_policy, build_tokenizer
    from learner.checkpoint import save_checkpoint

    run_dir = tmp_path_factory.mktemp("runs") / "served"
    cfg = load_config("tiny")
    cfg.run.name = "served"
    cfg.save(run_dir / "config.yaml")
    tok = build_tokenizer(cfg.model)
    policy = build_policy(cfg.model, tok)
    flow = torch.nn.Linear(2, 2)
    save_checkpoint(run_dir, 1, policy, tok, flow, torch.optim.AdamW(flow.parameters()), {})
    return run_dir
