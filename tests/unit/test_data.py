"""Prompt datasets: packaged counts, user files, cleaning, truncation and the train/eval split."""
from __future__ import annotations

import hashlib
import json
import logging

import pytest

from common.data import (
    ASSETS_DIR, IMPORTED, PAPER_EVAL_SETS, DatasetError, LoadStats, PromptSet, dataset_path, default_token_counter,
    in_eval_split, list_datasets, load_prompts, load_train_prompts,
)

IPGO_SETS = ["coco_person", "coco_room", "coco_vehicles", "coco_natural_scenes", "coco_buildings",
             "coco_all", "diffusiondb_ipgo", "pickapic"]


def words(text: str) -> int:
    return len(text.split())


# ---------------------------------------------------------------- packaged sets

def test_list_datasets_names_and_files(monkeypatch, tmp_path):
    monkeypatch.setenv("PAG_CACHE", str(tmp_path))
    names = list_datasets()
    assert set(names) == set(PAPER_EVAL_SETS) | set(IPGO_SETS) | {"promptist"}
    assert names.pop("promptist").endswith("[not imported yet]")
    for name, desc in names.items():
        assert desc and dataset_path(name).is_file()
        assert dataset_path(name).is_relative_to(ASSETS_DIR)


def test_promptist_import_is_convert_format_ipynb_and_sd14_trains_on_it(monkeypatch, tmp_path, capsys):
    """Official prompts/convert_format.ipynb: every line of filtered_mix_train_for_ft.txt, stripped, but those of
    45 or more words. Until it is imported, sd14's default sampler.datasets fails naming the command."""
    from common.config import load_config
    from pag.cli import main

    monkeypatch.setenv("PAG_CACHE", str(tmp_path / "cache"))
    assert load_config("sd14").sampler.datasets == ["promptist"]
    with pytest.raises(DatasetError, match="pag datasets import promptist FILE"):
        load_train_prompts(load_config("sd14").sampler.datasets)
    source = tmp_path / "filtered_mix_train_for_ft.txt"
    long, edge = " ".join(["word"] * 45), " ".join(["w"] * 44)
    source.write_text(f"  a castle on a hill, oil painting  \n{long}\n{edge}\na red car\n")
    assert main(["datasets", "import", "promptist", str(source)]) == 0
    assert "3 prompts (1 lines of 45+ words left out" in capsys.readouterr().out
    rows = [json.loads(line) for line in dataset_path("promptist").read_text().splitlines()]
    assert rows == [{"initial_prompt": "a castle on a hill, oil painting"}, {"initial_prompt": edge},
                    {"initial_prompt": "a red car"}]
    assert load_prompts("promptist").prompts == ["a castle on a hill, oil painting", edge, "a red car"]
    assert main(["datasets", "import", "promptist", str(tmp_path / "missing.txt")]) == 2


# name: (lines, blank, duplicates, prompts) -- measured on the packaged files
COUNTS = {
    "chatgpt": (64, 0, 0, 64),
    "lexica": (64, 0, 0, 64),
    "coco": (256, 0, 1, 255),  # lines 55 and 72 hold the same caption
    "diffusiondb": (256, 0, 0, 256),
    "coco_person": (60, 0, 0, 60),
    "coco_room": (61, 1, 0, 60),
    "coco_vehicles": (61, 1, 0, 60),
    "coco_natural_scenes": (60, 0, 0, 60),
    "coco_buildings": (61, 1, 0, 60),
    "coco_all": (300, 0, 0, 300),
    "diffusiondb_ipgo": (398, 0, 0, 398),
    "pickapic": (300, 0, 0, 300),
}


@pytest.mark.parametrize("name", list(COUNTS))
def test_packaged_counts(name):
    ps = load_prompts(name)
    lines, blank, dups, n = COUNTS[name]
    assert isinstance(ps, PromptSet) and ps.name == name
    assert (ps.stats.lines, ps.stats.blank, ps.stats.duplicates, len(ps.prompts)) == (lines, blank, dups, n)
    assert len(set(ps.prompts)) == len(ps.prompts)
    assert all(p and p == " ".join(p.split()) for p in ps.prompts)


