"""buffer.priority_of=paper (issue 10 item 5): per-prompt groups drawn with the official priority
P(g) ∝ exp(mean(log p_ref(y|x) + log R)), next to a `prio` ZSET that stays id → log_reward."""
import numpy as np
import pytest

from buffer import ReplayBuffer
from buffer.groups import draw_groups, group_of, group_probabilities, paper_value
from buffer.testing import make_trajectory
from common.config import load_config
from common.constants import prio_key


def _traj(i, prompt, log_reward, ref):
    t = make_trajectory(i, log_reward, prompt=prompt, length=2)
    return t.replace(ref_logprobs=list(ref))


def test_group_probabilities_are_the_softmax_of_the_group_means():
    names, p = group_probabilities({"a": [0.0, 2.0], "b": [3.0], "c": [-1000.0, 0.0]}, temperature=1.0)
    assert names == ["a", "b", "c"]
    expected = np.exp([1.0, 3.0, -500.0])
    np.testing.assert_allclose(p, expected / expected.sum(), rtol=1e-12)
    _, p2 = group_probabilities({"a": [0.0, 2.0], "b": [3.0]}, temperature=2.0)
    np.testing.assert_allclose(p2, np.exp([0.5, 1.5]) / np.exp([0.5, 1.5]).sum())
    assert group_probabilities({})[0] == []
    # the default temperature is 1; large values do not overflow (the max is subtracted before exp)
    _, p1 = group_probabilities({"a": [0.0, 2.0], "b": [3.0]})
    np.testing.assert_allclose(p1, np.exp([1.0, 3.0]) / np.exp([1.0, 3.0]).sum())
    _, big = group_probabilities({"a": [800.0], "b": [799.0]})
    np.testing.assert_allclose(big, [1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(1.0))])
    assert len(group_of("a prompt")) == 16 and group_of("a prompt") != group_of("a prompt ")


def test_draw_groups_gives_whole_groups_in_proportion():
    rng = np.random.default_rng(0)
    members = {"a": ["a1", "a2"], "b": ["b1", "b2", "b3", "b4"]}
    names, probs = ["a", "b"], np.array([0.25, 0.75])
    ids = draw_groups(members, probs, names, 40000, rng)
    assert len(ids) == 40000
    share_a = sum(i.startswith("a") for i in ids) / len(ids)
    # a draw of a gives 2 ids, of b 4: a's share of ids is 0.25·2 / (0.25·2 + 0.75·4) = 1/7
    assert share_a == pytest.approx(1 / 7, abs=0.01)
    assert draw_groups({}, np.array([]), [], 5, rng) == []


def test_paper_value_is_the_official_log_reward():
    t = _traj(0, "x", 3.0, [-1.0, -0.5])
    assert paper_value(t) == pytest.approx(1.5) and paper_value(t, gamma=0.5) == pytest.approx(0.0)


@pytest.fixture
def paper_buffer(redis_url, run_name):
    buf = ReplayBuffer(redis_url, run_name, capacity=6, seed=0, priority_of="paper")
    yield buf
    buf.close()


def test_paper_priority_samples_groups_by_mean_and_keeps_prio_readable(paper_buffer):
    buf = paper_buffer
    # prompt A: values (log R + Σ ref) 1 and 3 → mean 2; prompt B: one rewrite with a *higher* log R
    # but a far less likely text under the reference → value −1: per trajectory it would win, per the paper it loses
    a = [_traj(0, "prompt A", 2.0, [-0.5, -0.5]), _traj(1, "prompt A", 4.0, [-0.5, -0.5])]
    b = [_traj(2, "prompt B", 5.0, [-3.0, -3.0])]
    buf.add(a + b)
    prio = dict(buf.client.zrange(prio_key(buf.run), 0, -1, withscores=True))
    assert prio == {t.id.encode(): t.log_reward for t in a + b}, "prio stays id → log_reward"
    assert buf.client.hget(f"pag:{buf.run}:group", a[0].id).decode() == group_of("prompt A")
    drawn = buf.sample(30000)
    share_b = sum(t.prompt == "prompt B" for t in drawn) / len(drawn)
    p_b = np.exp(-1.0) / (np.exp(-1.0) + np.exp(2.0))
    assert share_b == pytest.approx(p_b * 1 / (p_b * 1 + (1 - p_b) * 2), abs=0.01)


