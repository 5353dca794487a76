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

from typing import Optional

import torch
from torch import Tensor, nn

from common.constants import REPHRASE_TEMPLATE
from common.trajectory import Trajectory


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions of real tokens counted from 0 (padding gets 0; it is never attended)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _check_layout(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Optional[Tensor] = None,
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
             response_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One pass over [x; y] → (state hidden (B, T, H), logits at those states (B, T, V), all hidden (B, P+T, H))."""
    _check_layout(prompt_ids, prompt_mask, response_ids, response_mask)
    P, T = prompt_ids.shape[1], response_ids.shape[1]
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, P+T)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask), use_cache=False,
    ).last_hidden_state  # (B, P+T, H)
    states = hidden[:, P - 1 : P - 1 + T]  # (B, T, H): s_t ends at column P-1+t
    logits = model.get_output_embeddings()(states)  # (B, T, V), only where log P_F is needed
    return states, logits, hidden


def _token_logprobs(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """log softmax(logits)[ids] (B, T), 0 at padding, as logit − logsumexp.

    Same value as gathering from a full log-softmax, but autograd keeps no extra (B, T, V)
    tensor (log_softmax would save its output); at B·T·V = 64·75·50257 that is about 1 GB.
    """
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, T)
    return torch.where(mask.bool(), picked, torch.zeros_like(picked))


@torch.no_grad()
def _entropy(logits: Tensor, mask: Tensor) -> Tensor:
    """Entropy of softmax(logits) per step (B, T), 0 at padding; a metric, so no graph is kept."""
    log_probs = torch.log_softmax(logits, dim=-1)
    plogp = torch.where(torch.isfinite(log_probs), log_probs.exp() * log_probs, torch.zeros_like(log_probs))
    return torch.where(mask.bool(), -plogp.sum(-1), torch.zeros_like(plogp[..., 0]))


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
) -> dict[str, Tensor]:
    """Everything the objectives need from the policy, from ONE forward pass over [x; y].

    Returns
      log_pf         (B, T)    log P_F(y_{t+1} | s_t), normalised over the whole vocabulary (float32,
                               EOS rule applied), 0 at padding; −inf if y has EOS where it is forbidden
      state_hidden   (B, T, H) final-layer hidden state of each state s_t (feeds the flow head)
      prompt_hidden  (B, H)    mean of the final-layer hidden states over the real prompt tokens
      entropy        (B, T)    entropy of P_F(· | s_t), 0 at padding, detached (a collapse metric)
    Hidden states keep their graph; `FlowHead` detaches them itself.
    """
    states, logits, hidden = _forward(model, prompt_ids, prompt_mask, response_ids, response_mask)
    logits = logits.float()
    T, V = logits.shape[1:]
    n_forbid = min(eos_forbidden_steps(forbid_eos_first, min_len), T)
    if n_forbid:
        forbid = torch.zeros(T, V, dtype=torch.bool, device=logits.device)  # (T, V), broadcast over B
        forbid[:n_forbid, eos_id] = True
        logits = logits.masked_fill(forbid, float("-inf"))

    P = prompt_ids.shape[1]
    pm = prompt_mask.to(hidden.dtype).unsqueeze(-1)  # (B, P, 1)
    prompt_hidden = (hidden[:, :P] * pm).sum(1) / pm.sum(1)  # (B, H)
    return {
        "log_pf": _token_logprobs(logits, response_ids, response_mask),
        "state_hidden": states,
        "prompt_hidden": prompt_hidden,
        "entropy": _entropy(logits, response_mask),
    }


@torch.no_grad()
def ref_logprobs(
    ref_model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor
) -> Tensor:
    """Raw per-token reference log-probs log p_ref(y_{t+1} | s_t) (B, T), 0 at padding, in one pass.

    The reference is the plain frozen model (no EOS rule): p_ref(y | x) is its own probability of y.
    Divide by γ (and τ) with `learner.losses.temper`, not here — trajectories store the raw values.
    """
    _, logits, _ = _forward(ref_model, prompt_ids, prompt_mask, response_ids, response_mask)
    return _token_logprobs(logits.float(), response_ids, response_mask)


def _next_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                 past) -> tuple[Tensor, object]:
    """Run new tokens through the trunk with a KV cache; logits of the last position only (B, V)."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=past, use_cache=True)
    return model.get_output_embeddings()(out.last_hidden_state[:, -1]), out.past_key_values


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
    _check_layout(prompt_ids, prompt_mask)
    if not 0 <= min_len < max_len:
        raise ValueError(f"need 0 <= min_len ({min_len}) < max_len ({max_len})")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    B, device = prompt_ids.shape[0], prompt_ids.device
    attention_mask = prompt_mask.long()
    positions = position_ids_from_mask(attention_mask)
    next_logits, past = _next_logits(model, prompt_ids, attention_mask, positions, None)  # (B, V)
    next_position = positions[:, -1:] + 1  # (B, 1)
    n_forbid = eos_forbidden_steps(True, min_len)

    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, valid = [], []
    for t in range(max_len):
        logits = next_logits.float() / temperature
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
        next_logits, past = _next_logits(model, token[:, None], attention_mask, next_position, past)
        next_position = next_position + 1
    return torch.stack(tokens, dim=1), torch.stack(valid, dim=1).long()


# ------------------------------------------------------------------ text in, trajectories out

def encode_prompts(tokenizer, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy inputs `"{prompt} Rephrase:\\n"`, LEFT-padded: (B, P) ids and mask."""
    texts = [REPHRASE_TEMPLATE.format(prompt=p) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def to_trajectories(tokenizer, prompts: list[str], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                    response_ids: torch.Tensor, response_mask: torch.Tensor, ref: Optional[torch.Tensor] = None,
                    policy_version: int = 0, run: str = "") -> list[Trajectory]:
    """Padded sampling output → one unscored Trajectory per row (EOS kept in the ids, not in the text)."""
    eos = tokenizer.eos_token_id
    trajs = []
    for i, plain in enumerate(prompts):
        n = int(response_mask[i].sum())
        ids = response_ids[i, :n].tolist()
        text_ids = ids[:-1] if ids and ids[-1] == eos else ids
        trajs.append(Trajectory(
            prompt=plain,
            response=tokenizer.decode(text_ids, skip_special_tokens=True).strip(),
            prompt_ids=prompt_ids[i][prompt_mask[i].bool()].tolist(),
            response_ids=ids,
            ref_logprobs=ref[i, :n].tolist() if ref is not None else [0.0] * n,
            policy_version=policy_version,
            run=run,
        ))
    return trajs


def __getattr__(name: str):
    """`common.decoding.diverse_beam_search` lives in common/beam_search.py (which imports this module)."""
    if name == "diverse_beam_search":
        from common.beam_search import diverse_beam_search
        return diverse_beam_search
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
