"""The SFT corpus: "human-engineered" (plain -> engineered) caption pairs, and plain prompt lists.

`python -m world.corpus` writes, under world/assets/prompts/ (seeded, deterministic):

| file | what |
|---|---|
| world_train.txt | plain captions of the train split, one per line (`common.data` loads .txt lists) |
| world_heldout.txt | plain captions of the held-out split |
| world_sft_pairs.jsonl | {"plain", "engineered"} rewrites of the train captions |

Split: the project's own rule, `common.data.in_eval_split` (sha256 bucket < 0.2 is held out), so
`load_prompts(world_train.txt + world_heldout.txt, split=...)` agrees with these files.

How people write modifiers here: each rewrite appends 2-6 distinct modifiers drawn without
replacement from a Zipf-like popularity (weight 1 / rank), where six no-effect words ("highly
detailed", "8k", ...) hold the top ranks, then the other no-effect words, the style phrasings and
the harmful words in a seeded shuffled order. A share of the rewrites (`LOOK_RATE`) also copies a
*look* seen in other people's prompts, as real prompt writers pass around "octane render, unreal
engine": two of a mode's three values, copied verbatim (first phrasings), side by side among the
popular words. So rewrites are mostly mediocre: they rarely name all three values of a mode
(`mode_hit_rate`), but often come within one; completing the looks, dropping the harmful words and
keeping the modes apart is what the policy has to discover.
Note for SFT: 3-object captions contain a comma ("a red circle, a blue ring and a green cross"), so
read the pairs file rather than splitting engineered prompts at their first comma.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from common.data import in_eval_split
from world.captions import HARMFUL, NO_EFFECT, PHRASINGS, engineered_caption, parse_content, parse_modifiers
from world.reader import ASSETS
from world.scenes import sample_content
from world.taste import MODES

PROMPTS = ASSETS / "prompts"
ZIPF_EXPONENT = 1.0
TOP_NO_EFFECT = 6  # "highly detailed", "8k", "4k", "masterpiece", "trending on artstation", "award winning"
MODIFIERS_PER_REWRITE = (2, 6)
#: the share of rewrites that copy two values of a mode (a "look"); measured effect on the run: world/README.md
LOOK_RATE = 0.4


@dataclass
class Corpus:
    train: list[str]
    heldout: list[str]
    pairs: list[tuple[str, str]]


def popularity(seed: int = 0) -> list[tuple[str, float]]:
    """(modifier, probability), most popular first: the TOP_NO_EFFECT favourites, then every other
    no-effect word and phrasing in a seeded shuffle."""
    rng = np.random.default_rng(seed)
    phrasings = sorted(p for vals in PHRASINGS.values() for ps in vals.values() for p in ps)
    others = list(NO_EFFECT[TOP_NO_EFFECT:]) + phrasings
    ranked = list(NO_EFFECT[:TOP_NO_EFFECT]) + [others[i] for i in rng.permutation(len(others))]
    weights = 1.0 / np.arange(1, len(ranked) + 1) ** ZIPF_EXPONENT
    return list(zip(ranked, (weights / weights.sum()).tolist()))


def plain_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct plain captions of random content (seeded)."""
    from world.captions import plain_caption

    rng = np.random.default_rng(seed)
    seen: dict[str, None] = {}
    while len(seen) < n:
        seen.setdefault(plain_caption(sample_content(rng)))
    return list(seen)


def look(rng: np.random.Generator) -> list[str]:
    """Two of a random mode's three values in their first phrasings, in either order: a partial recipe
    people copy verbatim (15 of them)."""
    mode = MODES[sorted(MODES)[int(rng.integers(len(MODES)))]]
    axes = [sorted(mode)[i] for i in rng.choice(len(mode), size=2, replace=False)]
    return [PHRASINGS[a][mode[a]][0] for a in axes]


def rewrite(plain: str, vocab: Sequence[tuple[str, float]], rng: np.random.Generator) -> str:
    """The plain caption with 2-6 distinct modifiers drawn by popularity; with probability LOOK_RATE two
    of them are a copied look (`look`), side by side at a random place among the popular words."""
    words, probs = zip(*vocab)
    k = int(rng.integers(MODIFIERS_PER_REWRITE[0], MODIFIERS_PER_REWRITE[1] + 1))
    copied = look(rng) if rng.random() < LOOK_RATE else []
    p = np.asarray(probs) * np.array([w not in copied for w in words])
    picked = [words[i] for i in rng.choice(len(words), size=k - len(copied), replace=False, p=p / p.sum())]
    at = int(rng.integers(len(picked) + 1))  # a look is copied as one piece: its two phrases side by side
    return engineered_caption(parse_content(plain), picked[:at] + copied + picked[at:])


def build(n_prompts: int = 3000, rewrites_per_prompt: int = 2, seed: int = 0) -> Corpus:
    prompts = plain_prompts(n_prompts, seed)
    train = [p for p in prompts if not in_eval_split(p)]
    heldout = [p for p in prompts if in_eval_split(p)]
    vocab = popularity(seed)
    rng = np.random.default_rng([seed, 1])
    pairs = [(p, rewrite(p, vocab, rng)) for p in train for _ in range(rewrites_per_prompt)]
    return Corpus(train, heldout, pairs)


def named_values(text: str) -> dict[str, int]:
    """How many of each mode's values the modifiers of a caption set (the last mention of an axis wins)."""
    named = parse_modifiers(text)
    return {name: sum(named.get(a) == v for a, v in mode.items()) for name, mode in MODES.items()}


def closest_mode(text: str) -> int:
    """The most values of any one mode a caption names: 3 completes it, 2 is within one value."""
    return max(named_values(text).values())


def completes_mode(text: str) -> bool:
    """Whether the modifiers a caption names set all values of some mode (unnamed axes ignored)."""
    return closest_mode(text) == 3


def names_harm(text: str) -> bool:
    """Whether the text contains a harmful phrasing (blurry, cluttered, grain, ...)."""
    return any(h in text for h in HARMFUL)


def mode_hit_rate(engineered: Sequence[str]) -> float:
    return float(np.mean([completes_mode(t) for t in engineered])) if engineered else 0.0


def stats(corpus: Corpus) -> dict[str, float]:
    engineered = [e for _, e in corpus.pairs]
    named = [parse_modifiers(e) for e in engineered]
    return {"train_prompts": len(corpus.train), "heldout_prompts": len(corpus.heldout),
            "pairs": len(corpus.pairs), "mode_hit_rate": mode_hit_rate(engineered),
            "mean_axes_named": float(np.mean([len(n) for n in named])),
            "with_harmful": float(np.mean([names_harm(e) for e in engineered]))}


def write(corpus: Corpus, folder: Path = PROMPTS) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "world_train.txt", folder / "world_heldout.txt", folder / "world_sft_pairs.jsonl"]
    paths[0].write_text("\n".join(corpus.train) + "\n")
    paths[1].write_text("\n".join(corpus.heldout) + "\n")
    paths[2].write_text("".join(json.dumps({"plain": p, "engineered": e}) + "\n" for p, e in corpus.pairs))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m world.corpus", description="write the world's prompt files")
    p.add_argument("--prompts", type=int, default=3000)
    p.add_argument("--rewrites", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=PROMPTS)
    args = p.parse_args(argv)
    corpus = build(args.prompts, args.rewrites, args.seed)
    for path in write(corpus, args.out):
        print("wrote", path)
    print(json.dumps(stats(corpus), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
