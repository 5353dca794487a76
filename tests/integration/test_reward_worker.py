"""Reward worker on `tiny`: rendering with fixed noise, the paper's reward, the shared plain cache,
failure isolation, reclaiming a dead consumer's work, and Ray workers scaled and killed mid-run."""
from __future__ import annotations

import math
import random
import time

import pytest
import redis
import torch

from scoring import scorers
from scoring.plain_cache import PlainCache, cache_model_id
from actors.reward_worker import RewardWorker
from scoring.render import build_reward_models, plain_text
from buffer.replay import ReplayBuffer
from common.config import load_config
from common.constants import SCORERS_GROUP, pending_key, plain_key
from common.timing import role_times
from common.trajectory import Trajectory

torch.set_num_threads(1)

COMPONENTS = {"aes", "aes_plain", "aes_gain", "clip", "clip_plain", "rel", "reward"}
TINY = ["reward.images.steps=2", "reward.images.per_prompt=2", "reward.batch_size=4"]


def _traj(prompt: str, response: str, run: str = "") -> Trajectory:
    rng = random.Random(hash((prompt, response)))
    n = rng.randint(3, 8)
    return Trajectory(prompt=prompt, response=response, run=run,
                      prompt_ids=[rng.randrange(50257) for _ in range(6)],
                      response_ids=[rng.randrange(50257) for _ in range(n)],
                      ref_logprobs=[-rng.random() * 5 for _ in range(n)])


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny", overrides=TINY)


@pytest.fixture(scope="module")
def models(cfg):
    return build_reward_models(cfg, "cpu")


@pytest.fixture
def worker(cfg, models, redis_url, run_name):
    w = RewardWorker(cfg, redis_url, run_name, "w0", models=models, block_ms=50)
    yield w
    w.close()


# ------------------------------------------------------------------ pure parts

def test_plain_text_drops_the_rephrase_template():
    assert plain_text("a cat on a sofa Rephrase:\n") == "a cat on a sofa"
    assert plain_text("a cat on a sofa Rephrase:") == "a cat on a sofa"
    assert plain_text("a cat on a sofa") == "a cat on a sofa"


