"""The objectives against brute force, their special cases, gradients, masking and schedules."""
from __future__ import annotations

import math

import pytest
import torch

from learner import losses
from learner.losses import (
    check_finite, db_residuals, fl_db_residuals, gflownet_loss, min_length_penalty, reinforce_loss,
    tb_residuals, temper,
)
from common.schedules import (
    Anneal, Schedules, exponential_anneal, linear_anneal, reference_temperature, reward_temperature,
    sampling_temperature,
)
from bench.toy import build_problem

torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation


def _random_batch(seed: int = 0, lengths=(1, 3, 5, 2)):
    gen = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    mask = torch.arange(T) < torch.tensor(lengths)[:, None]
    log_pf = -torch.rand(B, T, generator=gen) * 3
    log_flow = torch.randn(B, T, generator=gen)
    ref = -torch.rand(B, T, generator=gen) * 2
    terminal = torch.randn(B, generator=gen)
    return log_pf, log_flow, ref, terminal, mask


def _fl_db_loop(log_pf, log_flow, ref, terminal, mask):
    """δ_t written out one step at a time, straight from the definition."""
    out = torch.zeros_like(log_pf)
    for b in range(log_pf.shape[0]):
        n = int(mask[b].sum())
        for t in range(n):
            nxt = terminal[b] if t == n - 1 else log_flow[b, t + 1]
            out[b, t] = log_flow[b, t] + log_pf[b, t] - ref[b, t] - nxt
    return out


# ---------------------------------------------------------------- against the definition

def test_fl_db_matches_step_by_step_definition():
    batch = _random_batch()
    torch.testing.assert_close(fl_db_residuals(*batch), _fl_db_loop(*batch))


def test_residuals_are_zero_on_padding_even_with_nan_there():
    log_pf, log_flow, ref, terminal, mask = _random_batch()
    for x in (log_pf, log_flow, ref):
        x[~mask] = float("nan")
    log_pf.requires_grad_(True)
    log_flow.requires_grad_(True)
    for residuals in (fl_db_residuals(log_pf, log_flow, ref, terminal, mask),
                      db_residuals(log_pf, log_flow, ref, terminal, mask)):
        assert check_finite(residuals)
        assert (residuals[~mask] == 0).all()
    loss = losses.fl_db_loss(log_pf, log_flow, ref, terminal, mask) + losses.tb_loss(
        log_flow[:, 0], log_pf, ref, terminal, mask)
    loss.backward()
    assert check_finite(loss, log_pf.grad, log_flow.grad)
    assert (log_pf.grad[~mask] == 0).all() and (log_flow.grad[~mask] == 0).all()


def test_shapes_and_mask_layout_are_checked():
    log_pf, log_flow, ref, terminal, mask = _random_batch()
    with pytest.raises(ValueError, match="log_flow"):
        fl_db_residuals(log_pf, log_flow[:, :-1], ref, terminal, mask)
    with pytest.raises(ValueError, match="log_reward_terminal"):
        fl_db_residuals(log_pf, log_flow, ref, terminal[:-1], mask)
    holes = mask.clone()
    holes[2, 1] = False  # a gap in the middle of a trajectory
    with pytest.raises(ValueError, match="left-aligned"):
        fl_db_residuals(log_pf, log_flow, ref, terminal, holes)
    empty = mask.clone()
    empty[0] = False
    with pytest.raises(ValueError, match="no valid step"):
        fl_db_residuals(log_pf, log_flow, ref, terminal, empty)
    with pytest.raises(ValueError, match="unknown objective"):
        gflownet_loss("subtb", log_pf, log_flow, ref, terminal, mask)


