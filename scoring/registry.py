"""The scorer registry: names → factories, the context factories share, and the errors a scorer
raises at set-up. Scorers register themselves here (`scoring/scorers.py` for images,
`scoring/text_scorers.py` for texts); `scoring.scorers.build_scorers` combines them.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from common.config import ModelConfig
from common.clip import ClipBundle, build_clip

ScoreFn = Callable[[torch.Tensor, Sequence[str]], dict[str, torch.Tensor]]


class UnknownScorerError(ValueError):
    """A scorer name that is not in the registry; the message lists the known ones."""


class ScorerUnavailableError(ImportError):
    """A registered scorer whose pip package is not installed; the message names the package."""


@dataclass
class ScorerContext:
    """What factories share: the model config, the device, and lazily built common models."""

    model: ModelConfig
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    differentiable: bool = False
    _clip: Optional[ClipBundle] = None
    _last: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    _sentence: Optional[object] = None

    def sentence_encoder(self):
        """The configured sentence encoder (`model.sentence_encoder`), built once and shared."""
        if self._sentence is None:
            from common.models import build_sentence_encoder

            self._sentence = build_sentence_encoder(self.model, device=str(self.device))
        return self._sentence

    def clip(self) -> ClipBundle:
        if self._clip is None:
            self._clip = build_clip(self.model, self.device, self.dtype)
        return self._clip

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) → (N,D) normalised; memoised on the last tensor so aesthetic and clip embed once."""
        if self._last is None or self._last[0] is not images:
            self._last = (images, self.clip().embed_images(images))  # grad or not: build_scorers decides
        return self._last[1]


Factory = Callable[[ScorerContext], ScoreFn]

#: name → factory, and name → the score names its function returns; `register_scorer` fills both
SCORERS: dict[str, Factory] = {}
SCORE_KEYS: dict[str, tuple[str, ...]] = {}
#: the scorers whose function keeps autograd when built with differentiable=True
DIFFERENTIABLE: set[str] = set()
#: the scorers whose function takes (rewrite texts, plain prompts) instead of (images, prompts)
TEXT: set[str] = set()


def register_scorer(name: str, keys: Sequence[str] | None = None,
                    differentiable: bool = False, text: bool = False) -> Callable[[Factory], Factory]:
    """Decorator: `@register_scorer("pickscore")` for a factory whose fn returns {"pickscore": …};
    `differentiable=True` when fn is built from torch ops on `images` (no PIL, no numpy);
    `text=True` when fn takes the rewrite texts instead of images."""
    def decorate(factory: Factory) -> Factory:
        SCORERS[name] = factory
        SCORE_KEYS[name] = tuple(keys or (name,))
        if differentiable:
            DIFFERENTIABLE.add(name)
        if text:
            TEXT.add(name)
        return factory
    return decorate


def score_keys(names: Sequence[str]) -> list[str]:
    """The score names the given scorers return, in order."""
    check_known(names)
    return [key for name in dict.fromkeys(names) for key in SCORE_KEYS.get(name, (name,))]


def check_known(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in SCORERS]
    if unknown:
        raise UnknownScorerError(
            f"unknown scorer {unknown[0]!r} in reward.scorers; known scorers: {', '.join(sorted(SCORERS))}"
        )


def require_package(package: str, module: str, scorer: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ScorerUnavailableError(
            f"scorer {scorer!r} needs the pip package {package!r} (import {module}), which is not installed: "
            f"`pip install {package}` (or `pip install 'pag[{extra}]'`), or remove {scorer!r} from reward.scorers"
        ) from exc