def test_paper_index_forgets_evicted_trajectories(paper_buffer):
    buf = paper_buffer
    low = [_traj(i, "low", -50.0, [-1.0, 0.0]) for i in range(3)]
    buf.add(low)
    buf.add([_traj(10 + i, "high", 5.0, [-1.0, 0.0]) for i in range(6)])  # capacity 6: the 'low' group is evicted
    drawn = buf.sample(200)
    assert drawn and all(t.prompt == "high" for t in drawn)
    assert buf.client.zcard(f"pag:{buf.run}:gprio") == 6 and buf.client.hlen(f"pag:{buf.run}:group") == 6


def test_group_index_counts_what_it_indexed_and_clears_both_keys(paper_buffer):
    buf, index = paper_buffer, paper_buffer._groups
    assert index.index([]) == 0
    stray = _traj(99, "never stored", 1.0, [0.0, 0.0])
    assert index.index([stray]) == 0, "an id prio does not hold is not indexed"
    kept = [_traj(i, "p", 1.0, [0.0, 0.0]) for i in range(3)]
    buf.add(kept)
    assert index.index(kept) == 3
    assert index.clear() == 2
    assert not buf.client.exists(f"pag:{buf.run}:gprio") and not buf.client.exists(f"pag:{buf.run}:group")


def test_config_key_and_from_config(redis_url, run_name):
    cfg = load_config("tiny", overrides=["buffer.priority_of=paper"])
    with ReplayBuffer.from_config(cfg.buffer, run_name, redis_url=redis_url) as buf:
        assert buf.priority_of == "paper"
    assert load_config("tiny").buffer.priority_of == "reward" and load_config("sd14").buffer.priority_of == "paper"
    sd14 = load_config("sd14").sampler  # the official micro-batch: 1 prompt x 64 rewrites (gfn_trainer.py:433-436)
    assert (sd14.prompts_per_batch, sd14.samples_per_prompt) == (1, 64)
    with pytest.raises(ValueError, match="priority_of"):
        ReplayBuffer(redis_url, run_name, priority_of="group")


def test_group_index_draws_at_its_temperature_and_drops_non_finite_values(paper_buffer):
    buf, index = paper_buffer, paper_buffer._groups
    good, bad, gone = (_traj(0, "good", 3.0, [0.0, 0.0]), _traj(1, "bad", 0.0, [0.0, 0.0]),
                       _traj(2, "gone", 1.0, [0.0, 0.0]))
    buf.add([good, bad, gone])
    gprio, group = f"pag:{buf.run}:gprio", f"pag:{buf.run}:group"
    buf.client.zadd(gprio, {gone.id: float("-inf")})  # a value that is not finite is dropped, and forgotten
    members, values = index.snapshot()
    assert members == {group_of("good"): [good.id], group_of("bad"): [bad.id]}, "str names, no -inf group"
    assert values == {group_of("good"): [3.0], group_of("bad"): [0.0]}
    assert buf.client.zscore(gprio, gone.id) is None and not buf.client.hexists(group, gone.id)
    # group means 3 and 0: P(bad) = 1 / (1 + e^3) ≈ 0.047 at T = 1, ≈ e^-60 at T = 0.05
    assert set(index.draw(2000, np.random.default_rng(0), temperature=0.05)) == {good.id}
    default = index.draw(4000, np.random.default_rng(1))
    assert default == index.draw(4000, np.random.default_rng(1), temperature=1.0), "the default temperature is 1"
    assert 0.03 < default.count(bad.id) / len(default) < 0.065