def test_paper_sets_as_published_without_dedup():
    assert [len(load_prompts(n, dedup=False).prompts) for n in PAPER_EVAL_SETS] == [64, 256, 256, 64]


def test_pickapic_long_prompts_truncated_by_gpt2():
    counter = default_token_counter()
    if not hasattr(counter, "truncate"):
        pytest.skip("transformers unavailable: whitespace approximation in use")
    ps = load_prompts("pickapic")
    assert ps.stats.truncated == 11
    assert max(counter(p) for p in ps.prompts) <= 75
    assert load_prompts("pickapic", max_tokens=None).stats.truncated == 0


# ---------------------------------------------------------------- user files

def test_txt_user_file_blank_lines_and_duplicates(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("a red  cat\n\n   \nA red cat\n a red cat \nblue dog\t on grass\n\n", encoding="utf-8")
    ps = load_prompts(f)
    assert ps.prompts == ["a red cat", "A red cat", "blue dog on grass"]
    assert (ps.stats.lines, ps.stats.blank, ps.stats.duplicates) == (7, 3, 1)
    assert load_prompts(str(f), dedup=False).prompts.count("a red cat") == 2


def test_jsonl_user_file_both_keys(tmp_path):
    f = tmp_path / "mine.jsonl"
    rows = [{"initial_prompt": "a castle"}, {"prompt": "a boat", "score": 3}, {"prompt": "   "},
            {"initial_prompt": "a castle"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    ps = load_prompts(f)
    assert ps.prompts == ["a castle", "a boat"]
    assert (ps.stats.lines, ps.stats.blank, ps.stats.duplicates) == (5, 2, 1)


@pytest.mark.parametrize("bad, fragment", [
    ('{"prompt": "unterminated', "not valid JSON"),
    ('{"text": "a cat"}', "no 'initial_prompt' or 'prompt' key"),
    ('{"prompt": 17}', "not a string"),
    ('["a cat"]', "not an object"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, bad, fragment):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "fine"}\n\n' + bad + '\n{"prompt": "also fine"}\n', encoding="utf-8")
    with pytest.raises(DatasetError) as info:
        load_prompts(f)
    message = str(info.value)
    assert message.startswith(f"{f}:3: ") and fragment in message
    assert "'initial_prompt' or 'prompt'" in message
    assert isinstance(info.value, ValueError)


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(DatasetError, match="known names: .*chatgpt.*pickapic"):
        load_prompts("no_such_set")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="unsupported file type"):
        load_prompts(tmp_path / "x.csv")
    with pytest.raises(DatasetError, match="split"):
        load_prompts("chatgpt", split="test")  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match="eval_fraction"):
        load_prompts("chatgpt", eval_fraction=1.5)


# ---------------------------------------------------------------- truncation

def test_truncation_counted_and_logged(tmp_path, caplog):
    f = tmp_path / "long.txt"
    f.write_text("one two three four five\nshort one\nsix seven eight nine\n", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="common.data"):
        ps = load_prompts(f, max_tokens=3, token_counter=words)
    assert ps.prompts == ["one two three", "short one", "six seven eight"]
    assert ps.stats.truncated == 2
    assert "truncated 2 of 3 prompts to 3 tokens" in caplog.text


def test_truncation_with_counter_lacking_truncate(tmp_path):
    f = tmp_path / "chars.txt"
    f.write_text("abc defgh ijklmnop\n", encoding="utf-8")
    ps = load_prompts(f, max_tokens=10, token_counter=len)  # characters: longest word prefix that fits
    assert ps.prompts == ["abc defgh"] and ps.stats.truncated == 1


def test_truncation_by_default_tokenizer(tmp_path):
    counter = default_token_counter()
    f = tmp_path / "long.txt"
    f.write_text("a very long prompt about a lighthouse on a cliff at dusk\n", encoding="utf-8")
    ps = load_prompts(f, max_tokens=5)
    assert ps.stats.truncated == 1
    assert 0 < counter(ps.prompts[0]) <= 5
    assert "a very long prompt about a lighthouse".startswith(ps.prompts[0])


def test_truncation_can_create_duplicates(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("a b c d\na b c e\n", encoding="utf-8")
    ps = load_prompts(f, max_tokens=3, token_counter=words)
    assert ps.prompts == ["a b c"] and ps.stats.truncated == 2 and ps.stats.duplicates == 1


# ---------------------------------------------------------------- split

@pytest.mark.parametrize("name", ["lexica", "coco_all", "pickapic"])
def test_split_disjoint_covering_and_deterministic(name):
    everything = load_prompts(name).prompts
    train, evals = load_prompts(name, "train"), load_prompts(name, "eval")
    assert set(train.prompts).isdisjoint(evals.prompts)
    assert sorted(train.prompts + evals.prompts) == sorted(everything)
    assert train.stats.held_out == len(evals.prompts) and evals.stats.held_out == len(train.prompts)
    assert load_prompts(name, "train").prompts == train.prompts
    assert load_prompts(name, "eval").prompts == evals.prompts


def test_split_rule_is_the_documented_sha256():
    for p in load_prompts("diffusiondb").prompts:
        bucket = int.from_bytes(hashlib.sha256(p.encode("utf-8")).digest()[:8], "big") / 2**64
        assert in_eval_split(p, 0.2) == (bucket < 0.2)
        assert in_eval_split("  " + p.replace(" ", "   ") + "\n") == in_eval_split(p)


def test_split_fraction():
    prompts = [p for n in ("diffusiondb_ipgo", "coco_all", "pickapic", "diffusiondb") for p in load_prompts(n).prompts]
    share = sum(in_eval_split(p) for p in prompts) / len(prompts)
    assert 0.15 < share < 0.25
    assert load_prompts("lexica", "eval", eval_fraction=0.0).prompts == []
    assert load_prompts("lexica", "train", eval_fraction=1.0).prompts == []
    assert 0.3 < sum(in_eval_split(p, 0.5) for p in prompts) / len(prompts) < 0.7


def test_same_prompt_same_split_across_datasets(tmp_path):
    lexica = load_prompts("lexica").prompts
    f = tmp_path / "mixed.txt"
    f.write_text("\n".join(["  " + p + "  " for p in lexica[:20]]), encoding="utf-8")
    mine_eval = set(load_prompts(f, "eval").prompts)
    assert mine_eval == set(load_prompts("lexica", "eval").prompts) & set(lexica[:20])


# ---------------------------------------------------------------- training prompts

def test_paper_eval_prompts_never_in_train():
    paper = {p for n in PAPER_EVAL_SETS for p in load_prompts(n).prompts}
    packaged = [name for name in list_datasets() if name not in IMPORTED]
    train = load_train_prompts(packaged)
    assert train.prompts and paper.isdisjoint(train.prompts)
    assert train.stats.in_eval_sets > 0
    assert len(set(train.prompts)) == len(train.prompts)
    assert not any(in_eval_split(p) for p in train.prompts)
    loose = load_train_prompts(packaged, exclude_eval_sets=False)
    assert not paper.isdisjoint(loose.prompts) and loose.stats.in_eval_sets == 0


def test_eval_only_sets_alone_give_no_training_data():
    with pytest.raises(DatasetError, match="no training prompts"):
        load_train_prompts(["lexica", "chatgpt"])
    with pytest.raises(DatasetError):
        load_train_prompts([])


def test_train_merges_across_files_and_user_files(tmp_path):
    chatgpt = load_prompts("chatgpt").prompts
    f = tmp_path / "mine.jsonl"
    mine = [f"a unique prompt number {i}" for i in range(200)]
    f.write_text("\n".join(json.dumps({"prompt": p}) for p in mine + chatgpt), encoding="utf-8")
    train = load_train_prompts([f, "coco_person", str(f)], eval_fraction=0.3)
    expected = [p for p in mine if not in_eval_split(p, 0.3)]
    assert train.prompts[: len(expected)] == expected
    assert set(chatgpt).isdisjoint(train.prompts)
    assert train.stats.duplicates >= len(expected)  # the second copy of the file
    assert train.name == f"{f}+coco_person+{f}"


def test_loadstats_add():
    total = LoadStats(lines=2, blank=1) + LoadStats(lines=3, duplicates=2, truncated=1)
    assert total == LoadStats(lines=5, blank=1, duplicates=2, truncated=1)
