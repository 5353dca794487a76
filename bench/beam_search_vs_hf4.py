"""Cross-check of `common.beam_search.diverse_beam_search` against transformers 4.x group beam search.

transformers 5 (installed) has no group beam search, so the reference runs from a side install:

    pip install --no-deps --target /tmp/hf4 transformers==4.46.3 tokenizers==0.20.3 huggingface_hub==0.26.2
    PYTHONPATH=/tmp/hf4 python bench/beam_search_vs_hf4.py generate tests/fixtures/beam_hf4   # reference, 4.46.3
    PYTHONPATH=$PWD python bench/beam_search_vs_hf4.py compare tests/fixtures/beam_hf4        # ours, JSON verdict

Four tiny random GPT-2s (float32), three left-padded prompts each, configurations
(vocab, groups, beams per group, diversity, length penalty, min new, max new) below. The reference made
that way is kept in tests/fixtures/beam_hf4 (the models' weights as safetensors, 4.46.3's sequences and
scores as JSON, 0.4 MB), which tests/unit/test_beam_search.py compares against on every run.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CASES = [(40, 4, 1, 1.0, -1.0, 3, 10), (40, 16, 1, 1.0, -1.0, 3, 12), (30, 3, 2, 0.5, 1.0, 2, 9),
         (25, 4, 3, 2.0, -2.0, 1, 8)]


def _model(V: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3,
                     bos_token_id=V - 1, eos_token_id=V - 1, pad_token_id=V - 1)
    return GPT2LMHeadModel(cfg).eval()


def _prompts(V: int, seed: int):
    gen = torch.Generator().manual_seed(seed + 10)
    ids = torch.randint(0, V - 1, (3, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, V - 1), mask


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed, (V, G, k, lam, lp, mn, mx) in enumerate(CASES):
        model = _model(V, seed)
        # lm_head.weight is tied to wte: saved once, tied again on load
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
                  out / f"m{seed}.safetensors")
        ids, mask = _prompts(V, seed)
        gen = model.generate(input_ids=ids, attention_mask=mask, num_beams=G * k, num_beam_groups=G,
                             diversity_penalty=lam, length_penalty=lp, min_new_tokens=mn, max_new_tokens=mx,
                             num_return_sequences=G * k, do_sample=False, early_stopping=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=V - 1, eos_token_id=V - 1)
        results.append({"seqs": gen.sequences[:, ids.shape[1]:].view(3, G * k, -1).tolist(),
                        "scores": gen.sequences_scores.view(3, -1).tolist()})
    (out / "hf4.json").write_text(json.dumps({"transformers": __import__("transformers").__version__,
                                              "cases": results}))


def compare(out: Path) -> dict:
    from common.beam_search import diverse_beam_search

    saved = json.loads((out / "hf4.json").read_text())
    reference = saved["cases"]
    verdict = []
    for seed, ((V, G, k, lam, lp, mn, mx), ref) in enumerate(zip(CASES, reference)):
        model = _model(V, seed)
        missing, unexpected = model.load_state_dict(load_file(out / f"m{seed}.safetensors"), strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise ValueError(f"{out}/m{seed}.safetensors: missing {missing}, unexpected {unexpected}")
        ids, mask = _prompts(V, seed)
        o_ids, o_mask, o_scores = diverse_beam_search(
            model, ids, mask, num_groups=G, beams_per_group=k, diversity_penalty=lam, length_penalty=lp,
            min_new_tokens=mn, max_new_tokens=mx, eos_id=V - 1)
        same_ids = True
        for b in range(3):
            for i in range(G * k):
                theirs = ref["seqs"][b][i]
                theirs = theirs[: theirs.index(V - 1) + 1] if V - 1 in theirs else theirs  # drop 4.x's padding
                same_ids &= o_ids[b, i][o_mask[b, i].bool()].tolist() == theirs
        theirs = torch.tensor(ref["scores"], dtype=torch.float64)
        # 4.x accumulates beam scores in float32, ours in float64: compare relative to the score's size
        err = float(((o_scores.double() - theirs).abs() / theirs.abs().clamp(min=1.0)).max())
        verdict.append({"case": [V, G, k, lam, lp, mn, mx], "ids_equal": same_ids, "max_rel_score_diff": err})
    return {"transformers_reference": saved["transformers"], "cases": verdict,
            "all_equal": all(v["ids_equal"] and v["max_rel_score_diff"] < 1e-6 for v in verdict)}


if __name__ == "__main__":
    mode, path = sys.argv[1], Path(sys.argv[2])
    if mode == "generate":
        generate(path)
    else:
        print(json.dumps(compare(path)))
