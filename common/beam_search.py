"""Diverse (group) beam search on the policy's KV cache — the decoding of the paper's evaluation.

transformers 5 dropped group beam search from its core, so this re-implements the semantics of
transformers 4.x `_group_beam_search` + `BeamSearchScorer` + `HammingDiversityLogitsProcessor`
(Vijayakumar et al. 2016), step for step, so numbers stay comparable with the official PAG eval:

- N = G·k beams per prompt in G groups of k. At step 0 only the first beam of each group is live
  (the others start at −1e9), so a group's k beams start from k different tokens.
- Each step, group g scores token v of beam i as
      beam_score_i + log softmax(logits_i)[v] − λ · #{groups < g whose beam chose v at this step},
  the Hamming diversity penalty λ counting every earlier group's beam (a finished group's beams
  "choose" the pad token, EOS here, exactly as 4.x does). The penalised value is what accumulates
  into the beam score, as in 4.x; EOS is −inf before step max(1, min_new_tokens) (no empty rewrite,
  the sampler's rule).
- The 2k best candidates of the group are walked in order: EOS among the first k closes a hypothesis
  of the group (length counts the EOS), other tokens fill the k beams of the next step.
- A hypothesis' score is sum_logprobs / generated_len ** length_penalty (length_penalty < 0 favours
  short rewrites). A group keeps its k best hypotheses and is done when k are kept and the worst is
  ≥ best candidate / cur_len ** length_penalty (4.x's `early_stopping=False` heuristic). After
  max_new_tokens steps the open beams of unfinished groups join their group's hypotheses.
- Per prompt the G·k hypotheses of all groups are returned sorted by score, best first.

Deterministic: no sampling; ties resolve by `torch.topk` order.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from common.decoding import check_layout, next_logits, eos_forbidden_steps, position_ids_from_mask

_DEAD = -1e9  # 4.x's starting score for all but the first beam of a group


class _Hypotheses:
    """The k best finished hypotheses of one (prompt, group): transformers 4.x `BeamHypotheses`."""

    def __init__(self, size: int, length_penalty: float):
        self.size, self.length_penalty = size, length_penalty
        self.beams: list[tuple[float, list[int]]] = []
        self.worst = 1e9

    def add(self, tokens: list[int], sum_logprobs: float, generated_len: int) -> None:
        score = sum_logprobs / generated_len ** self.length_penalty
        if len(self.beams) < self.size or score > self.worst:
            self.beams.append((score, tokens))
            if len(self.beams) > self.size:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        if len(self.beams) < self.size:
            return False
        return self.worst >= best_sum_logprobs / cur_len ** self.length_penalty


def _check_args(num_groups: int, beams_per_group: int, min_new_tokens: int, max_new_tokens: int) -> None:
    if num_groups < 1 or beams_per_group < 1:
        raise ValueError(f"num_groups ({num_groups}) and beams_per_group ({beams_per_group}) must be >= 1")
    if not 0 <= min_new_tokens < max_new_tokens:
        raise ValueError(f"need 0 <= min_new_tokens ({min_new_tokens}) < max_new_tokens ({max_new_tokens})")


@torch.no_grad()
def diverse_beam_search(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    num_groups: int,
    beams_per_group: int,
    diversity_penalty: float,
    length_penalty: float,
    min_new_tokens: int,
    max_new_tokens: int,
    eos_id: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """G·k rewrites per LEFT-padded prompt → (ids (B, G·k, T), mask (B, G·k, T), scores (B, G·k)).

    Responses are RIGHT-padded with `eos_id` (mask 0); one that ended by EOS keeps it (mask 1), one
    that reached max_new_tokens has none. Scores are length-penalised (see the module docstring),
    sorted descending along dim 1.
    """
    check_layout(prompt_ids, prompt_mask)
    _check_args(num_groups, beams_per_group, min_new_tokens, max_new_tokens)
    B, G, k = prompt_ids.shape[0], num_groups, beams_per_group
    N, device = G * k, prompt_ids.device
    logits, past, attention_mask, next_position = _read_prompts(model, prompt_ids, prompt_mask, N)
    V = logits.shape[-1]
    if 2 * k > k * V:
        raise ValueError(f"beams_per_group {k} needs a vocabulary of at least 2 tokens, got {V}")

    scores = torch.full((B, N), _DEAD, dtype=torch.float64, device=device)
    scores[:, ::k] = 0.0
    seqs = torch.zeros(B * N, 0, dtype=torch.long, device=device)  # generated tokens of each beam
    hyps = [[_Hypotheses(k, length_penalty) for _ in range(G)] for _ in range(B)]
    done = [[False] * G for _ in range(B)]
    n_forbid = eos_forbidden_steps(True, min_new_tokens)
    batch_offset = (torch.arange(B, device=device) * N)[:, None]  # (B, 1)

    for t in range(max_new_tokens):
        logp = _step_logprobs(logits, B, N, eos_id if t < n_forbid else None)  # (B, N, V)
        current, source = _advance_groups(logp, scores, seqs.tolist(), hyps, done, t, k, diversity_penalty, eos_id)
        order = (batch_offset + source).view(-1)  # (B·N,)
        seqs = torch.cat([seqs[order], current.view(-1, 1)], dim=1)
        if all(all(row) for row in done) or t == max_new_tokens - 1:
            break
        past.reorder_cache(order)
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        logits, past = next_logits(model, current.view(-1, 1), attention_mask, next_position, past)
        next_position = next_position + 1

    _close_open_beams(hyps, done, seqs.tolist(), scores.tolist(), k)
    return _pack(hyps, eos_id, device)


def _read_prompts(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                  N: int) -> tuple[Tensor, Any, Tensor, Tensor]:
    """One pass over the prompts, then the cache shared by N beams each: row b·N + g·k + j is beam j
    of group g of prompt b → (logits (B·N, V), cache, attention mask (B·N, P), next position (B·N, 1))."""
    attention_mask = prompt_mask.long()
    positions = position_ids_from_mask(attention_mask)
    logits, past = next_logits(model, prompt_ids, attention_mask, positions, None)  # prompt once per row
    past.batch_repeat_interleave(N)
    next_position = positions[:, -1:].repeat_interleave(N, dim=0) + 1
    return logits.repeat_interleave(N, dim=0), past, attention_mask.repeat_interleave(N, dim=0), next_position


def _step_logprobs(logits: Tensor, B: int, N: int, forbid: Optional[int]) -> Tensor:
    """log softmax of each beam's next-token logits (B·N, V) → (B, N, V) float64; token `forbid`
    (EOS before min_new_tokens) gets −inf."""
    V = logits.shape[-1]
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    logp = logp.view(B, N, V).to(torch.float64)
    if forbid is not None:
        logp[..., forbid] = float("-inf")
    return logp


def _advance_groups(logp: Tensor, scores: Tensor, seq_rows: list[list[int]], hyps: list[list[_Hypotheses]],
                    done: list[list[bool]], t: int, k: int, diversity_penalty: float,
                    eos_id: int) -> tuple[Tensor, Tensor]:
    """Step t for every group in order, each penalised by the tokens of the groups before it →
    (token each beam chose (B, N), beam within the prompt it extends (B, N)). Updates `scores`
    (the new beam scores), `hyps` (hypotheses closed by EOS) and `done` in place."""
    B, N, V = logp.shape
    device = logp.device
    current = torch.zeros(B, N, dtype=torch.long, device=device)
    source = torch.zeros(B, N, dtype=torch.long, device=device)
    for g in range(N // k):
        lo, hi = g * k, (g + 1) * k
        step = logp[:, lo:hi]  # (B, k, V)
        if g and diversity_penalty:
            counts = torch.zeros(B, V, dtype=step.dtype, device=device)  # Hamming: earlier groups' choices
            counts.scatter_add_(1, current[:, :lo], torch.ones_like(current[:, :lo], dtype=step.dtype))
            step = step - diversity_penalty * counts[:, None]
        cand = (step + scores[:, lo:hi, None]).reshape(B, k * V)
        top, idx = cand.topk(2 * k, dim=1)  # sorted, best first
        top_l, beam_l, token_l = top.tolist(), (idx // V).tolist(), (idx % V).tolist()
        group_scores = torch.zeros(B, k, dtype=scores.dtype, device=device)
        for b in range(B):
            if done[b][g]:  # 4.x pads a finished group: score 0, pad (= EOS) token, first beam
                current[b, lo:hi], source[b, lo:hi] = eos_id, lo
                continue
            kept = _walk_candidates(top_l[b], beam_l[b], token_l[b], seq_rows[b * N + lo: b * N + hi],
                                    hyps[b][g], k, t, eos_id)
            for j, (value, token, beam) in enumerate(kept):
                group_scores[b, j], current[b, lo + j], source[b, lo + j] = value, token, lo + beam
            done[b][g] = hyps[b][g].is_done(top_l[b][0], t + 1)
        scores[:, lo:hi] = group_scores
    return current, source


def _walk_candidates(values: list[float], beams: list[int], tokens: list[int], prefixes: list[list[int]],
                     hyp: _Hypotheses, k: int, t: int, eos_id: int) -> list[tuple[float, int, int]]:
    """The 2k best candidates of one (prompt, group), best first: EOS among the first k closes a
    hypothesis (its length counts the EOS); the first k other tokens continue → [(score, token, beam)]."""
    kept: list[tuple[float, int, int]] = []
    for rank, (value, beam, token) in enumerate(zip(values, beams, tokens)):
        if token == eos_id:
            if rank < k:
                hyp.add(prefixes[beam] + [eos_id], value, t + 1)
        else:
            kept.append((value, token, beam))
        if len(kept) == k:
            break
    return kept


def _close_open_beams(hyps: list[list[_Hypotheses]], done: list[list[bool]], seq_rows: list[list[int]],
                      final: list[list[float]], k: int) -> None:
    """After the last step the open beams of every unfinished group join its hypotheses."""
    N = len(final[0])
    for b, per_prompt in enumerate(hyps):
        for g, hyp in enumerate(per_prompt):
            if not done[b][g]:
                for j in range(g * k, (g + 1) * k):
                    hyp.add(seq_rows[b * N + j], final[b][j], len(seq_rows[b * N + j]))


def _pack(hyps: list[list[_Hypotheses]], eos_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per prompt, all groups' hypotheses best first (4.x order: stable sort, popped from the end)."""
    ranked = [sorted((h for group in per_prompt for h in group.beams), key=lambda h: h[0])[::-1]
              for per_prompt in hyps]
    B, N = len(ranked), len(ranked[0])
    T = max(len(tokens) for per_prompt in ranked for _, tokens in per_prompt)
    ids = torch.full((B, N, T), eos_id, dtype=torch.long)
    mask = torch.zeros(B, N, T, dtype=torch.long)
    scores = torch.empty(B, N, dtype=torch.float32)
    for b, per_prompt in enumerate(ranked):
        for i, (score, tokens) in enumerate(per_prompt):
            ids[b, i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[b, i, : len(tokens)] = 1
            scores[b, i] = score
    return ids.to(device), mask.to(device), scores.to(device)
