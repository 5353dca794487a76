"""Prompt datasets: the packaged sets and user files, cleaned, truncated, deduplicated and split.

A dataset is a packaged name (see ``list_datasets()``) or a path to a user file:

* ``.jsonl`` -- one JSON object per line with ``"initial_prompt"`` or ``"prompt"`` (a string);
* ``.txt``   -- one prompt per line.

Blank lines are skipped and counted. Whitespace is normalised (runs collapsed, ends stripped).
Prompts longer than ``max_tokens`` (GPT-2 tokens by default; 75 = CLIP's 77-token context less its
start and end tokens) are truncated by tokens and decoded back. Duplicates (after normalisation and
truncation) are dropped. Each of these is counted in ``PromptSet.stats`` and logged at INFO, once per
process for each dataset (see ``DatasetNotes``).

Split rule (never overlaps, deterministic, independent of the dataset a prompt came from):
``bucket = int.from_bytes(sha256(prompt.encode("utf-8")).digest()[:8], "big") / 2**64`` over the
final (normalised, truncated) prompt; the prompt is *eval* if ``bucket < eval_fraction`` (default
0.2), else *train*. The same prompt therefore lands in the same split whichever file it is read from.
On top of that, the PAG paper's four evaluation sets (``chatgpt``, ``lexica``, ``coco``,
``diffusiondb``) are eval-only: ``load_train_prompts`` (with ``exclude_eval_sets=True``, the default)
removes every prompt that also appears in any of them, so they stay unseen by training.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Literal

from common.errors import UsageError

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
PROMPTS_DIR = ASSETS_DIR / "prompts"
TOKENIZER_DIR = ASSETS_DIR / "tokenizers" / "gpt2"
MAX_PROMPT_TOKENS = 75  # CLIP's 77-token context less its start/end tokens
DEFAULT_EVAL_FRACTION = 0.2
#: the PAG paper's four evaluation sets, in its tables' order: eval-only, training never sees them
PAPER_EVAL_SETS = ("lexica", "diffusiondb", "coco", "chatgpt")
#: sets of users' prompts that already carry style modifiers; every other set is read as plain captions
#: (SFT builds its plain → engineered pairs from these, less the eval sets: sft/pairs.py)
ENGINEERED_SETS = ("lexica", "diffusiondb", "pickapic", "diffusiondb_ipgo")
#: plain MS-COCO captions: the style classifier's negatives (scoring/style.py)
PLAIN_SETS = ("coco", "coco_all")

_DATASETS: dict[str, tuple[str, str]] = {  # name -> (file under PROMPTS_DIR, description)
    "chatgpt": ("chatgpt.jsonl", "PAG paper eval set: 64 short ChatGPT-written prompts (eval-only)"),
    "lexica": ("lexica.jsonl", "PAG paper eval set: 64 Lexica.art prompts (eval-only)"),
    "coco": ("coco.jsonl", "PAG paper eval set: 256 MS-COCO captions, one repeated (eval-only)"),
    "diffusiondb": ("diffusiondb.jsonl", "PAG paper eval set: 256 DiffusionDB prompts (eval-only)"),
    "coco_person": ("coco_person.txt", "IPGO: 60 MS-COCO captions about people"),
    "coco_room": ("coco_room.txt", "IPGO: 60 MS-COCO captions of rooms"),
    "coco_vehicles": ("coco_vehicles.txt", "IPGO: 60 MS-COCO captions of vehicles"),
    "coco_natural_scenes": ("coco_natural_scenes.txt", "IPGO: 60 MS-COCO captions of natural scenes"),
    "coco_buildings": ("coco_buildings.txt", "IPGO: 60 MS-COCO captions of buildings"),
    "coco_all": ("coco_prompts.txt", "IPGO: the five MS-COCO category sets together (300 captions)"),
    "diffusiondb_ipgo": ("diffusiondb_data.txt", "IPGO: 398 DiffusionDB prompts"),
    "pickapic": ("pickapic_data.txt", "IPGO: 300 Pick-a-Pic prompts (11 longer than 75 GPT-2 tokens)"),
}

#: sets a user imports from a file of their own (`pag datasets import NAME FILE`; not redistributable here), kept
#: under $PAG_CACHE/datasets: name -> (file there, description)
IMPORTED: dict[str, tuple[str, str]] = {
    "promptist": ("promptist_train.jsonl", "PAG's training prompts (sd14's default): Promptist's "
                  "filtered_mix_train_for_ft.txt less its lines of 45+ words (official main.py:28, "
                  "prompts/convert_format.ipynb); import it with `pag datasets import promptist FILE`"),
}
#: convert_format.ipynb: `if len(line.strip().split()) >= 45: continue`
PROMPTIST_MAX_WORDS = 45


def cache_root() -> Path:
    """$PAG_CACHE or ~/.cache/pag: the SFT checkpoints, the style classifier and imported datasets live under it."""
    return Path(os.environ.get("PAG_CACHE") or "~/.cache/pag").expanduser()


def imported_path(name: str) -> Path:
    return cache_root() / "datasets" / IMPORTED[name][0]


def import_promptist(source: Path) -> tuple[Path, int, int]:
    """Promptist's `filtered_mix_train_for_ft.txt` (one prompt per line) → the official training set, written as
    {"initial_prompt": x} lines (the official `initial_prompt.jsonl`). Returns (path, kept, removed)."""
    if not source.is_file():
        raise DatasetError(f"{source}: no such file; pass Promptist's filtered_mix_train_for_ft.txt "
                           f"(from the Promptist authors, microsoft/LMOps)")
    lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
    kept = [line for line in lines if len(line.split()) < PROMPTIST_MAX_WORDS]
    if not any(kept):
        raise DatasetError(f"{source}: no prompt under {PROMPTIST_MAX_WORDS} words; is it the right file?")
    out = imported_path("promptist")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"initial_prompt": x}) + "\n" for x in kept), encoding="utf-8")
    tmp.replace(out)
    return out, len(kept), len(lines) - len(kept)


Split = Literal["all", "train", "eval"]
TokenCounter = Callable[[str], int]


class DatasetNotes:
    """What cleaning did to a dataset, logged once per process for each (dataset, kind).

    The same packaged files are loaded by the driver's preflight, the SFT pairs, every sampler and
    the eval sets, often several times in one process; that `coco` repeats a caption is a fact about
    the file, worth one INFO line with its count, not a warning at every load."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.said: set[tuple[str, str]] = set()

    def note(self, dataset: str, kind: str, msg: str, *args: object, level: int = logging.INFO) -> None:
        if (dataset, kind) in self.said:
            return
        self.said.add((dataset, kind))
        self.logger.log(level, msg, *args)