def _shape_errors():
    log_pf, log_flow, ref, terminal, mask = _random_batch()
    r = torch.zeros(4)
    return [
        ("^ref_logprobs has shape", lambda: db_residuals(log_pf, log_flow, ref[:, :-1], terminal, mask)),
        (r"^log_pf has shape \(4,\); expected \(B, T\)", lambda: tb_residuals(r, log_pf[:, 0], ref, terminal, mask)),
        ("^ref_logprobs has shape", lambda: tb_residuals(r, log_pf, ref[:, :-1], terminal, mask)),
        ("^log_z has shape", lambda: tb_residuals(r[:-1], log_pf, ref, terminal, mask)),
        ("^log_reward_terminal has shape", lambda: tb_residuals(r, log_pf, ref, terminal[:-1], mask)),
        (r"^log_pf has shape \(4,\); expected \(B, T\)", lambda: reinforce_loss(log_pf[:, 0], r, mask)),
        ("^reward has shape", lambda: reinforce_loss(log_pf, r[:-1], mask)),
        ("^ref_logprobs has shape", lambda: reinforce_loss(log_pf, r, mask, ref_logprobs=ref[:, :-1], kl_coef=0.1)),
        ("^reinforce_loss: kl_coef > 0 needs ref_logprobs$", lambda: reinforce_loss(log_pf, r, mask, kl_coef=0.1)),
        (r"^log_pf has shape \(4,\); expected \(B, T\)",
         lambda: fl_db_residuals(log_pf[:, 0], log_flow, ref, terminal, mask)),
        ("^log_flow has shape", lambda: fl_db_residuals(log_pf, log_flow[:, :-1], ref, terminal, mask)),
        ("^ref_logprobs has shape", lambda: fl_db_residuals(log_pf, log_flow, ref[:, :-1], terminal, mask)),
        ("^log_reward_terminal has shape", lambda: fl_db_residuals(log_pf, log_flow, ref, terminal[:-1], mask)),
        ("^unknown objective 'subtb'; choose one of fl-db, db, tb$",
         lambda: gflownet_loss("subtb", log_pf, log_flow, ref, terminal, mask)),
    ]


@pytest.mark.parametrize("case", range(14))
def test_every_shape_error_names_the_argument(case):
    """The message starts with the argument's exact name (a user reads which tensor is wrong)."""
    pattern, call = _shape_errors()[case]
    with pytest.raises(ValueError, match=pattern):
        call()


def test_fl_db_residuals_keep_log_flows_dtype_with_a_float64_reward():
    log_pf, log_flow, ref, terminal, mask = _random_batch()
    assert fl_db_residuals(log_pf, log_flow, ref, terminal.double(), mask).dtype == log_flow.dtype == torch.float32


@pytest.mark.parametrize("objective", ["fl-db", "db", "tb"])
def test_loss_is_the_batch_mean_of_each_trajectorys_squared_residuals(objective):
    """L = (1/B) Σ_b Σ_t δ_bt² (TB: (1/B) Σ_b δ_b²), summed by hand; B = 4 ≠ T = 5 so no axis can stand in
    for the other."""
    log_pf, log_flow, ref, terminal, mask = _random_batch()
    if objective == "tb":
        delta = tb_residuals(log_flow[:, 0], log_pf, ref, terminal, mask)
        want = sum(float(d) ** 2 for d in delta) / 4
    else:
        fn = fl_db_residuals if objective == "fl-db" else db_residuals
        delta = fn(log_pf, log_flow, ref, terminal, mask)
        want = sum(sum(float(delta[b, t]) ** 2 for t in range(5)) for b in range(4)) / 4
    assert float(gflownet_loss(objective, log_pf, log_flow, ref, terminal, mask)) == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------- special cases and identities

def test_fl_db_with_zero_reference_is_db():
    log_pf, log_flow, _, terminal, mask = _random_batch(1)
    zero = torch.zeros_like(log_pf)
    torch.testing.assert_close(fl_db_residuals(log_pf, log_flow, zero, terminal, mask),
                               db_residuals(log_pf, log_flow, zero, terminal, mask))


def test_db_is_fl_db_with_the_reference_moved_into_the_flow():
    """log F̃(s_t) = log F(s_t) − Σ_{i<t} ref_i turns DB residuals into FL-DB residuals, step by step."""
    log_pf, log_flow_db, ref, terminal, mask = _random_batch(2)
    ref_before = torch.cumsum(torch.where(mask, ref, 0), dim=1) - torch.where(mask, ref, 0)  # Σ_{i<t}
    fl = fl_db_residuals(log_pf, log_flow_db - ref_before, ref, terminal, mask)
    db = db_residuals(log_pf, log_flow_db, ref, terminal, mask)
    torch.testing.assert_close(fl, db)
    assert not torch.allclose(fl, fl_db_residuals(log_pf, log_flow_db, ref, terminal, mask))


def test_fl_db_residuals_telescope_to_tb_with_log_z_the_initial_flow():
    log_pf, log_flow, ref, terminal, mask = _random_batch(3)
    torch.testing.assert_close(fl_db_residuals(log_pf, log_flow, ref, terminal, mask).sum(-1),
                               tb_residuals(log_flow[:, 0], log_pf, ref, terminal, mask))


# ---------------------------------------------------------------- balance on an enumerable problem

