"""Parts `broadcast`, `e2e` and `ipgo` of bench/gpu.py.

broadcast: the learner's `WeightsClient.publish` (safetensors bytes, `ray.put`, a `WeightStore`
actor holding the ref) and 8 receiver actors doing what `Sampler.pull_weights` does (fetch newer →
unpack → `load_state_dict`), timed from the publish to the last receiver holding the new weights.

e2e: one process, one device, no Ray, a private redis-server: `Sampler.step` (fresh half) →
`RewardWorker.run` → `Learner.train_step` (half fresh, half prioritised replay, one teacher-forced
pass), against a loop written like the official trainer's step: every step renders its rewrites AND
their plain prompt(s) again, log-probs and flows come one token per forward (with gradients through
the sampling loop on the online half, as `generate_and_return_flow_logprob`; a token-by-token
re-pass on the replayed half, as `get_logpf_and_logf`), online and offline steps alternating.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import gpu_common as G


# ------------------------------------------------------------------ broadcast

class Receiver:
    """A sampler's weight-pulling half: the policy and the same calls as `Sampler.pull_weights`."""

    def __init__(self, cfg_dict: dict) -> None:
        from common.config import Config
        from common.models import build_policy, build_tokenizer

        torch.set_num_threads(1)
        cfg = Config.model_validate(cfg_dict)
        self.policy = build_policy(cfg.model, build_tokenizer(cfg.model))

    def pull(self, store, have_version: int) -> tuple[int, float, float]:
        from common.weights import WeightsClient

        start = time.time()
        version, _, state = WeightsClient(store).fetch(have_version)
        self.policy.load_state_dict(state, strict=False)
        return version, time.time() - start, time.time()


def run_broadcast(ctx: G.Context, deadline: G.Deadline) -> dict[str, Any]:
    try:
        import ray
    except ImportError as exc:
        raise G.Skip("ray is not installed here (its wheel is too large to carry to the device machine): "
                     "measure this part on a CPU node, `--only broadcast`") from exc
    from common.models import build_policy, build_tokenizer
    from common.weights import WeightStore, WeightsClient, pack_state_dict

    cfg = ctx.cfg()
    n = 2 if ctx.quick else 8
    state = build_policy(cfg.model, build_tokenizer(cfg.model)).state_dict()
    size = len(pack_state_dict(state))  # what is shipped: each storage once (the tied lm_head is not)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        store = ray.remote(num_cpus=0)(WeightStore).remote()
        receivers = [ray.remote(num_cpus=0)(Receiver).remote(cfg.to_dict()) for _ in range(n)]
        client = WeightsClient(store)
        ray.get([r.__ray_ready__.remote() for r in receivers])
        runs = []
        for rep in range(2 if ctx.quick else 7):
            if rep and not deadline.allows(3 * runs[-1]["total_s"]):
                break
            t0 = time.time()
            version = client.publish(rep, state)
            published = time.time() - t0
            answers = ray.get([r.pull.remote(store, version - 1) for r in receivers])
            assert all(v == version for v, _, _ in answers)
            runs.append({"publish_s": published, "total_s": max(end for _, _, end in answers) - t0,
                         "receiver_fetch_load_s": [round(s, 3) for _, s, _ in answers]})
    finally:
        if started_ray:
            ray.shutdown()
    steady = runs[1:] or runs  # the first publish also warms the receivers' allocators
    total = statistics.median(r["total_s"] for r in steady)
    bandwidth = memcpy_bandwidth(size)
    floor = size * n / bandwidth  # every receiver must land the bytes in its parameters once
    return {"receivers": n, "bytes": size, "runs": runs, "total_s": total, "cpus": os.cpu_count(),
            "memcpy_bytes_per_s": bandwidth, "floor_s": floor, "ratio_to_floor": total / floor,
            "rows": [{"measure": f"weight broadcast to {n} samplers, publish → all loaded (s)", "value": total,
                      "baseline": floor, "ratio": total / floor,
                      "note": f"{size / 2**20:.0f} MiB safetensors via the Ray object store; baseline: the floor, "
                              f"{n} × the bytes ÷ memcpy {bandwidth / 1e9:.1f} GB/s measured here; target ≤ 2× it; "
                              f"{os.cpu_count()} CPUs on this node"}]}


