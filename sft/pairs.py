"""Training pairs for `pag sft`: (plain → engineered) prompts mined from the packaged prompt sets.

How pairs are made (`build_pairs`; deterministic for a seed). Only the *train* split of each set is
read, through `common.data.load_train_prompts`, so the paper's four evaluation sets (chatgpt, lexica,
coco, diffusiondb) never contribute; a pair whose plain or target text is in one of them (ignoring
case, spacing and end punctuation) is dropped as well.

1. Engineered sets (`common.data.ENGINEERED_SETS` less the eval sets: diffusiondb_ipgo, pickapic — user
   prompts with style modifiers). Each prompt is split at its first separator — ``,`` ``;`` ``|`` ``--`` ``. `` or
   `` by `` — into a *subject* and a *tail*. The plain source is the subject, lower-cased, whitespace
   collapsed, trailing punctuation stripped; the target is the prompt itself. The pair is skipped if
   the plain has fewer than two words or equals the target. A prompt with no separator at all is a
   plain prompt: it joins the plain pool of step 3.
2. Modifier vocabulary. Each tail is cut at the same separators into modifiers (lower-cased;
   ``by <artist>`` keeps its ``by``). Modifiers of at most 4 words and 2–40 characters seen in at least two
   prompts form the vocabulary, weighted by that count (all seen once, if fewer than 10 qualify).
3. Plain sets (every other set: coco_all and the other COCO captions, user files) plus the
   modifier-free prompts of step 1. Each plain prompt is paired with itself (trailing period
   removed) followed by ``, `` and 2–6 modifiers drawn from the vocabulary without replacement,
   proportionally to their counts, so the policy learns "caption → caption, modifiers".

With the default `sampler.datasets` (diffusiondb_ipgo, pickapic, coco_all) and seed 0 this gives
770 pairs: 333 stripped from engineered prompts (3 more dropped: their plain is a diffusiondb eval prompt)
and 437 plain prompts with modifiers appended (252 COCO captions, 185 separator-free engineered-set
prompts; 137 modifiers).
"""
from __future__ import annotations

import random
import re
import logging
from pathlib import Path
from typing import Sequence

from common.config import ConfigError
from common.data import ENGINEERED_SETS, PAPER_EVAL_SETS, load_prompts, load_train_prompts, normalize

Pair = tuple[str, str]

logger = logging.getLogger(__name__)

_SEPARATOR = re.compile(r"\s*(?:,|;|\||--|\.\s)\s*|\s+by\s+", re.IGNORECASE)
_PIECE_SEPARATOR = re.compile(r"\s*(?:,|;|\||--|\.\s)\s*")


def split_modifiers(prompt: str) -> tuple[str, str]:
    """(subject, tail) at the first separator; tail is '' when the prompt has none."""
    match = _SEPARATOR.search(prompt)
    if match is None:
        return prompt, ""
    return prompt[: match.start()], prompt[match.start():]


def plain_of(prompt: str) -> str:
    """The plain source of an engineered prompt: its subject, lower-cased, tidied."""
    subject, _ = split_modifiers(prompt)
    return normalize(subject).lower().strip(" .,;:!-")


def modifiers_of(prompt: str) -> list[str]:
    """The style modifiers in an engineered prompt's tail, lower-cased (``by X`` keeps ``by``)."""
    _, tail = split_modifiers(prompt)
    tail = re.sub(r"^\s*(?:,|;|\||--|\.\s)\s*", "", tail).strip()
    pieces = (normalize(p).lower().strip(" .,;:!-") for p in _PIECE_SEPARATOR.split(tail))
    return [p for p in pieces if p]


def modifier_vocabulary(prompts: Sequence[str], min_count: int = 2) -> list[tuple[str, int]]:
    """(modifier, number of prompts holding it), most frequent first, ties alphabetical."""
    counts: dict[str, int] = {}
    for prompt in prompts:
        for mod in set(modifiers_of(prompt)):
            if len(mod.split()) <= 4 and 2 <= len(mod) <= 40 and re.search(r"[a-z]", mod):
                counts[mod] = counts.get(mod, 0) + 1
    vocab = sorted(((m, c) for m, c in counts.items() if c >= min_count), key=lambda mc: (-mc[1], mc[0]))
    if len(vocab) < 10:
        vocab = sorted(counts.items(), key=lambda mc: (-mc[1], mc[0]))
    return vocab


def _weighted_sample(rng: random.Random, vocab: Sequence[tuple[str, int]], k: int) -> list[str]:
    """k distinct items with P ∝ count (Efraimidis–Spirakis keys u^(1/w)); deterministic given rng."""
    keyed = sorted(((rng.random() ** (1.0 / w), m) for m, w in vocab), reverse=True)
    return [m for _, m in keyed[:k]]