notes = DatasetNotes(logger)


class DatasetError(UsageError, ValueError):
    """A dataset that cannot be found or read (bad line, unknown name, bad argument)."""

    label = "prompt data error"


@dataclass
class LoadStats:
    lines: int = 0        # lines read
    blank: int = 0        # blank lines (or empty prompts) skipped
    duplicates: int = 0   # repeated prompts dropped
    truncated: int = 0    # prompts cut to max_tokens
    held_out: int = 0     # prompts dropped because they belong to the other split
    in_eval_sets: int = 0  # train prompts dropped because a paper evaluation set holds them

    def __add__(self, other: LoadStats) -> LoadStats:
        return LoadStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


@dataclass
class PromptSet:
    name: str
    prompts: list[str]
    stats: LoadStats = field(default_factory=LoadStats)

    def __len__(self) -> int:
        return len(self.prompts)


def list_datasets() -> dict[str, str]:
    """Packaged and importable dataset names and one-line descriptions (for ``pag datasets``)."""
    out = {name: desc for name, (_, desc) in _DATASETS.items()}
    for name, (_, desc) in IMPORTED.items():
        out[name] = desc + ("" if imported_path(name).is_file() else " [not imported yet]")
    return out


def dataset_path(name: str | Path) -> Path:
    """The file behind a packaged name, or ``name`` itself if it is an existing file."""
    if isinstance(name, str) and name in _DATASETS:
        return PROMPTS_DIR / _DATASETS[name][0]
    if isinstance(name, str) and name in IMPORTED:
        path = imported_path(name)
        if not path.is_file():
            raise DatasetError(f"dataset {name!r} is not imported: run `pag datasets import {name} FILE` once "
                               f"(it writes {path}), or set sampler.datasets to packaged sets (`pag datasets`)")
        return path
    path = Path(name).expanduser()
    if path.is_file():
        return path
    raise DatasetError(f"unknown dataset {str(name)!r}: not a packaged name nor an existing file; "
                       f"known names: {', '.join([*_DATASETS, *IMPORTED])}")