def memcpy_bandwidth(size: int, reps: int = 5) -> float:
    """Bytes per second of one thread's memory copy of `size` bytes into memory already touched (best of reps)."""
    import numpy as np

    src, dst = np.ones(size, dtype=np.uint8), np.zeros(size, dtype=np.uint8)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return size / best


# ------------------------------------------------------------------ end to end

def _e2e_config(ctx: G.Context):
    B = 8 if ctx.quick else 16  # the paper's micro-batch is 64; both loops scale linearly, 16 fits the budget
    k = 4
    return ctx.cfg([f"learner.batch_size={B}", "learner.grad_accum=1", "learner.replay_ratio=0.5",
                    "reward.speed.render_batch=8", "learner.checkpoint_every=1000000",
                    "learner.reactivation_every=0", "run.log_every=1000000",
                    f"sampler.samples_per_prompt={k}", f"sampler.prompts_per_batch={B // 2 // k}",
                    f"reward.batch_size={B // 2}", "sampler.max_pending=100000"])


def generate_with_grad(policy, flow, ids, mask, max_len: int, min_len: int, temperature: float, eos: int, gen):
    """Sampling and log P_F / log F̃ in the same token-by-token loop, with gradients (the official online path)."""
    from common.decoding import eos_forbidden_steps, pool_prompt, position_ids_from_mask, trunk_step

    mask = mask.long()
    positions = position_ids_from_mask(mask)
    hidden, past = trunk_step(policy, ids, mask, positions, None)
    h, position = hidden[:, -1], positions[:, -1:] + 1
    prompt_hidden = pool_prompt(hidden, mask)[flow.prompt_input]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    tokens, valid, log_pfs, states = [], [], [], []
    for t in range(max_len):
        logits = policy.get_output_embeddings()(h).float()
        if t < eos_forbidden_steps(True, min_len):
            logits = logits.masked_fill(torch.arange(logits.shape[-1], device=ids.device) == eos, float("-inf"))
        with torch.no_grad():
            token = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen).squeeze(-1)
            token = torch.where(done, torch.full_like(token, eos), token)
        log_pfs.append(logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1))
        states.append(h)
        tokens.append(token)
        valid.append(~done)
        done = done | (token == eos)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        hidden, past = trunk_step(policy, token[:, None], mask, position, past)
        h, position = hidden[:, -1], position + 1
    response_mask = torch.stack(valid, 1).long()
    log_pf = torch.where(response_mask.bool(), torch.stack(log_pfs, 1), torch.zeros_like(response_mask, dtype=torch.float32))
    return torch.stack(tokens, 1), response_mask, log_pf, flow(torch.stack(states, 1), prompt_hidden)