def test_images_do_not_depend_on_the_batch(models):
    render = models.renderer
    k = render.k
    alone = render(["a cat"])
    batched = render(["a red car", "a cat", "a castle in the mountains"])
    assert alone.shape == (k, 3, 32, 32)
    torch.testing.assert_close(batched[k:2 * k], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(alone[0], alone[1])  # image i uses seed + i
    assert not torch.allclose(batched[0], batched[k])  # and the prompt matters


# ------------------------------------------------------------------ the worker, no Ray

def test_step_scores_stores_and_acks(worker, cfg):
    trajs = [_traj("a cat", "a cat, highly detailed"), _traj("a dog Rephrase:\n", "a dog, oil painting"),
             _traj("a cat", "a cat, cinematic lighting")]
    worker.buffer.push_pending(trajs)
    started = time.monotonic()
    assert worker.step() == 3
    assert worker.buffer.pending_len() == 0
    assert len(worker.buffer) == 3
    for t in trajs:
        stored = worker.buffer.get(t.id)
        assert COMPONENTS <= set(stored.scores)
        assert all(math.isfinite(v) for v in stored.scores.values())
        s = stored.scores
        assert s["aes_gain"] == pytest.approx(s["aes"] - s["aes_plain"])
        # the hinge is per image (tests/test_reward.py); its mean lies between the floor and 0
        assert -cfg.reward.clip_weight * max(cfg.reward.clip_threshold, 0.0) <= s["rel"] <= 0.0
        assert s["reward"] == pytest.approx(s["aes_gain"] + s["rel"])
        assert stored.log_reward == pytest.approx(s["reward"] / cfg.reward.beta)
    # both rewrites of "a cat" share one plain render: 3 rewrites + 2 plain prompts
    assert worker.stats.plain_cache_misses == 2 and worker.stats.images == 5 * cfg.reward.images.per_prompt
    # readable for a person
    fields = worker.buffer.client.hgetall(f"pag:{worker.run_name}:traj:{trajs[0].id}")
    assert float(fields[b"aes_gain"]) == pytest.approx(worker.buffer.get(trajs[0].id).scores["aes_gain"], abs=1e-5)
    spent = role_times(worker.buffer.meta())["reward"]  # where its time went, in the run's meta
    assert set(spent) <= {"read", "render", "score", "other", "store"} and spent["render"] > 0, spent  # < 1 ms: not yet
    assert sum(spent.values()) <= time.monotonic() - started


def test_identical_images_give_zero_aesthetic_gain(worker):
    first, second = _traj("a lighthouse at dusk", "a lighthouse at dusk"), _traj("a robot", "a robot")
    worker.buffer.push_pending([first])
    worker.step()  # plain rendered in the same batch as the rewrite
    worker.buffer.push_pending([second, _traj("a lighthouse at dusk", "a lighthouse at dusk ")])
    worker.step()  # plain of the second comes from the cache of the first
    for t in (first, second):
        s = worker.buffer.get(t.id).scores
        assert abs(s["aes_gain"]) < 1e-5 and abs(s["clip"] - s["clip_plain"]) < 1e-5


def test_plain_cache_hits_on_second_sighting_and_is_shared(worker, cfg, models, redis_url):
    rows = models.renderer.unet_rows
    worker.buffer.push_pending([_traj("a bowl of fruit", "a bowl of fruit, still life")])
    worker.step()
    cold = models.renderer.unet_rows - rows
    worker.buffer.push_pending([_traj("a bowl of fruit", "a bowl of fruit, 8k")])
    worker.step()
    warm = models.renderer.unet_rows - rows - cold
    meta = worker.buffer.meta()
    assert (int(meta["plain_cache_misses"]), int(meta["plain_cache_hits"])) == (1, 1)
    assert warm * 2 == cold  # the plain prompt is not rendered again
    assert warm == cfg.reward.images.per_prompt * cfg.reward.images.steps * 2  # ×2: classifier-free guidance

    other = RewardWorker(cfg, redis_url, "another_run", "w0", models=models, block_ms=50)
    other.buffer.push_pending([_traj("a bowl of fruit", "a bowl of fruit, watercolor")])
    other.step()
    assert other.stats.plain_cache_hits == 1 and other.stats.plain_cache_misses == 0
    other.close()


def test_official_baseline_renders_and_judges_against_the_policy_input(cfg, models, redis_url, run_name):
    """reward.baseline=policy_input (sd14's default, gfn_trainer.py:635-686): the baseline images are rendered
    from "x Rephrase:\n", relevance is judged against that text, and the plain cache keys on it."""
    official = cfg.model_copy(deep=True)
    official.reward.baseline = "policy_input"
    prompt, response, template = "a teapot on a shelf", "a teapot on a shelf, 8k", "a teapot on a shelf Rephrase:\n"
    w = RewardWorker(official, redis_url, run_name, "w-official", models=models, block_ms=50)
    try:
        traj = _traj(prompt, response)
        w.buffer.push_pending([traj])
        assert w.step() == 1
        s = w.buffer.get(traj.id).scores
        assert set(w.cache.get_many([template, prompt], models.score_keys)) == {template}
    finally:
        w.close()
    k = models.renderer.k
    with torch.no_grad():
        base = models.score_fn(models.renderer([template]), [template] * k, [template] * k)
        mine = models.renderer([response])
        against = {text: float(models.score_fn(mine, [text] * k, [response] * k)["clip"].mean())
                   for text in (template, prompt)}
    assert s["aes_plain"] == pytest.approx(float(base["aes"].mean()), abs=1e-5)
    assert s["clip"] == pytest.approx(against[template], abs=1e-5)
    assert against[template] != pytest.approx(against[prompt])


def test_plain_cache_entries_are_readable_and_finite(redis_url, cfg):
    client = redis.Redis.from_url(redis_url)
    model_id = cache_model_id(cfg)
    cache = PlainCache(client, model_id, seed=0)
    cache.put("a cat", {"aes": 5.25, "clip": 0.3}, {"images": 2})
    assert cache.key("a cat").startswith(f"pag:plain:{model_id}:0:")
    assert cache.key("a cat") == plain_key(model_id, 0, __import__("hashlib").sha256(b"a cat").hexdigest())
    fields = client.hgetall(cache.key("a cat"))
    assert fields[b"prompt"] == b"a cat" and float(fields[b"aes"]) == 5.25
    assert cache.get_many(["a cat", "a dog"], ["aes", "clip"]) == {"a cat": {"aes": 5.25, "clip": 0.3}}
    assert cache.get_many(["a cat"], ["aes", "hps"]) == {}  # a run with another scorer misses
    with pytest.raises(ValueError, match="non-finite"):
        cache.put("a dog", {"aes": float("nan"), "clip": 0.3})
    other = load_config("tiny", overrides=["reward.images.steps=3"])
    assert cache_model_id(other) != cache_model_id(load_config("tiny"))
    client.close()


def test_nan_scorer_marks_items_failed_and_the_worker_goes_on(cfg, redis_url, run_name, monkeypatch):
    seen: list[str] = []

    def nan_factory(ctx):
        def fn(images, prompts):
            seen.extend(prompts)
            return {"nanny": torch.tensor([float("nan") if "bad" in p else 1.0 for p in prompts])}
        return fn

    monkeypatch.setitem(scorers.SCORERS, "nanny", nan_factory)
    monkeypatch.setitem(scorers.SCORE_KEYS, "nanny", ("nanny",))
    cfg_nan = load_config("tiny", overrides=TINY + ["reward.scorers=[aesthetic,clip,nanny]"])
    worker = RewardWorker(cfg_nan, redis_url, run_name, "w0", block_ms=50)
    good, bad = _traj("a good cat", "a good cat, 8k"), _traj("a bad cat Rephrase:\n", "a bad cat, 8k")
    worker.buffer.push_pending([good, bad, _traj("a good dog", "a good dog, 8k")])
    assert worker.run(max_items=3) == 3
    assert set(seen) == {"a good cat", "a bad cat", "a good dog"}  # every image is judged against the plain x
    assert len(worker.buffer) == 2 and worker.buffer.get(bad.id) is None
    assert worker.buffer.get(good.id).scores["nanny"] == 1.0 and worker.buffer.get(good.id).scores["nanny_plain"] == 1.0
    failed = worker.buffer.client.xrange(f"pag:{run_name}:failed")
    assert len(failed) == 1 and failed[0][1][b"id"].decode() == bad.id and b"nanny" in failed[0][1][b"reason"]
    assert int(worker.buffer.meta()["failed"]) == 1 and worker.buffer.pending_len() == 0
    assert worker.cache.get_many(["a bad cat"], worker.models.score_keys) == {}  # NaN is never cached
    later = _traj("a good bird", "a good bird, 8k")
    worker.buffer.push_pending([later])
    assert worker.step() == 1 and worker.buffer.get(later.id) is not None
    worker.close()


def test_render_error_fails_only_that_item(worker, monkeypatch):
    real = worker.renderer.__call__

    class Exploding:
        k = worker.renderer.k
        size = worker.renderer.size

        def __call__(self, texts):
            if any("boom" in t for t in texts):
                raise RuntimeError("CUDA out of memory (simulated)")
            return real(texts)

    monkeypatch.setattr(worker, "renderer", Exploding())
    ok, boom = _traj("a house", "a house, 8k"), _traj("a house", "a house, boom")
    worker.buffer.push_pending([ok, boom])
    assert worker.step() == 2
    assert worker.buffer.get(ok.id) is not None and worker.buffer.get(boom.id) is None
    reason = worker.buffer.client.xrange(f"pag:{worker.run_name}:failed")[0][1][b"reason"].decode()
    assert "out of memory" in reason and worker.stats.failed == 1


def test_dead_consumers_entries_are_reclaimed_and_stored_once(cfg, models, redis_url, run_name):
    buf = ReplayBuffer.from_config(cfg.buffer, run_name, redis_url=redis_url)
    trajs = [_traj("a ship", f"a ship, style {i}") for i in range(3)]
    buf.push_pending(trajs)
    taken = buf.read_pending("dead", 3)  # a consumer that claims work and dies
    assert len(taken) == 3
    done = taken[2][1]  # it stored this one and died before acknowledging
    buf.add([done.replace(scores={"reward": 0.0}, log_reward=0.0)])
    worker = RewardWorker(cfg, redis_url, run_name, "w0", models=models, block_ms=50, reclaim_idle_ms=100)
    time.sleep(0.2)  # the dead consumer's entries have been idle longer than reclaim_idle_ms
    assert worker.run(max_items=3, idle_timeout_s=2) == 3
    assert len(buf) == 3 and buf.pending_len() == 0
    assert worker.stats.already_stored == 1  # not rendered again
    assert buf.client.xlen(f"pag:{run_name}:fresh") == 3  # every id announced exactly once
    worker.close()
    buf.close()


# ------------------------------------------------------------------ Ray: two workers, one killed, scaled

def _push_bounded(buf: ReplayBuffer, trajs: list[Trajectory], start: int, bound: int) -> int:
    """Push as many as fit under the backpressure bound; returns the new start."""
    room = bound - buf.pending_len()
    if room > 0 and start < len(trajs):
        buf.push_pending(trajs[start:start + room])
        start += min(room, len(trajs) - start)
    return start


@pytest.mark.ray
def test_ray_workers_kill_one_mid_batch_and_scale(ray_local, redis_url, run_name):
    import ray

    from actors.scaling import scale_workers, start_workers, stop_workers
    from common.cluster import list_reward_workers as list_workers

    cfg = load_config("tiny", overrides=["reward.images.steps=4", "reward.images.per_prompt=2", "reward.batch_size=4",
                                         "reward.num_workers=2"])
    names = start_workers(cfg, redis_url, run_name, reclaim_idle_ms=1500, torch_threads=1)
    try:
        assert names == [f"pag:{run_name}:reward:0", f"pag:{run_name}:reward:1"]
        buf = ReplayBuffer.from_config(cfg.buffer, run_name, redis_url=redis_url)
        trajs = [_traj(f"prompt number {i % 4}", f"rewrite number {i}", run_name) for i in range(12)]
        bound, pushed, highest, killed, lost_with_it = 5, 0, 0, None, []
        deadline = time.monotonic() + 100
        while time.monotonic() < deadline:
            pushed = _push_bounded(buf, trajs, pushed, bound)
            highest = max(highest, buf.pending_len())
            if killed is None:
                for consumer in buf.client.xpending(pending_key(run_name), SCORERS_GROUP)["consumers"]:
                    name = consumer["name"].decode()
                    if consumer["pending"] and name in names:
                        ray.kill(ray.get_actor(name, namespace="pag"))  # mid-batch: it holds claimed entries
                        held = buf.client.xpending_range(pending_key(run_name), SCORERS_GROUP, "-", "+", 100, name)
                        lost_with_it = [buf.client.xrange(pending_key(run_name), h["message_id"], h["message_id"])
                                        for h in held]
                        killed = name
                        while name in list_workers(run_name):  # the name is released asynchronously
                            time.sleep(0.05)
                        scale_workers(run_name, 2, wait=False)  # a replacement, settings copied from the survivor
                        break
            if pushed == len(trajs) and len(buf) == len(trajs) and buf.pending_len() == 0:
                break
            time.sleep(0.02)
        assert killed is not None
        assert len(buf) == len(trajs), f"lost {len(trajs) - len(buf)} trajectories"
        assert buf.pending_len() == 0 and highest <= bound
        assert buf.client.xlen(f"pag:{run_name}:fresh") == len(trajs)  # none stored twice
        held_ids = [entry[0][1][b"id"].decode() for entry in lost_with_it if entry]
        assert held_ids, "the killed worker held no claimed entries; the reclaim path was not exercised"
        for traj_id in held_ids:
            assert buf.get(traj_id) is not None
        for traj in buf.iter_best():
            assert COMPONENTS <= set(traj.scores) and math.isfinite(traj.log_reward)
        assert len(list_workers(run_name)) == 2
        assert scale_workers(run_name, 1) == [f"pag:{run_name}:reward:0"]  # the highest index leaves
        assert stop_workers(run_name) == 1 and list_workers(run_name) == []
        buf.close()
    finally:
        stop_workers(run_name, timeout_s=10)  # never leave detached actors to the next test


def test_cli_registers_workers_scale_and_list():
    import argparse

    from actors.scaling import _cmd_list, _cmd_scale, register

    parser = argparse.ArgumentParser(prog="pag")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["workers", "scale", "3", "--run", "demo", "--ray-address", "ray://head:10001"])
    assert (args.func, args.n, args.run, args.ray_address) == (_cmd_scale, 3, "demo", "ray://head:10001")
    args = parser.parse_args(["workers", "list", "--run", "demo"])
    assert args.func is _cmd_list and args.ray_address == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["workers", "scale", "3"])  # --run is required


