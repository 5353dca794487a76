"""Parts `learner` and `sampler` of bench/gpu.py: the policy's two hot loops.

learner: one FL-DB micro-batch (B × T = 64 × 75 in `sd14-arch`) through `BalanceObjective.loss_on` — one
teacher-forced pass over [x; y] — against a token-by-token loop written the way the official code's
`get_logpf_and_logf` works (prompt through the model with a KV cache, then one response token per
forward, a log-softmax and the flow head per step), both followed by backward and the optimiser step.
Our loop passes position ids from the attention mask so it computes the same function; the two must
agree to 1e-5 in float32. Then the teacher-forced step under bf16 autocast.

sampler: B rewrites of up to T tokens with `common.decoding.sample` (KV cache) against the same
ancestral sampling that re-runs the whole prefix every token (bench/decoding.py's `run` replaces this
part once it is on main).
"""
from __future__ import annotations

import importlib.util
import inspect
import random
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

import gpu_common as G


def _trajectories(B: int, T: int, min_len: int, vocab: int, eos: int, seed: int = 0) -> list:
    """B synthetic trajectories: prompts of 8–20 tokens, responses of max(min_len+1, T−20)..T tokens ending in EOS."""
    from common.trajectory import Trajectory

    rng = random.Random(seed)
    out = []
    for i in range(B):
        n = rng.randint(min(T, max(min_len + 1, T - 20)), T)
        body = [rng.randrange(vocab - 1) for _ in range(n - 1)]
        body = [tok if tok != eos else eos - 1 for tok in body]
        out.append(Trajectory(prompt=f"prompt {i}", response=f"response {i}",
                              prompt_ids=[rng.randrange(vocab - 1) for _ in range(rng.randint(8, 20))],
                              response_ids=body + [eos], ref_logprobs=[-rng.random() * 6 for _ in range(n)],
                              log_reward=rng.gauss(0.0, 5.0)))
    return out