class OfficialLike:
    """One training step the way the official trainer does it, on the project's models and scorers."""

    def __init__(self, cfg, learner, reference, models, prompts: list[str]) -> None:
        self.cfg, self.learner, self.reference, self.models, self.prompts = cfg, learner, reference, models, prompts
        self.replay: list = []  # the official buffer keeps token ids and rewards in process memory
        self.step_i, self.renders, self.reward_s = 0, 0, 0.0
        self.gen = torch.Generator(learner.device).manual_seed(0)

    def _reward(self, responses: list[str], plains: list[str]) -> torch.Tensor:
        """Render every rewrite and its plain prompt(s) again (no cache), score, the paper's reward / β."""
        from scoring.reward import paper_reward

        k, r = self.models.renderer.k, self.cfg.reward
        distinct = list(dict.fromkeys(plains))
        start = time.perf_counter()
        images = self.models.renderer(responses + distinct)
        self.renders += len(responses) + len(distinct)
        scores = self.models.score_fn(images, [p for p in plains + distinct for _ in range(k)])
        self.reward_s += time.perf_counter() - start
        aes, clip = scores["aes"].view(-1, k).double(), scores["clip"].view(-1, k).double()
        n = len(responses)
        plain_aes = {p: aes[n + i] for i, p in enumerate(distinct)}
        out = [paper_reward(aes[j].mean().item(), plain_aes[plains[j]].mean().item(), _rel(clip[j], r))["reward"]
               for j in range(n)]
        return torch.tensor(out, dtype=torch.float32, device=self.learner.device) / r.beta

    def step(self) -> int:
        from common.decoding import encode_prompts, ref_logprobs, to_trajectories
        from gpu_learner import token_loop_loss
        from learner.losses import gflownet_loss, temper

        L, s = self.learner, self.cfg.sampler
        B = self.cfg.learner.batch_size
        online = self.step_i % 2 == 0 or len(self.replay) < B
        L.optimizer.zero_grad(set_to_none=True)
        if online:  # one prompt, B samples, log-probs with gradients through the sampling loop
            plain = self.prompts[self.step_i % len(self.prompts)]
            ids, mask = encode_prompts(L.tokenizer, [plain] * B, L.device)
            resp, rmask, log_pf, log_flow = generate_with_grad(L.policy, L.flow, ids, mask, s.max_len, s.min_len, 1.0,
                                                               L.tokenizer.eos_token_id, self.gen)
            ref = ref_logprobs(self.reference, ids, mask, resp, rmask)
            trajs = to_trajectories(L.tokenizer, [plain] * B, ids, mask, resp, rmask, ref)
            log_reward = self._reward([t.response for t in trajs], [plain] * B)
            ref_t, terminal = temper(ref, log_reward, rmask, gamma=1.0, tau=1.0, min_len=s.min_len)
            loss = gflownet_loss("fl-db", log_pf, log_flow, ref_t, terminal, rmask)
            self.replay.extend(t.replace(log_reward=float(lr)) for t, lr in zip(trajs, log_reward))
        else:  # replayed: re-rendered and re-scored, token-by-token teacher forcing
            batch = [self.replay[(self.step_i * 7919 + i) % len(self.replay)] for i in range(B)]
            log_reward = self._reward([t.response for t in batch], [t.prompt for t in batch])
            batch = [t.replace(log_reward=float(lr)) for t, lr in zip(batch, log_reward)]
            loss, _ = token_loop_loss(L, batch)
        loss.backward()
        L.optimizer.step()
        self.step_i += 1
        return B


def _rel(clip: torch.Tensor, r) -> float:
    from scoring.reward import relevance

    return float(relevance(clip[None], r.clip_threshold, r.clip_weight)[0])


