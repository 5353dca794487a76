"""The paper's reward maths, shared by the reward workers (training) and `pag eval` (evaluation).

For a rewrite y of a plain prompt x, each rendered `k` times from the same per-index noise:

    aes_gain  = mean_i aes(img_i(y)) − mean_i aes(img_i(x))
    rel       = mean_i  w · min(0, max(0, clip(x, img_i(y))) − c)        (w = 20, c = 0.28)
    r         = aes_gain + rel,        log R = r / β

The relevance hinge is applied to each image *before* the mean, as the official code does
(gfn_trainer.py `get_logreward`, eval.py `get_results`): with per-image CLIP scores 0.25, 0.30 and
0.31 against c = 0.28 that is −0.2, where a hinge after the mean would give 0. Negative cosines
count as 0 (the `max(0, ·)`), so a rewrite cannot be penalised below −w·c per image.

"x" above is the *baseline text* (`reward.baseline`, `baseline_text`): on `sd14` the policy's input
"x Rephrase:\n", as the official code renders and judges against; `plain` (tiny, mini) the user's x.
"""
from __future__ import annotations

import torch

from common.formats import TEMPLATES
from scoring.style import text_relevance

#: the official defaults (gfn_trainer.py, eval.py: `threshold=0.28`, weight 20)
CLIP_THRESHOLD = 0.28
CLIP_WEIGHT = 20.0
#: the relevance penalties a rewrite's scores carry; a plain prompt's own are no part of any reward
PENALTIES = ("rel", "rel_text")


def baseline_text(cfg, plain: str) -> str:
    """The text the baseline images of a plain prompt x are rendered from, and that relevance is judged
    against (`reward.baseline`): the policy's input template around x (`model.input_format`; official:
    "x Rephrase:\n", what gfn_trainer.py and eval.py decode from the policy input and render) or x itself."""
    if cfg.reward.baseline == "plain":
        return plain
    return TEMPLATES[cfg.model.input_format].format(prompt=plain)


def relevance(clip_per_image: torch.Tensor, threshold: float = CLIP_THRESHOLD,
              weight: float = CLIP_WEIGHT) -> torch.Tensor:
    """Relevance penalty, hinged per image then averaged over the last dimension.

    `clip_per_image` (..., k): raw cosines between each image of a rewrite and the plain prompt's
    text embedding. Returns (...,): mean_i weight · min(0, max(0, clip_i) − threshold) ≤ 0.
    Differentiable (IPGO ascends it); the gradient is zero where an image is above the threshold.
    """
    hinged = weight * torch.clamp(clip_per_image.clamp(min=0) - threshold, max=0)
    return hinged.mean(-1)


def per_text_scores(scores: dict[str, torch.Tensor], n: int, k: int, reward_cfg) -> dict[str, torch.Tensor]:
    """n texts' scores from their images' (the reward workers' and `pag serve`'s): `scores[name]` holds n·k
    values, text j's k images in rows j·k … j·k + k − 1 (k = 1: scores of the texts themselves). Returns (n,)
    float64 per name, the mean over each text's images, plus the penalties: `rel` from the CLIP scores hinged
    per image before the mean (`relevance`), `rel_text` from the sentence cosine (`text_relevance`)."""
    per_image = {name: values.reshape(n, k).double() for name, values in scores.items()}
    means = {name: values.mean(1) for name, values in per_image.items()}
    if "clip" in per_image:
        means["rel"] = relevance(per_image["clip"], reward_cfg.clip_threshold, reward_cfg.clip_weight)
    if "text_cos" in means:
        means["rel_text"] = text_relevance(means["text_cos"], reward_cfg.text_threshold, reward_cfg.text_weight)
    return means


def paper_reward(aes: float, aes_plain: float, rel: float) -> dict[str, float]:
    """r = (aes − aes_plain) + rel, every component by name; `rel` from `relevance`."""
    aes_gain = aes - aes_plain
    return {"aes_gain": aes_gain, "rel": rel, "reward": aes_gain + rel}


def reward_parts(mine: dict[str, float], plain: dict[str, float]) -> dict[str, float]:
    """r = Σ gains + Σ relevance penalties, over the scores present, every component by name.

    Paper (aesthetic + clip): exactly `paper_reward` — aes_gain = aes − aes_plain, plus `rel`.
    Offline text reward (style + relevance_text, scoring/style.py): style_gain = style − style_plain,
    plus `rel_text`. Both may be combined; a missing plain score for a present gain raises KeyError.
    """
    out: dict[str, float] = {}
    reward = 0.0
    for score, gain in (("aes", "aes_gain"), ("style", "style_gain")):
        if score in mine:
            out[gain] = mine[score] - plain[score]
            reward += out[gain]
    for penalty in PENALTIES:
        if penalty in mine:
            out[penalty] = mine[penalty]
            reward += mine[penalty]
    out["reward"] = reward
    return out