def token_loop_loss(learner, trajs: list, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, log_pf (B, T)) computed one response token per forward, like the official trainer."""
    from common.decoding import eos_forbidden_steps, pool_prompt, position_ids_from_mask, trunk_step
    from learner.batch import collate
    from learner.losses import gflownet_loss, temper

    cfg, policy = learner.cfg, learner.policy
    b = collate(trajs, learner.tokenizer.pad_token_id, learner.device)
    prompt_ids, prompt_mask, response_ids, response_mask = b["prompt_ids"], b["prompt_mask"], b["response_ids"], b["response_mask"]
    T = response_ids.shape[1]
    mask = prompt_mask.long()
    positions = position_ids_from_mask(mask)
    head, past = trunk_step(policy, prompt_ids[:, :-1], mask[:, :-1], positions[:, :-1], None)
    prompt_states = [head]
    token, position, eos = prompt_ids[:, -1:], positions[:, -1:], learner.tokenizer.eos_token_id
    n_forbid = eos_forbidden_steps(True, cfg.sampler.min_len)
    log_pfs, states = [], []
    for t in range(T):
        hidden, past = trunk_step(policy, token, mask, position, past)
        h = hidden[:, -1]  # (B, H): state s_t
        if t == 0:
            prompt_states.append(hidden)
        logits = policy.get_output_embeddings()(h).float()  # (B, V)
        if t < n_forbid:
            logits[:, eos] = float("-inf")
        log_pfs.append(logits.log_softmax(-1).gather(-1, response_ids[:, t:t + 1]).squeeze(-1))
        states.append(h)
        token, position = response_ids[:, t:t + 1], position + 1
        mask = torch.cat([mask, response_mask[:, t:t + 1].long()], dim=1)
    log_pf = torch.where(response_mask.bool(), torch.stack(log_pfs, 1), torch.zeros_like(response_mask, dtype=torch.float32))
    pooled = pool_prompt(torch.cat(prompt_states, 1), prompt_mask)  # from the prompt's states (B, P, H)
    log_flow = learner.flow(torch.stack(states, 1), pooled[learner.flow.prompt_input])
    ref, terminal = temper(b["ref_logprobs"], b["log_reward"], response_mask, gamma=learner.schedules.reference_temperature(step),
                           tau=learner.schedules.reward_temperature(step), min_len=cfg.sampler.min_len,
                           len_penalty=cfg.learner.min_len_penalty)
    return gflownet_loss(cfg.learner.objective, log_pf, log_flow, ref, terminal, response_mask), log_pf


def teacher_forced_log_pf(learner, trajs: list) -> torch.Tensor:
    from common.decoding import teacher_forced
    from learner.batch import collate

    b = collate(trajs, learner.tokenizer.pad_token_id, learner.device)
    return teacher_forced(learner.policy, b["prompt_ids"], b["prompt_mask"], b["response_ids"], b["response_mask"],
                          learner.tokenizer.eos_token_id, min_len=learner.cfg.sampler.min_len)["log_pf"]


def _step(learner, loss_fn) -> float:
    learner.optimizer.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(learner.policy.parameters()) + list(learner.flow.parameters()), 1.0)
    learner.optimizer.step()
    return float(loss.detach())


def _measure(learner, loss_fn, device, deadline: G.Deadline, reps: int) -> dict[str, Any]:
    _step(learner, loss_fn)  # warm-up (allocator, kernels, Adam state)
    G.reset_peak(device)
    times = G.repeat(lambda: _step(learner, loss_fn), device, deadline, 1, reps)
    return {"s_per_step": times, "median_s": statistics.median(times), **G.peak_memory(device)}


def run_learner(ctx: G.Context, deadline: G.Deadline) -> dict[str, Any]:
    from learner.learner import Learner

    cfg = ctx.cfg(["learner.grad_accum=1"])
    B, T = (8, 24) if ctx.quick else (64, 75)  # the micro-batch, whatever the preset's sampler.max_len
    with tempfile.TemporaryDirectory(prefix="pag-gpu-learner-") as tmp:
        learner = Learner(cfg, None, tmp, device=str(ctx.device), resume=False)
        eos = learner.tokenizer.eos_token_id
        trajs = _trajectories(B, T, min(cfg.sampler.min_len, T - 2), len(learner.tokenizer), eos)
        learner.cfg.sampler.min_len = min(cfg.sampler.min_len, T - 2)
        tokens = sum(len(t.response_ids) for t in trajs)
        with torch.no_grad():  # the same function, computed both ways, before any update
            ours_loss, _ = learner.objective.loss_on(trajs)
            ours_pf = teacher_forced_log_pf(learner, trajs)
            loop_loss, loop_pf = token_loop_loss(learner, trajs)
        agree = {"max_abs_log_pf_diff": float((ours_pf - loop_pf).abs().max()),
                 "loss_rel_diff": float(abs(ours_loss - loop_loss) / abs(loop_loss))}
        agree["equal_to_1e-5"] = agree["max_abs_log_pf_diff"] <= 1e-5 and agree["loss_rel_diff"] <= 1e-5
        reps = 2 if ctx.quick else 5
        ours = _measure(learner, lambda: learner.objective.loss_on(trajs, diagnostics=False)[0], ctx.device,
                        deadline, reps)  # most steps: the entropy metric only on logging steps
        logged = _measure(learner, lambda: learner.objective.loss_on(trajs)[0], ctx.device, deadline, reps)
        loop = _measure(learner, lambda: token_loop_loss(learner, trajs)[0], ctx.device, deadline, max(1, reps - 2))
        amp_dtype = torch.bfloat16
        with torch.no_grad(), torch.autocast(ctx.device.type, dtype=amp_dtype):
            amp_pf = teacher_forced_log_pf(learner, trajs)
        with torch.no_grad():
            fp32_pf = teacher_forced_log_pf(learner, trajs)

        def amp_loss():
            with torch.autocast(ctx.device.type, dtype=amp_dtype):
                return learner.objective.loss_on(trajs, diagnostics=False)[0]

        amp = _measure(learner, amp_loss, ctx.device, deadline, reps)
    mask = torch.tensor([[1] * len(t.response_ids) + [0] * (T - len(t.response_ids)) for t in trajs], device=fp32_pf.device).bool()
    amp["max_abs_log_pf_diff_vs_fp32"] = float(((amp_pf.float() - fp32_pf).abs() * mask[:, :fp32_pf.shape[1]]).max())
    speedup = loop["median_s"] / ours["median_s"]
    out = {"batch": B, "max_len": T, "response_tokens": tokens, "policy_parameters": sum(p.numel() for p in learner.policy.parameters()),
           "agreement": agree, "teacher_forced": ours, "token_loop": loop, "teacher_forced_bf16_autocast": amp,
           "teacher_forced_logging_step": logged,
           "tokens_per_s": {"teacher_forced": tokens / ours["median_s"], "token_loop": tokens / loop["median_s"],
                            "teacher_forced_bf16": tokens / amp["median_s"],
                            "teacher_forced_logging_step": tokens / logged["median_s"]},
           "speedup": speedup, "bf16_speedup": ours["median_s"] / amp["median_s"]}
    out["rows"] = [
        {"measure": f"FL-DB step tokens/s, one teacher-forced pass vs token-by-token loop ({B}×{T})",
         "value": out["tokens_per_s"]["teacher_forced"], "baseline": out["tokens_per_s"]["token_loop"], "ratio": speedup,
         "note": f"target ≥ 5×; equal to 1e-5: {agree['equal_to_1e-5']} (log P_F Δ {agree['max_abs_log_pf_diff']:.1e}); "
                 f"peak {ours['peak_gib']} vs {loop['peak_gib']} GiB"},
        {"measure": "FL-DB logging step tokens/s (+ the entropy metric) vs token-by-token loop",
         "value": out["tokens_per_s"]["teacher_forced_logging_step"], "baseline": out["tokens_per_s"]["token_loop"],
         "ratio": loop["median_s"] / logged["median_s"], "note": "one step in run.log_every"},
        {"measure": "FL-DB step tokens/s, bf16 autocast vs fp32 (teacher-forced)", "value": out["tokens_per_s"]["teacher_forced_bf16"],
         "baseline": out["tokens_per_s"]["teacher_forced"], "ratio": out["bf16_speedup"],
         "note": f"log P_F Δ vs fp32 {amp['max_abs_log_pf_diff_vs_fp32']:.2g}; peak {amp['peak_gib']} GiB"},
    ]
    return out


@torch.no_grad()
def sample_without_cache(model, prompt_ids, prompt_mask, max_len, min_len, temperature, eos_id, generator):
    """The same ancestral sampling as common.decoding.sample, re-running the whole prefix every token."""
    from common.decoding import eos_forbidden_steps, position_ids_from_mask

    ids, mask = prompt_ids, prompt_mask.long()
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    tokens, n_forbid = [], eos_forbidden_steps(True, min_len)
    for t in range(max_len):
        hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                  use_cache=False).last_hidden_state[:, -1]
        logits = model.get_output_embeddings()(hidden).float() / temperature
        if t < n_forbid:
            logits[:, eos_id] = float("-inf")
        token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
        token = torch.where(done, torch.full_like(token, eos_id), token)
        tokens.append(token)
        done = done | (token == eos_id)
        if bool(done.all()):
            break
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(tokens, 1)


def run_sampler(ctx: G.Context, deadline: G.Deadline) -> dict[str, Any]:
    path = Path(__file__).with_name("decoding.py")
    if path.is_file():  # the decoding engineer's benchmark, once on main
        spec = importlib.util.spec_from_file_location("bench_decoding", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if hasattr(module, "run"):
            wanted = {"preset": ctx.preset, "device": str(ctx.device), "quick": ctx.quick, "overrides": ctx.overrides}
            params = inspect.signature(module.run).parameters
            return {"source": "bench/decoding.py", **module.run(**{k: v for k, v in wanted.items() if k in params})}
    from common.decoding import encode_prompts, sample
    from common.models import build_policy, build_tokenizer

    cfg = ctx.cfg()
    tok = build_tokenizer(cfg.model)
    policy = build_policy(cfg.model, tok).to(ctx.device).eval()
    B, T = (16, 16) if ctx.quick else (64, 75)
    prompts = [f"a photo of a cat number {i} on a sofa" for i in range(B // 4) for _ in range(4)]
    ids, mask = encode_prompts(tok, prompts, ctx.device)
    eos = tok.eos_token_id

    def cached(seed: int = 0):
        gen = torch.Generator(ctx.device).manual_seed(seed)
        return sample(policy, ids, mask, T, T - 1, 1.0, eos, generator=gen)[0]

    def uncached(seed: int = 0):
        return sample_without_cache(policy, ids, mask, T, T - 1, 1.0, eos, torch.Generator(ctx.device).manual_seed(seed))

    cached()
    times = G.repeat(cached, ctx.device, deadline, 1, 3)
    with_cache = cached()
    n_tokens = with_cache.numel()
    out = {"source": "common.decoding.sample (bench/decoding.py not on main yet)", "batch": B, "max_len": T,
           "tokens": n_tokens, "kv_cache": {"s": times, "tokens_per_s": n_tokens / statistics.median(times)}}
    estimate = statistics.median(times) * (ids.shape[1] + T) / 2
    if deadline.allows(estimate * 1.5):
        wall, without = G.timed(uncached, ctx.device)
        out["no_cache"] = {"s": wall, "tokens_per_s": without.numel() / wall,
                           "same_tokens_fraction": float((without == with_cache).float().mean()) if without.shape == with_cache.shape else None}
        out["speedup"] = out["kv_cache"]["tokens_per_s"] / out["no_cache"]["tokens_per_s"]
    else:
        out["no_cache"] = {"skipped": f"budget (needs ~{estimate:.0f}s)"}
    out["rows"] = [{"measure": f"sampler tokens/s, {B} rewrites × {T} tokens, KV cache vs re-running the prefix",
                    "value": out["kv_cache"]["tokens_per_s"], "baseline": out["no_cache"].get("tokens_per_s"),
                    "ratio": out.get("speedup"), "note": "diverse beam search: bench/decoding.py (not on main yet)"}]
    return out