@pytest.fixture(scope="module")
def balanced():
    """The exact balanced policy and flows of a 340-sequence problem, built by brute-force sums."""
    problem = build_problem(seed=3)
    gamma, tau = 0.8, 1.7
    problem.gamma = gamma
    mask = problem.mask
    ref, terminal = temper(problem.ref_logprobs().double(), problem.log_reward().double(), mask, gamma=gamma, tau=tau)
    log_r = ref.sum(-1) + terminal  # (N,) log of the tempered unnormalised target
    states = torch.where(mask, problem.states, -1)
    S = problem.num_states

    def sum_over_states(weights):  # Σ over the sequences passing through each state, (S,)
        out = torch.zeros(S, dtype=torch.float64)
        valid = states >= 0
        out.index_add_(0, states[valid], weights[valid].double())
        return out

    # DB flow F(s) = Σ_{y ∋ s} R(y); forward-looking F̃(s_t) = Σ_{y ∋ s_t} exp(Σ_{i≥t} ref_i + terminal)
    log_F = sum_over_states(log_r.double().exp()[:, None].expand_as(mask)).log()
    suffix = torch.flip(torch.cumsum(torch.flip(torch.where(mask, ref, 0), [1]), 1), [1]) + terminal[:, None]
    log_F_fl = sum_over_states(suffix.double().exp()).log()
    # P_F*(a | s) as a table, from child flows: F(child)/F(s), and R(y)/F(s) for EOS
    child = torch.cat([states[:, 1:], torch.full_like(states[:, :1], -1)], 1)
    is_last = torch.arange(mask.shape[1]) == mask.sum(-1, keepdim=True) - 1
    log_child = torch.where(is_last, log_r[:, None].double(), log_F[child.clamp(min=0)])
    table = torch.full((S, problem.allowed.shape[1]), -math.inf, dtype=torch.float64)
    table[states[mask], problem.actions[mask]] = (log_child - log_F[states.clamp(min=0)])[mask]
    log_pf = torch.where(mask, table[states.clamp(min=0), problem.actions], 0.0)
    return dict(problem=problem, mask=mask, ref=ref.double(), terminal=terminal.double(), log_r=log_r.double(),
                table=table, log_pf=log_pf, log_F=log_F[states.clamp(min=0)], log_F_fl=log_F_fl[states.clamp(min=0)])


def test_brute_force_balanced_policy_is_normalised_and_samples_the_target(balanced):
    table, problem = balanced["table"], balanced["problem"]
    torch.testing.assert_close(torch.logsumexp(table, -1), torch.zeros(len(table), dtype=torch.float64))
    log_target = balanced["log_r"] - torch.logsumexp(balanced["log_r"], 0)
    torch.testing.assert_close(balanced["log_pf"].sum(-1), log_target)
    assert (table.exp()[~problem.allowed] == 0).all()


def test_all_residuals_vanish_at_balance_and_not_elsewhere(balanced):
    b = balanced
    args = (b["log_pf"], b["ref"], b["terminal"], b["mask"])
    fl = fl_db_residuals(b["log_pf"], b["log_F_fl"], *args[1:])
    db = db_residuals(b["log_pf"], b["log_F"], *args[1:])
    log_z = torch.logsumexp(b["log_r"], 0).expand(len(b["log_r"]))
    tb = tb_residuals(log_z, *args)
    for residuals in (fl, db, tb):
        assert residuals.abs().max() < 1e-9
    # the DB flow is not balanced for FL-DB (the reference energy would be counted twice), and vice versa
    assert fl_db_residuals(b["log_pf"], b["log_F"], *args[1:]).abs().max() > 0.1
    assert db_residuals(b["log_pf"], b["log_F_fl"], *args[1:]).abs().max() > 0.1
    # perturbing one state's flow breaks exactly the two steps that touch it
    row = int(b["mask"].sum(-1).argmax())  # a trajectory with all 5 steps
    bumped = b["log_F_fl"].clone()
    bumped[row, 2] += 0.3
    bad = fl_db_residuals(b["log_pf"], bumped, *args[1:])
    torch.testing.assert_close(bad[row, 1:3], torch.tensor([-0.3, 0.3], dtype=torch.float64))
    assert bad[row, [0, 3, 4]].abs().max() < 1e-9


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("objective", losses.OBJECTIVES)
def test_gradients_reach_every_estimator(objective):
    log_pf, log_flow, ref, terminal, mask = _random_batch(4)
    log_pf.requires_grad_(True)
    log_flow.requires_grad_(True)
    loss = gflownet_loss(objective, log_pf, log_flow, ref, terminal, mask)
    loss.backward()
    assert check_finite(loss) and loss > 0
    assert (log_pf.grad[mask] != 0).all()
    if objective == "tb":  # log Z(x) = log F̃(s_0): only the initial flow gets a gradient
        assert (log_flow.grad[:, 0] != 0).all() and (log_flow.grad[:, 1:] == 0).all()
    else:
        assert (log_flow.grad[mask] != 0).all()
    assert (log_pf.grad[~mask] == 0).all() and (log_flow.grad[~mask] == 0).all()