def normalize(text: str) -> str:
    """Collapse whitespace runs to one space and strip the ends."""
    return " ".join(text.split())


def eval_bucket(prompt: str) -> float:
    """Position of a prompt in [0, 1), from a sha256 of its normalised text."""
    digest = hashlib.sha256(normalize(prompt).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_eval_split(prompt: str, eval_fraction: float = DEFAULT_EVAL_FRACTION) -> bool:
    return eval_bucket(prompt) < eval_fraction


# ---------------------------------------------------------------- token counting and truncation

class _GPT2Counter:
    """Counts and truncates by the packaged GPT-2 tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer.encode(text)[:max_tokens]
        out = self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        return out.rstrip("\ufffd")  # a multi-byte character cut in half


def _whitespace_counter(text: str) -> int:
    return len(text.split())


@lru_cache(maxsize=1)
def default_token_counter() -> TokenCounter:
    """GPT-2 token counter from the packaged tokenizer; whitespace words if transformers is missing."""
    try:
        from transformers import GPT2TokenizerFast
        return _GPT2Counter(GPT2TokenizerFast.from_pretrained(str(TOKENIZER_DIR)))
    except Exception as exc:  # ImportError, or a broken install
        logger.warning("GPT-2 tokenizer unavailable (%s); counting prompt tokens as whitespace words", exc)
        return _whitespace_counter


def _truncate(text: str, max_tokens: int, counter: TokenCounter) -> str:
    truncate = getattr(counter, "truncate", None)
    if truncate is not None:
        return normalize(truncate(text, max_tokens))
    words = text.split()  # generic counter: the longest word prefix that fits
    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if counter(" ".join(words[:mid])) <= max_tokens else (lo, mid - 1)
    return " ".join(words[:lo])


# ---------------------------------------------------------------- reading

_SHAPE = "each line must be an object with 'initial_prompt' or 'prompt'"


def _read_raw(path: Path) -> Iterable[tuple[int, str | None]]:
    """(line number, prompt text or None for a blank line)."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".txt"):
        raise DatasetError(f"{path}: unsupported file type {suffix!r}; use .jsonl or .txt")
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            yield number, None
        elif suffix == ".txt":
            yield number, line
        else:
            yield number, _parse_json_line(path, number, line)


def _parse_json_line(path: Path, number: int, line: str) -> str:
    where = f"{path}:{number}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON ({exc}); {_SHAPE}") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: a JSON {type(obj).__name__}, not an object; {_SHAPE}")
    key = "initial_prompt" if "initial_prompt" in obj else "prompt" if "prompt" in obj else None
    if key is None:
        raise DatasetError(f"{where}: no 'initial_prompt' or 'prompt' key (has {sorted(obj)}); {_SHAPE}")
    if not isinstance(obj[key], str):
        raise DatasetError(f"{where}: {key!r} is a {type(obj[key]).__name__}, not a string; {_SHAPE}")
    return obj[key]


