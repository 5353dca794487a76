"""model.sft_pairs: a .jsonl of {"plain", "engineered"} pairs read whole (commas inside captions stay), and bad
lines named by file and line."""
from __future__ import annotations

import json

import pytest

from common.config import ConfigError, load_config
from sft.pairs import load_pair_file, pairs_for


def test_pairs_are_read_whole_and_chosen_over_mining(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"plain": "a red ring, a blue square and a cyan cross", "engineered": "a red ring, a blue square and a "
             "cyan cross, neon palette"}, {"plain": "a pink circle", "engineered": "a pink circle, 8k"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_pair_file(path) == [(r["plain"], r["engineered"]) for r in rows]
    assert pairs_for(load_config("tiny", overrides=[f"model.sft_pairs={path}"])) == load_pair_file(path)


@pytest.mark.parametrize("line, expected", [
    ('{"plain": "a red ring"}', "pairs.jsonl:2: expected a JSON object"),
    ("not json", "pairs.jsonl:2: expected a JSON object"),
    ('{"plain": "", "engineered": "x, 8k"}', "pairs.jsonl:2: \"plain\" and \"engineered\" must be non-empty"),
])
def test_a_bad_line_is_named_by_file_and_line(tmp_path, line, expected):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"plain": "a red ring", "engineered": "a red ring, 8k"}\n' + line + "\n")
    with pytest.raises(ConfigError, match=expected.replace("\"", '"')):
        load_pair_file(path)


def test_a_missing_file_names_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="model.sft_pairs"):
        load_pair_file(tmp_path / "none.jsonl")