def test_nonfinite_loss_is_returned_and_detected():
    log_pf, log_flow, ref, terminal, mask = _random_batch(5)
    log_pf[1, 0] = -float("inf")  # e.g. an EOS where the policy forbids it
    loss = losses.fl_db_loss(log_pf, log_flow, ref, terminal, mask)
    assert not check_finite(loss)
    assert check_finite(torch.ones(3), torch.zeros(2)) and not check_finite(torch.tensor([1.0, float("nan")]))


# ---------------------------------------------------------------- reward maximisation

def test_reinforce_pushes_up_the_rewarded_trajectory():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    log_pf = torch.full((2, 3), -1.0, requires_grad=True)
    loss = reinforce_loss(log_pf, torch.tensor([1.0, 0.0]), mask)
    loss.backward()
    # advantage ±0.5 around the batch mean, loss −mean(A · log P(y))
    assert float(loss.detach()) == pytest.approx(-(0.5 * -2.0 + -0.5 * -3.0) / 2)
    assert (log_pf.grad[0, :2] < 0).all() and (log_pf.grad[1] > 0).all() and log_pf.grad[0, 2] == 0


def test_reinforce_kl_penalty_shapes_the_reward():
    mask = torch.ones(2, 2, dtype=torch.bool)
    log_pf = torch.tensor([[-0.1, -0.1], [-2.0, -2.0]], requires_grad=True)
    ref = torch.full((2, 2), -1.0)
    # same raw reward; the first trajectory drifted above the reference, so it is penalised
    loss = reinforce_loss(log_pf, torch.zeros(2), mask, ref_logprobs=ref, kl_coef=1.0)
    loss.backward()
    assert log_pf.grad[0, 0] > 0 and log_pf.grad[1, 0] < 0
    with pytest.raises(ValueError, match="ref_logprobs"):
        reinforce_loss(log_pf, torch.zeros(2), mask, kl_coef=1.0)


def test_reinforce_batch_of_one_has_no_baseline_and_kl_shapes_by_the_log_ratio():
    mask = torch.ones(1, 2, dtype=torch.bool)
    log_pf = torch.tensor([[-1.0, -2.0]])
    # B = 1: b = 0, A = r, L = −r · log P(y) = −2 · (−3)
    assert float(reinforce_loss(log_pf, torch.tensor([2.0]), mask)) == pytest.approx(6.0)
    # A_i = r_i − c (log P_i − log P_ref,i) − mean_j(·), by hand with c = 0.5
    log_pf = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]])
    ref = torch.tensor([[-2.0, -2.0], [-1.0, -1.5]])  # log-ratios 1 and 1.5: the penalty differs
    shaped = [1.0 - 0.5 * (-3.0 - -4.0), 3.0 - 0.5 * (-1.0 - -2.5)]
    mean = sum(shaped) / 2
    want = -((shaped[0] - mean) * -3.0 + (shaped[1] - mean) * -1.0) / 2
    got = reinforce_loss(log_pf, torch.tensor([1.0, 3.0], dtype=torch.float64), mask.expand(2, 2), ref_logprobs=ref,
                         kl_coef=0.5)
    assert float(got) == pytest.approx(want) and got.dtype == torch.float32, "the reward is cast to log P_F's dtype"


# ---------------------------------------------------------------- tempering, length penalty, schedules

def test_temper_divides_and_penalises_short_responses():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    raw = torch.tensor([[-1.0, -2.0, -3.0, 9.0], [-1.0, -1.0, -1.0, -1.0]])
    ref, terminal = temper(raw, torch.tensor([4.0, 4.0]), mask, gamma=0.5, tau=2.0, min_len=3, len_penalty=1.5)
    torch.testing.assert_close(ref, torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-1.0, -1.0, -1.0, -1.0]]))
    # row 0: 2 tokens before EOS, 1 short of min_len → (4 − 1.5) / 2; row 1: 3 tokens, no penalty
    torch.testing.assert_close(terminal, torch.tensor([1.25, 2.0]))
    torch.testing.assert_close(min_length_penalty(torch.tensor([0, 5, 9]), 5, 0.5), torch.tensor([-2.5, 0.0, 0.0]))