def run_e2e(ctx: G.Context, deadline: G.Deadline) -> dict[str, Any]:
    from actors.reward_worker import RewardWorker
    from scoring.render import build_reward_models
    from actors.sampler import Sampler
    from buffer.replay import ReplayBuffer
    from common.redis_server import RedisServer, RedisServerError
    from common.timing import role_times
    from common.weights import WeightStore
    from learner.learner import Learner

    cfg = _e2e_config(ctx)
    B = cfg.learner.batch_size
    with tempfile.TemporaryDirectory(prefix="pag-gpu-e2e-") as tmp:
        try:
            server = RedisServer(Path(tmp) / "redis").start()
        except (RedisServerError, OSError) as exc:
            raise G.Skip(f"no redis-server: {exc}") from exc
        try:
            buffer = ReplayBuffer.from_config(cfg.buffer, "e2e", redis_url=server.url)
            store = WeightStore()
            t0 = time.perf_counter()
            learner = Learner(cfg, buffer, Path(tmp) / "run", weights=store, device=str(ctx.device), resume=False)
            sampler = Sampler(cfg, buffer, weights=store, device=str(ctx.device))
            models = build_reward_models(cfg, str(ctx.device))
            worker = RewardWorker(cfg, server.url, "e2e", "w0", models=models, block_ms=10)
            build_s = time.perf_counter() - t0

            def ours() -> int:
                sampler.step()
                worker.run(max_items=B // 2)
                learner.train_step(wait_s=120)
                return B

            mimic = OfficialLike(cfg, learner, sampler.reference, models, sampler.next_prompts(64))
            for fn in (ours, ours, mimic.step, mimic.step):  # warm-up: replay half filled, both paths run once
                fn()
            times: dict[str, list[float]] = {"ours": [], "official_like": []}
            cpu = {"ours": 0.0, "official_like": 0.0}
            renders0, stats0, reward0 = mimic.renders, dict(worker.stats.as_dict()), mimic.reward_s
            phases0 = role_times(buffer.meta())
            for rep in range(1 if ctx.quick else 6):
                for name, fn in (("ours", ours), ("official_like", mimic.step)):
                    if rep and not deadline.allows(2 * sum(statistics.median(v) for v in times.values())):
                        break
                    cpu0 = time.process_time()
                    times[name].append(G.timed(fn, ctx.device)[0])
                    cpu[name] += time.process_time() - cpu0
            phases = {role: {ph: round(v - phases0.get(role, {}).get(ph, 0.0), 3) for ph, v in spent.items()}
                      for role, spent in role_times(buffer.meta()).items()}
            worker_stats = worker.stats.as_dict()
            worker.close()
            buffer.close()
        finally:
            server.stop()
    n_ours = len(times["ours"])
    rendered = (worker_stats["images"] - stats0["images"]) / models.renderer.k
    ours_tps = B / statistics.median(times["ours"])
    theirs_tps = B / statistics.median(times["official_like"])
    out = {"batch": B, "build_s": build_s, "times": times, "trajectories_per_s": {"ours": ours_tps, "official_like": theirs_tps},
           "ratio": ours_tps / theirs_tps,
           "renders_per_trajectory": {"ours": rendered / max(1, n_ours * B), "official_like":
                                      (mimic.renders - renders0) / max(1, len(times["official_like"]) * B)},
           "cpu_s_per_trajectory": {name: cpu[name] / max(1, len(times[name]) * B) for name in cpu}}
    theirs_render = mimic.reward_s - reward0
    out["seconds_by_phase"] = {"ours": phases, "official_like": {
        "render_and_score": round(theirs_render, 3), "rest": round(sum(times["official_like"]) - theirs_render, 3)}}
    out["rows"] = [{"measure": f"end to end trajectories/s (learner batch {B}), roles in one process vs official-like loop",
                    "value": ours_tps, "baseline": theirs_tps, "ratio": out["ratio"],
                    "note": f"target ≥ 3×; renders/trajectory {out['renders_per_trajectory']['ours']:.2f} vs "
                            f"{out['renders_per_trajectory']['official_like']:.2f}; CPU s/trajectory "
                            f"{out['cpu_s_per_trajectory']['ours']:.3f} vs "
                            f"{out['cpu_s_per_trajectory']['official_like']:.3f}"}]
    return out


# ------------------------------------------------------------------ IPGO

def run_ipgo(ctx: G.Context, deadline: G.Deadline) -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location("bench_ipgo", Path(__file__).with_name("ipgo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    wanted = {"preset": ctx.preset, "device": str(ctx.device), "quick": ctx.quick, "overrides": ctx.overrides,
              "budget_s": deadline.left()}
    params = inspect.signature(module.run).parameters
    result = module.run(**{k: v for k, v in wanted.items() if k in params})
    result.setdefault("rows", [])
    return {"source": "bench/ipgo.py", **result}