def test_relevance_is_hinged_per_image_then_averaged(redis_url, run_name):
    """The official rule: each image's CLIP score is hinged, then the hinges are averaged. With the
    threshold midway between a rewrite's two images, hinging their mean would give 0 instead. On the
    miniature world's CLIP: tiny's random one scores every picture near 0 or below, where the hinge is flat."""
    prompt, response = "a red circle", "a red circle, neon palette"
    c = load_config("mini", overrides=TINY)
    models = build_reward_models(c, "cpu")
    clips = models.score_fn(models.renderer([response]), [prompt] * 2, [response] * 2)["clip"].double()
    low, high = sorted(float(x) for x in clips.clamp(min=0))
    assert high > low, f"the two images score alike ({clips.tolist()}): pick another prompt"
    c.reward.clip_threshold = (low + high) / 2
    w = RewardWorker(c, redis_url, run_name, "w1", models=models, block_ms=50)
    try:
        traj = _traj(prompt, response)
        w.buffer.push_pending([traj])
        assert w.step() == 1
        rel = w.buffer.get(traj.id).scores["rel"]
    finally:
        w.close()
    expected = c.reward.clip_weight * (low - c.reward.clip_threshold) / 2  # the high image's hinge is 0
    assert rel == pytest.approx(expected, rel=1e-4) and rel < 0


