"""Trajectories → padded tensors: the one batch layout every objective's teacher-forced pass reads."""
from __future__ import annotations

import torch

from common.trajectory import Trajectory


def collate(trajs: list[Trajectory], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-pad prompts, right-pad responses: the layout `common.decoding` expects.

    prompt_ids, prompt_mask (B, P); response_ids, response_mask, ref_logprobs (B, T); log_reward (B,)."""
    B = len(trajs)
    P = max(len(t.prompt_ids) for t in trajs)
    T = max(len(t.response_ids) for t in trajs)
    prompt_ids = torch.full((B, P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((B, P), dtype=torch.long)
    response_ids = torch.full((B, T), pad_id, dtype=torch.long)
    response_mask = torch.zeros((B, T), dtype=torch.long)
    ref = torch.zeros((B, T), dtype=torch.float32)
    for i, t in enumerate(trajs):
        p, n = len(t.prompt_ids), len(t.response_ids)
        prompt_ids[i, P - p:] = torch.tensor(t.prompt_ids)
        prompt_mask[i, P - p:] = 1
        response_ids[i, :n] = torch.tensor(t.response_ids)
        response_mask[i, :n] = 1
        ref[i, :n] = torch.tensor(t.ref_logprobs)
    log_reward = torch.tensor([t.log_reward for t in trajs], dtype=torch.float32)
    out = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
               response_mask=response_mask, ref_logprobs=ref, log_reward=log_reward)
    return {k: v.to(device) for k, v in out.items()}