def load_prompts(name_or_path: str | Path, split: Split = "all", *,
                 eval_fraction: float = DEFAULT_EVAL_FRACTION, max_tokens: int | None = MAX_PROMPT_TOKENS,
                 token_counter: TokenCounter | None = None, dedup: bool = True) -> PromptSet:
    """Load one dataset (packaged name or file), cleaned, and keep the requested split of it.

    ``dedup=False`` keeps repeated prompts (to score a paper set exactly as published: ``coco`` has
    one caption twice, 256 lines for 255 distinct prompts).
    """
    if split not in ("all", "train", "eval"):
        raise DatasetError(f"split must be 'all', 'train' or 'eval', not {split!r}")
    if not 0.0 <= eval_fraction <= 1.0:
        raise DatasetError(f"eval_fraction must be in [0, 1], not {eval_fraction}")
    path = dataset_path(name_or_path)
    name = str(name_or_path) if str(name_or_path) in _DATASETS else str(path)
    counter = token_counter if token_counter is not None else default_token_counter()
    stats, prompts, seen = LoadStats(), [], set()
    for _, raw in _read_raw(path):
        stats.lines += 1
        text = normalize(raw) if raw is not None else ""
        if not text:
            stats.blank += 1
            continue
        if max_tokens is not None and counter(text) > max_tokens:
            text = _truncate(text, max_tokens, counter)
            stats.truncated += 1
        if dedup and text in seen:
            stats.duplicates += 1
            continue
        seen.add(text)
        if split != "all" and in_eval_split(text, eval_fraction) != (split == "eval"):
            stats.held_out += 1
            continue
        prompts.append(text)
    read = stats.lines - stats.blank
    if stats.truncated:
        notes.note(name, "truncated", "%s: truncated %d of %d prompts to %d tokens", name, stats.truncated, read,
                   max_tokens)
    if stats.duplicates:
        notes.note(name, "duplicates", "%s: dropped %d duplicate(s) of %d prompts", name, stats.duplicates, read)
    return PromptSet(name, prompts, stats)


def load_train_prompts(names: Iterable[str | Path], eval_fraction: float = DEFAULT_EVAL_FRACTION,
                       exclude_eval_sets: bool = True, *, max_tokens: int | None = MAX_PROMPT_TOKENS,
                       token_counter: TokenCounter | None = None) -> PromptSet:
    """The train split of several datasets, merged and deduplicated across them.

    With ``exclude_eval_sets`` any prompt in one of the paper's evaluation sets is removed as well,
    so listing e.g. ``lexica`` here contributes nothing (it is eval-only).
    """
    names = list(names)
    if not names:
        raise DatasetError("no training datasets given")
    opts = dict(eval_fraction=eval_fraction, max_tokens=max_tokens, token_counter=token_counter)
    banned: set[str] = set()
    if exclude_eval_sets:
        for eval_name in PAPER_EVAL_SETS:
            banned.update(load_prompts(eval_name, "all", **opts).prompts)
    stats, prompts, seen = LoadStats(), [], set()
    for name in names:
        part = load_prompts(name, "train", **opts)
        stats += part.stats
        kept = 0
        for prompt in part.prompts:
            if prompt in banned:
                stats.in_eval_sets += 1
            elif prompt in seen:
                stats.duplicates += 1
            else:
                seen.add(prompt)
                prompts.append(prompt)
                kept += 1
        if kept == 0:  # a warning: listing an eval-only set for training is likely a mistake
            notes.note(str(name), "no_train", "%s contributes no training prompts (eval split or paper evaluation "
                       "sets)", name, level=logging.WARNING)
    if stats.in_eval_sets:
        together = "+".join(str(n) for n in names)
        notes.note(together, "in_eval_sets", "%s: dropped %d training prompt(s) found in the paper evaluation sets "
                   "(%d kept)", together, stats.in_eval_sets, len(prompts))
    if not prompts:
        raise DatasetError(f"no training prompts left in {[str(n) for n in names]} after the split "
                           f"and the removal of the paper evaluation sets {list(PAPER_EVAL_SETS)}")
    return PromptSet("+".join(str(n) for n in names), prompts, stats)
