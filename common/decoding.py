"""The policy's decoding, shared by sampler, learner, report and eval: prompts in, teacher-forced
log P_F and state hidden states, sampling, reference log-probs, trajectories out.

Layout. Prompts are LEFT-padded (B, P) so every prompt ends at column P−1; responses are
RIGHT-padded (B, T). Their concatenation [x; y] has holes on the left only, so position ids come
from the attention mask (cumsum − 1): each real token gets the position it would have unpadded.

State s_t = (x, y_≤t) ends at column P−1+t, so the hidden state that predicts y_{t+1} — the one
log P_F(y_{t+1} | s_t) and log F̃(s_t) are read from — is hidden[:, P−1+t], t = 0..T−1.

EOS rule (shared by `sample` and `teacher_forced`, so log P_F is the probability of what the
sampler can actually do): EOS is forbidden at steps t < max(1, min_len) — never as the first
token, and at least `min_len` tokens precede it.

Works with any Hugging Face causal LM whose `base_model` returns `last_hidden_state` and whose
output embeddings map it to logits (GPT-2: `transformer` and `lm_head`).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Optional

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from common.formats import PolicyFormat
from common.trajectory import Trajectory


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions of real tokens counted from 0 (padding gets 0; it is never attended)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def check_layout(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Optional[Tensor] = None,
                  response_mask: Optional[Tensor] = None) -> None:
    if prompt_ids.dim() != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask {tuple(prompt_mask.shape)} must both be (B, P)"
        )
    if not bool(prompt_mask[:, -1].bool().all()):
        raise ValueError("prompts must be LEFT-padded: prompt_mask[:, -1] must be 1 for every row")
    if response_ids is None:
        return
    if response_ids.dim() != 2 or response_mask is None or response_mask.shape != response_ids.shape:
        raise ValueError(f"response_ids {tuple(response_ids.shape)} and response_mask must both be (B, T)")
    if response_ids.shape[0] != prompt_ids.shape[0]:
        raise ValueError(f"prompt batch {prompt_ids.shape[0]} != response batch {response_ids.shape[0]}")
    lengths = response_mask.long().sum(-1, keepdim=True)
    steps = torch.arange(response_ids.shape[1], device=response_ids.device)
    if not torch.equal(response_mask.bool(), steps < lengths):
        raise ValueError("responses must be RIGHT-padded: response_mask is 1 for steps 0..len-1, then 0")


def eos_forbidden_steps(forbid_eos_first: bool = True, min_len: int = 0) -> int:
    """EOS is forbidden at steps t < this number."""
    return max(1 if forbid_eos_first else 0, min_len)


def _forward(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
             response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """One pass of the trunk over [x; y] → (state hidden (B, T, H), all hidden (B, P+T, H)); no logits yet."""
    check_layout(prompt_ids, prompt_mask, response_ids, response_mask)
    P, T = prompt_ids.shape[1], response_ids.shape[1]
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, P+T)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask), use_cache=False,
    ).last_hidden_state  # (B, P+T, H)
    states = hidden[:, P - 1 : P - 1 + T]  # (B, T, H): s_t ends at column P-1+t
    return states, hidden


def _head_chunk(head: nn.Module, states: Tensor, ids: Tensor, forbid_eos: Tensor, eos_id: int,
                with_entropy: bool) -> tuple[Tensor, Tensor]:
    """log softmax(head(states))[ids] and the entropy for N flattened states (N, H) → (N,), (N,).

    `forbid_eos` (N,) marks the states where EOS is not allowed (its logit becomes −inf). Written as
    (logit − m) − log Σ exp(logit − m), m the row's largest logit, so autograd keeps no (N, V) log-softmax and
    the entropy, a detached metric, reuses those exponentials instead of a softmax of its own (1.25× on the
    logging step, bench/gpu.py part `learner`).
    """
    logits = head(states).float()  # (N, V)
    if bool(forbid_eos.any()):
        logits[:, eos_id] = logits[:, eos_id].masked_fill(forbid_eos, float("-inf"))
    # H = log s − Σ e·(logit − m) / s with e = exp(logit − m), s = Σ e
    shifted = logits - logits.detach().amax(-1, keepdim=True)  # m: the row's largest logit
    e = shifted.exp()
    s = e.sum(-1)
    picked = shifted.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - s.log()
    if not with_entropy:
        return picked, torch.zeros_like(s).detach()
    with torch.no_grad():
        entropy = s.log() - (e * shifted.clamp_min(torch.finfo(shifted.dtype).min)).sum(-1) / s
    return picked, entropy


def _chunked_head(head: nn.Module, states: Tensor, ids: Tensor, mask: Tensor, n_forbid: int, eos_id: int,
                  chunk_tokens: int, with_entropy: bool, recompute: bool = False) -> tuple[Tensor, Tensor]:
    """(log P_F (B, T), entropy (B, T)), both 0 at padding, `chunk_tokens` real tokens at a time.

    Only real (unpadded) steps reach the vocabulary head, and never as one (B, T, V) tensor: at
    64 × 75 × 50,257 float32 one copy is 0.97 GB and the one-shot version made several per step; small
    chunks stay below the allocator's mmap threshold, so their memory is reused instead of being
    page-faulted in afresh (2.4× faster on CPU, bench/gpu.py part `learner`). With `recompute`, each
    chunk's logits are recomputed in the backward pass (activation checkpointing) instead of kept:
    one extra head matmul for ~1 GB less at that size.
    """
    B, T = ids.shape
    keep = mask.bool()
    forbid = (torch.arange(T, device=states.device) < n_forbid).expand(B, T)[keep]  # (N,)
    flat_states, flat_ids = states[keep], ids[keep]  # (N, H), (N,)
    need_grad = recompute and torch.is_grad_enabled() and states.requires_grad
    step = max(1, chunk_tokens)
    pieces, ents = [], []
    for n0 in range(0, flat_ids.shape[0], step):
        args = (head, flat_states[n0:n0 + step], flat_ids[n0:n0 + step], forbid[n0:n0 + step], eos_id, with_entropy)
        if need_grad:
            picked, ent = torch.utils.checkpoint.checkpoint(_head_chunk, *args, use_reentrant=False)
        else:
            picked, ent = _head_chunk(*args)
        pieces.append(picked)
        ents.append(ent)
    log_pf = states.new_zeros(B, T, dtype=torch.float32)
    entropy = torch.zeros(B, T, dtype=torch.float32, device=states.device)
    if pieces:
        log_pf = log_pf.masked_scatter(keep, torch.cat(pieces))
        entropy = entropy.masked_scatter(keep, torch.cat(ents).detach())
    return log_pf, entropy


def teacher_forced(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    eos_id: int,
    forbid_eos_first: bool = True,
    *,
    min_len: int = 0,
    with_entropy: bool = True,
    chunk_tokens: int = 64,
    recompute: bool = False,
) -> dict[str, Tensor]:
    """Everything the objectives need from the policy, from ONE forward pass over [x; y].

    The vocabulary head runs over `chunk_tokens` real tokens at a time (see `_chunked_head`); `with_entropy=False`
    skips the entropy metric (zeros), which costs a full softmax;
    `recompute=True` trades one extra head matmul for not keeping the logits for backward.

    Returns
      log_pf         (B, T)    log P_F(y_{t+1} | s_t), normalised over the whole vocabulary (float32,
                               EOS rule applied), 0 at padding; −inf if y has EOS where it is forbidden
      state_hidden   (B, T, H) final-layer hidden state of each state s_t (feeds the flow head)
      prompt_hidden  (B, H)    mean of the final-layer hidden states over the real prompt tokens (flow head `film`)
      prompt_sum     (B, H)    their sum over the real prompt tokens but the last, the official flow head's
                               prompt input (gfn_trainer.py:300: `state[:, :-1]`; the prompt is left-padded)
      entropy        (B, T)    entropy of P_F(· | s_t), 0 at padding, detached (a collapse metric)
    Hidden states keep their graph; `FlowHead` detaches them itself.
    """
    states, hidden = _forward(model, prompt_ids, prompt_mask, response_ids, response_mask)
    T = states.shape[1]
    n_forbid = min(eos_forbidden_steps(forbid_eos_first, min_len), T)
    log_pf, entropy = _chunked_head(model.get_output_embeddings(), states, response_ids, response_mask, n_forbid,
                                    eos_id, chunk_tokens, with_entropy, recompute)

    pooled = pool_prompt(hidden[:, :prompt_ids.shape[1]], prompt_mask)
    return {"log_pf": log_pf, "state_hidden": states, **pooled, "entropy": entropy}


def pool_prompt(hidden: Tensor, prompt_mask: Tensor) -> dict[str, Tensor]:
    """The flow heads' prompt inputs from the final hidden states of a LEFT-padded prompt (B, P, H):
    `prompt_hidden`, the mean over its real tokens (`film`), and `prompt_sum`, their sum but the last token's
    (`official`, gfn_trainer.py:300: `state[:, :-1]`; column P-1 is the last token)."""
    pm = prompt_mask.to(hidden.dtype).unsqueeze(-1)  # (B, P, 1)
    return {"prompt_hidden": (hidden * pm).sum(1) / pm.sum(1), "prompt_sum": (hidden[:, :-1] * pm[:, :-1]).sum(1)}


@torch.no_grad()
def ref_logprobs(
    ref_model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor
) -> Tensor:
    """Raw per-token reference log-probs log p_ref(y_{t+1} | s_t) (B, T), 0 at padding, in one pass.

    The reference is the plain frozen model (no EOS rule): p_ref(y | x) is its own probability of y.
    Divide by γ (and τ) with `learner.losses.temper`, not here — trajectories store the raw values.
    """
    states, _ = _forward(ref_model, prompt_ids, prompt_mask, response_ids, response_mask)
    log_p, _ = _chunked_head(ref_model.get_output_embeddings(), states, response_ids, response_mask, 0, 0,
                             chunk_tokens=64, with_entropy=False)
    return log_p


@functools.lru_cache(maxsize=None)
def _cache_argument(trunk: type) -> str:
    """The trunk's keyword for its KV cache: `cache` since transformers renamed it (where the old
    `past_key_values` raises a FutureWarning), `past_key_values` in the versions before."""
    return "cache" if "cache" in inspect.signature(trunk.forward).parameters else "past_key_values"


def trunk_step(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
               cache: Optional[Any]) -> tuple[Tensor, Any]:
    """Run new tokens (B, n) through the trunk on top of `cache` (None: start one; the trunk makes a
    transformers `DynamicCache`) → (final-layer hidden states (B, n, H), the grown cache)."""
    name = _cache_argument(type(model.base_model))
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=True, **{name: cache})
    return out.last_hidden_state, getattr(out, name)


def next_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                cache: Optional[Any]) -> tuple[Tensor, Any]:
    """Run new tokens through the trunk with a KV cache; logits of the last position only (B, V)."""
    hidden, cache = trunk_step(model, input_ids, attention_mask, position_ids, cache)
    return model.get_output_embeddings()(hidden[:, -1]), cache


@torch.no_grad()
def sample(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    max_len: int,
    min_len: int,
    temperature: float,
    eos_id: int,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """Ancestral sampling with a KV cache → (response_ids (B, T), response_mask (B, T)), T ≤ max_len.

    Logits are divided by `temperature`; EOS is forbidden at steps t < max(1, min_len). A row stops
    after its EOS (which is included, mask 1); rows that never emit EOS stop at max_len. Padding
    after the end holds `eos_id` with mask 0. `generator` makes the draw reproducible.
    """
    check_layout(prompt_ids, prompt_mask)
    if not 0 <= min_len < max_len:
        raise ValueError(f"need 0 <= min_len ({min_len}) < max_len ({max_len})")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    B, device = prompt_ids.shape[0], prompt_ids.device
    attention_mask = prompt_mask.long()
    positions = position_ids_from_mask(attention_mask)
    step_logits, past = next_logits(model, prompt_ids, attention_mask, positions, None)  # (B, V)
    next_position = positions[:, -1:] + 1  # (B, 1)
    n_forbid = eos_forbidden_steps(True, min_len)

    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, valid = [], []
    for t in range(max_len):
        logits = step_logits.float() / temperature
        if t < n_forbid:
            logits[:, eos_id] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
        token = torch.where(done, torch.full_like(token, eos_id), token)
        tokens.append(token)
        valid.append(~done)
        done = done | (token == eos_id)
        if bool(done.all()) or t == max_len - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        step_logits, past = next_logits(model, token[:, None], attention_mask, next_position, past)
        next_position = next_position + 1
    return torch.stack(tokens, dim=1), torch.stack(valid, dim=1).long()


# ------------------------------------------------------------------ text in, trajectories out

def encode_prompts(tokenizer, prompts: list[str], device: torch.device,
                   fmt: PolicyFormat = PolicyFormat()) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy inputs (`fmt.policy_input`, by default `"{prompt} Rephrase:\\n"`), LEFT-padded: (B, P) ids and mask."""
    texts = [fmt.policy_input(p) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def to_trajectories(tokenizer, prompts: list[str], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                    response_ids: torch.Tensor, response_mask: torch.Tensor, ref: Optional[torch.Tensor] = None,
                    policy_version: int = 0, run: str = "", fmt: PolicyFormat = PolicyFormat()) -> list[Trajectory]:
    """Padded sampling output → one unscored Trajectory per row (EOS kept in the ids, not in the text).

    `response` is the rewrite text (`fmt.rewrite`: in suffix mode the prompt's stem, ", " and the
    continuation); `prompt_ids`/`response_ids` are exactly what the policy read and wrote."""
    eos = tokenizer.eos_token_id
    trajs = []
    for i, plain in enumerate(prompts):
        n = int(response_mask[i].sum())
        ids = response_ids[i, :n].tolist()
        text_ids = ids[:-1] if ids and ids[-1] == eos else ids
        trajs.append(Trajectory(
            prompt=plain,
            response=fmt.rewrite(plain, tokenizer.decode(text_ids, skip_special_tokens=True)),
            prompt_ids=prompt_ids[i][prompt_mask[i].bool()].tolist(),
            response_ids=ids,
            ref_logprobs=ref[i, :n].tolist() if ref is not None else [0.0] * n,
            policy_version=policy_version,
            run=run,
        ))
    return trajs