def _key(text: str) -> str:
    """What two prompts share when they are 'the same' for the eval-set ban: case, spaces, end punctuation."""
    return normalize(text).lower().strip(" .,;:!-")


def _set_names(names: Sequence[str | Path]) -> tuple[list[str | Path], list[str | Path]]:
    engineered = [n for n in names if str(n) in ENGINEERED_SETS]
    plain = [n for n in names if str(n) not in ENGINEERED_SETS]
    return engineered, plain


def build_pairs(prompt_set_names: Sequence[str | Path], seed: int = 0) -> list[Pair]:
    """(plain, engineered) training pairs from the train split of the given sets (rule in the module doc)."""
    names = [n for n in prompt_set_names if str(n) not in PAPER_EVAL_SETS]
    if len(names) < len(prompt_set_names):
        logger.warning("SFT never trains on the paper evaluation sets: ignoring %s",
                       [str(n) for n in prompt_set_names if str(n) in PAPER_EVAL_SETS])
    engineered_names, plain_names = _set_names(names)
    banned = {_key(p) for name in PAPER_EVAL_SETS for p in load_prompts(name, "all").prompts}
    rng = random.Random(seed)

    engineered = load_train_prompts(engineered_names).prompts if engineered_names else []
    pairs: list[Pair] = []
    plain_pool: list[str] = []
    for prompt in engineered:
        if not split_modifiers(prompt)[1]:
            plain_pool.append(prompt)  # nothing to strip: it is a plain prompt
            continue
        plain = plain_of(prompt)
        if len(plain.split()) >= 2 and plain != prompt.lower():
            pairs.append((plain, prompt))
    n_stripped = len(pairs)

    if plain_names:
        plain_pool.extend(load_train_prompts(plain_names).prompts)
    vocab = modifier_vocabulary(engineered)
    if plain_pool and not vocab:
        raise ConfigError(f"sampler.datasets = {[str(n) for n in prompt_set_names]}: no style modifiers to append to "
                          f"plain prompts; include an engineered set "
                          f"({', '.join(sorted(set(ENGINEERED_SETS) - set(PAPER_EVAL_SETS)))})")
    for prompt in plain_pool:
        mods = _weighted_sample(rng, vocab, rng.randint(2, 6))
        pairs.append((prompt, prompt.rstrip(" .") + ", " + ", ".join(mods)))

    kept = [(x, y) for x, y in pairs if _key(x) not in banned and _key(y) not in banned and x != y]
    if len(kept) < len(pairs):
        logger.info("dropped %d pair(s) touching the paper evaluation sets", len(pairs) - len(kept))
    logger.info("SFT pairs: %d stripped from engineered prompts, %d plain prompts + modifiers (%d modifiers), "
                "%d kept", n_stripped, len(pairs) - n_stripped, len(vocab), len(kept))
    if not kept:
        raise ConfigError(f"sampler.datasets = {[str(n) for n in prompt_set_names]}: no SFT pairs left after the "
                          f"train split and the removal of the paper evaluation sets")
    return kept


def load_pair_file(path: str | Path) -> list[Pair]:
    """(plain, engineered) pairs from a .jsonl file, one {"plain": ..., "engineered": ...} object a line
    (`model.sft_pairs`; the miniature world ships world/assets/prompts/world_sft_pairs.jsonl). Read as
    given: no mining, no split, which is why a caption with commas in it stays whole."""
    import json

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.sft_pairs = {str(path)!r}: no such file (a .jsonl of "
                          '{"plain": ..., "engineered": ...} objects)')
    pairs: list[Pair] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            plain, engineered = record["plain"], record["engineered"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}:{number}: expected a JSON object with string fields \"plain\" and "
                              f"\"engineered\" ({type(exc).__name__}: {exc})") from exc
        if not (isinstance(plain, str) and isinstance(engineered, str) and plain.strip() and engineered.strip()):
            raise ConfigError(f"{path}:{number}: \"plain\" and \"engineered\" must be non-empty strings")
        pairs.append((plain.strip(), engineered.strip()))
    if not pairs:
        raise ConfigError(f"{path}: no pairs in the file")
    return pairs


def pairs_for(cfg) -> list[Pair]:
    """The SFT pairs of a config: `model.sft_pairs` when set, else mined from `sampler.datasets`."""
    if cfg.model.sft_pairs:
        return load_pair_file(cfg.model.sft_pairs)
    return build_pairs(cfg.sampler.datasets, cfg.model.seed)