# ------------------------------------------------------------------ a Redis at its maxmemory

def test_a_full_redis_is_named_and_the_worker_resumes_when_it_has_room(cfg, models, make_redis_server, run_name,
                                                                       caplog):
    import threading

    server = make_redis_server()
    buf = ReplayBuffer(server.url, run_name, capacity=cfg.buffer.capacity)
    buf.push_pending([_traj("a cat", f"a cat, style {i}") for i in range(2)])
    w = RewardWorker(cfg, server.url, run_name, "w0", models=models, block_ms=50, reclaim_idle_ms=300)
    raw = redis.Redis.from_url(server.url)
    raw.config_set("maxmemory", "1")  # every write that may grow memory is refused (noeviction)
    stop = threading.Event()
    with caplog.at_level("INFO", logger="actors.reward_worker"):
        threading.Timer(4.0, stop.set).start()
        assert w.run(stop) == 0
        full = [r for r in caplog.records if "is full" in r.getMessage()]
        assert len(full) >= 2 and all(r.exc_info is None for r in full)  # one line each, no traceback
        message = full[0].getMessage()
        assert "maxmemory 0.0 MiB" in message and f"buffer.capacity={cfg.buffer.capacity}" in message
        assert buf.pending_len() == 2 and len(buf) == 0  # nothing acknowledged, nothing lost
        raw.config_set("maxmemory", "0")
        assert w.run(max_items=2) == 2
    assert len(buf) == 2 and buf.pending_len() == 0  # the same two, scored once the server has room
    w.close()
    raw.close()
    buf.close()