def test_temper_refuses_a_temperature_that_is_not_positive_and_checks_the_reward_shape():
    mask, raw, reward = torch.ones(2, 3).bool(), torch.zeros(2, 3), torch.tensor([1.0, 2.0])
    for gamma, tau in ((0.0, 1.0), (1.0, 0.0), (-1.0, 1.0), (1.0, -1.0)):
        with pytest.raises(ValueError, match=rf"^gamma \({gamma}\) and tau \({tau}\) must be positive$"):
            temper(raw, reward, mask, gamma=gamma, tau=tau)
    _, terminal = temper(raw, reward, mask, gamma=0.5, tau=0.5)  # below 1 is fine
    torch.testing.assert_close(terminal, torch.tensor([2.0, 4.0]))
    with pytest.raises(ValueError, match=r"^log_reward "):
        temper(raw, torch.tensor([1.0, 2.0, 3.0]), mask, gamma=1.0, tau=1.0)


def test_schedules():
    assert sampling_temperature(0) == 2.0 and sampling_temperature(5000) == 0.5 and sampling_temperature(10**6) == 0.5
    assert sampling_temperature(2500) == pytest.approx(1.25)
    assert reward_temperature(0) == 2.0 and reward_temperature(9999) == 1.0
    assert reward_temperature(2500) == pytest.approx(1.5)
    assert linear_anneal(7, 3.0, 1.0, 0) == 1.0
    assert exponential_anneal(50, 4.0, 1.0, 100) == pytest.approx(2.0)
    assert Anneal(2.0, 1.0, 10, "constant")(5) == 2.0
    with pytest.raises(ValueError, match="positive"):
        exponential_anneal(1, 0.0, 1.0, 10)
    with pytest.raises(ValueError, match="positive"):
        exponential_anneal(1, 1.0, 0.0, 10)
    assert exponential_anneal(50, 0.5, 2.0, 100) == pytest.approx(1.0), "a start below 1 is a valid start"
    # the kind reaches the schedule; γ is 1 unless given
    assert sampling_temperature(2500, kind="exponential") == pytest.approx(1.0)
    assert reward_temperature(2500, 4.0, 1.0, 5000, kind="exponential") == pytest.approx(2.0)
    assert reference_temperature(3) == 1.0 and reference_temperature(3, 1.7) == 1.7
    assert linear_anneal(0, 2.0, 1.0, 1) == 2.0 and linear_anneal(1, 2.0, 1.0, 1) == 1.0, "a one-step anneal"
    assert linear_anneal(0, 2.0, 1.0, 0) == 1.0, "no anneal: the end value from the start"


def test_schedules_from_config():
    from common.config import load_config

    cfg = load_config("sd14", overrides=["learner.ref_temp=0.7"])
    schedules = Schedules.from_config(cfg)
    expected = {"sampling_temperature": 1.25, "reward_temperature": 1.0, "reference_temperature": 0.7}
    assert schedules.at(2500) == pytest.approx(expected)  # τ reached 1 at the official horizon, 500 steps
    assert schedules.at(250)["reward_temperature"] == pytest.approx(1.5)


def test_mask_errors_say_exactly_what_is_wrong():
    """The messages name the shapes, the empty rows by index, and the layout expected."""
    log_pf, log_flow, ref, terminal, mask = _random_batch()
    B, T = log_pf.shape
    with pytest.raises(ValueError, match=rf"^mask has shape \({B}, {T - 1}\); expected \({B}, {T}\) like log_pf$"):
        fl_db_residuals(log_pf, log_flow, ref, terminal, mask[:, :-1])
    empty = mask.clone()
    empty[1] = False
    empty[3] = False
    with pytest.raises(ValueError, match=r"^mask rows \[1, 3\] have no valid step$"):
        fl_db_residuals(log_pf, log_flow, ref, terminal, empty)
    holes = mask.clone()
    holes[2, 1] = False
    with pytest.raises(ValueError, match=r"^mask must be left-aligned: 1 for steps 0\.\.len-1, then 0 \(right padding\)$"):
        fl_db_residuals(log_pf, log_flow, ref, terminal, holes)


def test_unknown_schedule_kind_names_the_choices():
    with pytest.raises(ValueError, match="^unknown schedule kind 'cosine'; choose linear, exponential or constant$"):
        Anneal(2.0, 1.0, 10, "cosine")(3)
