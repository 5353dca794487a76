"""Policy passes on a tiny random GPT-2: teacher forcing vs a KV cache, padding, EOS rule, sampling,
gradients into policy and flow head, flow reactivation, and the dormant-neuron ratio."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from learner.flow import FlowHead
from learner.losses import check_finite, fl_db_loss, temper
from learner.plasticity import (
    DormantProbe, dormant_metrics, dormant_ratio, policy_mlp_activations, should_reactivate,
)
from common.decoding import ref_logprobs, sample, teacher_forced, trunk_step

torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation
V, EOS, PAD = 100, 99, 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        initializer_range=0.2, bos_token_id=EOS, eos_token_id=EOS)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def batch():
    """Three left-padded prompts (lengths 5, 2, 7) and right-padded responses (lengths 4, 6, 1)."""
    gen = torch.Generator().manual_seed(1)
    P, T = 7, 6
    prompt_ids = torch.randint(1, V - 1, (3, P), generator=gen)
    prompt_mask = torch.zeros(3, P, dtype=torch.long)
    for b, n in enumerate((5, 2, 7)):
        prompt_mask[b, P - n:] = 1
    prompt_ids[prompt_mask == 0] = PAD
    response_ids = torch.randint(1, V - 1, (3, T), generator=gen)
    response_mask = (torch.arange(T) < torch.tensor([4, 6, 1])[:, None]).long()
    response_ids[0, 3] = EOS  # row 0 ends with EOS; row 1 hits the length cap; row 2 is EOS alone
    response_ids[2, 0] = EOS
    response_ids[response_mask == 0] = PAD
    return prompt_ids, prompt_mask, response_ids, response_mask


def _kv_cache_reference(model, prompt, response, forbid_before: int):
    """One unpadded example, token by token with a KV cache: (log P_F (n,), state hidden (n, H))."""
    with torch.no_grad():
        ones = torch.ones(1, len(prompt), dtype=torch.long)
        states, cache = trunk_step(model, prompt[None], ones, torch.arange(len(prompt))[None], None)
        hidden = [states[0, -1]]
        for t, token in enumerate(response[:-1]):
            ones = torch.ones(1, len(prompt) + t + 1, dtype=torch.long)
            states, cache = trunk_step(model, token.view(1, 1), ones, torch.tensor([[len(prompt) + t]]), cache)
            hidden.append(states[0, -1])
        hidden = torch.stack(hidden)  # (n, H)
        logits = model.lm_head(hidden).float()
        logits[:forbid_before, EOS] = float("-inf")
        log_pf = torch.log_softmax(logits, -1).gather(-1, response[:, None]).squeeze(-1)
    return log_pf, hidden


@pytest.mark.parametrize("forbid_eos_first", [True, False])
def test_teacher_forcing_equals_kv_cache_token_by_token(model, batch, forbid_eos_first):
    prompt_ids, prompt_mask, response_ids, response_mask = batch
    response_ids = response_ids.clone()
    response_ids[2, 0] = 5  # keep every log-prob finite for this comparison
    with torch.no_grad():
        out = teacher_forced(model, prompt_ids, prompt_mask, response_ids, response_mask, EOS, forbid_eos_first)
    assert out["log_pf"].shape == response_ids.shape and out["state_hidden"].shape == (3, 6, 32)
    assert out["prompt_hidden"].shape == (3, 32)
    for b in range(3):
        n = int(response_mask[b].sum())
        prompt = prompt_ids[b][prompt_mask[b].bool()]
        log_pf, hidden = _kv_cache_reference(model, prompt, response_ids[b, :n], int(forbid_eos_first))
        torch.testing.assert_close(out["log_pf"][b, :n], log_pf, atol=1e-5, rtol=0)
        torch.testing.assert_close(out["state_hidden"][b, :n], hidden, atol=1e-5, rtol=0)
        assert (out["log_pf"][b, n:] == 0).all() and (out["entropy"][b, n:] == 0).all()


def test_chunked_head_equals_one_pass_in_values_entropy_and_gradients(model, batch):
    """The vocabulary head runs over chunks of steps with recomputation; nothing may change but memory."""
    prompt_ids, prompt_mask, response_ids, response_mask = batch
    response_ids = response_ids.clone()
    response_ids[2, 0] = 5  # finite everywhere, so gradients are comparable
    results = []
    for chunk, recompute in ((1, True), (4, False), (1000, False)):  # real tokens per head call
        model.zero_grad()
        out = teacher_forced(model, prompt_ids, prompt_mask, response_ids, response_mask, EOS, chunk_tokens=chunk,
                             recompute=recompute)
        (out["log_pf"].sum() + out["state_hidden"].sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((out["log_pf"].detach(), out["entropy"], grads))
    for log_pf, entropy, grads in results[:2]:
        torch.testing.assert_close(log_pf, results[-1][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(entropy, results[-1][1], atol=1e-6, rtol=1e-6)  # float32: entropy ~4, ulp 4.8e-7
        torch.testing.assert_close(grads, results[-1][2], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # entropy against an explicit softmax, EOS forbidden at step 0
        states = teacher_forced(model, prompt_ids, prompt_mask, response_ids, response_mask, EOS)["state_hidden"]
        logits = model.lm_head(states).float()
        logits[:, 0, EOS] = float("-inf")
        p = torch.softmax(logits, -1)
        explicit = -(p * torch.log_softmax(logits, -1)).nan_to_num().sum(-1) * response_mask
    torch.testing.assert_close(results[-1][1], explicit, atol=1e-5, rtol=0)
    model.zero_grad()  # gradients against an explicit full log-softmax over the same states
    states = teacher_forced(model, prompt_ids, prompt_mask, response_ids, response_mask, EOS)["state_hidden"]
    logits = model.lm_head(states).float()
    logits = logits.masked_fill((torch.arange(V) == EOS) & (torch.arange(logits.shape[1]) == 0)[:, None], float("-inf"))
    explicit_pf = torch.log_softmax(logits, -1).gather(-1, response_ids[..., None]).squeeze(-1) * response_mask
    torch.testing.assert_close(explicit_pf.detach(), results[-1][0], atol=1e-5, rtol=0)
    (explicit_pf.sum() + states.sum()).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(grads, results[0][2], atol=1e-4, rtol=1e-4)
    off = teacher_forced(model, prompt_ids, prompt_mask, response_ids, response_mask, EOS, with_entropy=False)
    assert (off["entropy"] == 0).all()
    model.zero_grad()


def test_eos_rule_in_teacher_forcing(model, batch):
    prompt_ids, prompt_mask, response_ids, response_mask = batch
    with torch.no_grad():
        strict = teacher_forced(model, prompt_ids, prompt_mask, response_ids, response_mask, EOS)
        loose = teacher_forced(model, prompt_ids, prompt_mask, response_ids, response_mask, EOS, forbid_eos_first=False)
        min3 = teacher_forced(model, prompt_ids, prompt_mask, response_ids, response_mask, EOS, min_len=4)
    assert strict["log_pf"][2, 0] == -float("inf") and not check_finite(strict["log_pf"])
    assert torch.isfinite(loose["log_pf"]).all()
    # step 0 renormalises over the non-EOS tokens, later steps are untouched
    assert (strict["log_pf"][:2, 0] > loose["log_pf"][:2, 0]).all()
    torch.testing.assert_close(strict["log_pf"][:2, 1:], loose["log_pf"][:2, 1:])
    assert min3["log_pf"][0, 3] == -float("inf")  # row 0's EOS at step 3 < min_len
    with pytest.raises(ValueError, match="LEFT-padded"):
        teacher_forced(model, prompt_ids.flip(1), prompt_mask.flip(1), response_ids, response_mask, EOS)
    with pytest.raises(ValueError, match="RIGHT-padded"):
        teacher_forced(model, prompt_ids, prompt_mask, response_ids, response_mask.flip(1), EOS)


def test_ref_logprobs_is_the_plain_model_in_one_pass(model, batch):
    prompt_ids, prompt_mask, response_ids, response_mask = batch
    ref = ref_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask)
    assert not ref.requires_grad and torch.isfinite(ref).all()
    for b in range(3):
        n = int(response_mask[b].sum())
        expected, _ = _kv_cache_reference(model, prompt_ids[b][prompt_mask[b].bool()], response_ids[b, :n], 0)
        torch.testing.assert_close(ref[b, :n], expected, atol=1e-5, rtol=0)


def _eos_biased(model, bias: float):
    """A copy of the model with `bias` added to the EOS logit, to make the EOS rule visible."""
    biased = copy.deepcopy(model)
    head = nn.Linear(32, V, bias=True)
    head.weight = biased.transformer.wte.weight  # still tied
    with torch.no_grad():
        head.bias.zero_()
        head.bias[EOS] = bias
    biased.set_output_embeddings(head)
    return biased


def _lengths(mask):
    return mask.sum(-1)


def test_sample_respects_eos_rule_and_layout(model, batch):
    prompt_ids, prompt_mask = batch[0].repeat(20, 1), batch[1].repeat(20, 1)  # (60, P)
    ids, mask = sample(_eos_biased(model, 50.0), prompt_ids, prompt_mask, max_len=10, min_len=0, temperature=1.0,
                       eos_id=EOS, generator=torch.Generator().manual_seed(0))
    assert (_lengths(mask) == 2).all() and (ids[:, 1] == EOS).all() and (ids[:, 0] != EOS).all()
    ids, mask = sample(_eos_biased(model, 50.0), prompt_ids, prompt_mask, max_len=10, min_len=3, temperature=1.0,
                       eos_id=EOS, generator=torch.Generator().manual_seed(0))
    assert (_lengths(mask) == 4).all() and (ids[:, :3] != EOS).all()

    draw = lambda seed: sample(_eos_biased(model, 3.0), prompt_ids, prompt_mask, max_len=8, min_len=2,  # noqa: E731
                               temperature=1.5, eos_id=EOS, generator=torch.Generator().manual_seed(seed))
    ids, mask = draw(0)
    n = _lengths(mask)
    assert ids.shape[1] <= 8 and (n >= 3).all()
    assert torch.equal(mask.bool(), torch.arange(ids.shape[1]) < n[:, None])  # right-padded
    assert (ids[~mask.bool()] == EOS).all()
    for row, length in zip(ids, n.tolist()):
        eos_at = (row[:length] == EOS).nonzero().flatten().tolist()
        assert eos_at in ([], [length - 1]) and (eos_at or length == 8)
    assert ((n < 8) & (n > 3)).any(), "a mix of lengths is expected with this EOS bias"
    again, _ = draw(0)
    other, _ = draw(1)
    assert torch.equal(ids, again) and not torch.equal(ids, other)


def test_greedy_sampling_follows_the_unpadded_model(model, batch):
    """At a tiny temperature the KV-cache sampler is argmax decoding: check each token against a
    plain full forward of the unpadded sequence (positions, cache and EOS rule all enter)."""
    prompt_ids, prompt_mask = batch[0], batch[1]
    ids, mask = sample(model, prompt_ids, prompt_mask, max_len=6, min_len=2, temperature=1e-4, eos_id=EOS)
    for b in range(3):
        n, prompt = int(mask[b].sum()), prompt_ids[b][prompt_mask[b].bool()]
        with torch.no_grad():
            logits = model(input_ids=torch.cat([prompt, ids[b, :n]])[None]).logits[0, len(prompt) - 1:][:n]
        logits[:2, EOS] = float("-inf")
        assert torch.equal(logits.argmax(-1), ids[b, :n])


def test_gradients_reach_policy_and_flow_head_through_one_pass(model, batch):
    prompt_ids, prompt_mask, response_ids, response_mask = batch
    response_ids = response_ids.clone()
    response_ids[2, 0] = 5
    head = FlowHead(32, 16)
    model.zero_grad()
    out = teacher_forced(model, prompt_ids, prompt_mask, response_ids, response_mask, EOS)
    log_flow = head(out["state_hidden"], out[head.prompt_input])
    ref, terminal = temper(torch.full(response_ids.shape, -2.0), torch.tensor([1.0, -1.0, 0.5]), response_mask,
                           gamma=1.0, tau=1.5)
    loss = fl_db_loss(out["log_pf"], log_flow, ref, terminal, response_mask)
    loss.backward()
    for name, p in [*model.named_parameters(), *head.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    # the head reads detached hidden states: a flow-only loss leaves the policy untouched
    model.zero_grad(set_to_none=True)
    head(out["state_hidden"], out[head.prompt_input]).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_official_flow_head_is_flowfunction_on_the_prompt_summed_but_its_last_token(model, batch):
    """gfn_trainer.py:25-41 and 300-311: the prompt input is Σ of the final hidden states of x without its
    last token (a separate forward there; causal attention makes it the same numbers), then
    log F(s_t) = W2 · (scale ⊙ ReLU(W1 h_t) + shift), scale and shift from the summed prompt; and the
    prompt modulates the flow from the first step (random FiLM init)."""
    import torch.nn.functional as F

    prompt_ids, prompt_mask, response_ids, response_mask = batch
    torch.manual_seed(0)
    head = FlowHead(32, 16)
    assert head.kind == "official" and head.prompt_input == "prompt_sum"
    with torch.no_grad():
        out = teacher_forced(model, prompt_ids, prompt_mask, response_ids, response_mask, EOS)
        log_flow = head(out["state_hidden"], out["prompt_sum"])
        for b in range(prompt_ids.shape[0]):
            x = prompt_ids[b][prompt_mask[b].bool()]
            y = model.base_model(input_ids=x[None, :-1]).last_hidden_state[0].sum(0)
            assert torch.allclose(out["prompt_sum"][b], y, atol=1e-5)
            scale, shift = F.linear(y, head.film.weight, head.film.bias).chunk(2)
            hid = F.relu(F.linear(out["state_hidden"][b], head.inp.weight, head.inp.bias))
            expected = F.linear(scale * hid + shift, head.out.weight, head.out.bias).squeeze(-1)
            assert torch.allclose(log_flow[b], expected, atol=1e-5)
        other = head(out["state_hidden"], out["prompt_sum"].roll(1, 0))
    assert not torch.allclose(log_flow, other), "the prompt modulates the flow at init"
    with pytest.raises(ValueError, match="learner.flow_head must be one of"):
        FlowHead(32, 16, "mlp")


def test_film_flow_head_prompt_conditioning_and_reactivation():
    torch.manual_seed(0)
    head = FlowHead(8, 16, "film")
    with torch.no_grad():
        start = head(torch.randn(2, 5, 8), torch.zeros(2, 8))
    assert head.prompt_input == "prompt_hidden" and start.shape == (2, 5)
    states = torch.randn(2, 5, 8)
    with torch.no_grad():
        head.film.weight.normal_()
        a = head(states, torch.randn(2, 8))
        b = head(states, torch.randn(2, 8))
    assert a.shape == (2, 5) and not torch.allclose(a, b)  # the prompt modulates the flow

    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    head(states, torch.randn(2, 8)).sum().backward()
    optimizer.step()
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    head.reinit_last_layer(optimizer, init="default")
    for name, p in head.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == name.startswith("out."), name
        assert (p in optimizer.state) == (not name.startswith("out.")), name


def test_dormant_ratio_known_answer():
    torch.manual_seed(0)
    acts = torch.randn(1000, 4).abs() * torch.tensor([1.0, 1.0, 1.0, 0.05])  # s = (1.3, 1.3, 1.3, 0.07)
    assert dormant_ratio(acts, tau=0.1) == 0.25
    half = torch.randn(1000, 4).abs() * torch.tensor([1.0, 1.0, 1.0, 0.4])  # s ≈ (1.18, 1.18, 1.18, 0.47)
    assert dormant_ratio(half) == 0.0 and dormant_ratio(half, tau=0.5) == 0.25, "tau defaults to the paper's 0.1"
    assert dormant_ratio(acts, tau=0.01) == 0.0
    # padding rows would wake the dormant unit up if they counted
    padded = torch.cat([acts, torch.full((1000, 4), 50.0)]).reshape(2, 1000, 4)
    keep = torch.tensor([[True] * 1000, [False] * 1000])
    assert dormant_ratio(padded, 0.1, keep) == 0.25 and dormant_ratio(padded, 0.1) == 0.0
    assert dormant_ratio(torch.zeros(10, 3)) == 1.0


def test_dormant_ratio_is_scale_free_dormant_at_tau_itself_and_nan_without_rows():
    torch.manual_seed(0)
    acts = torch.randn(1000, 4).abs() * torch.tensor([1.0, 1.0, 1.0, 0.05])
    assert dormant_ratio(acts * 10, tau=0.1) == dormant_ratio(acts / 10, tau=0.1) == 0.25, "s_i = E|h_i| / mean_j"
    exact = torch.tensor([[0.25, 1.75, 1.0, 1.0]])  # one row, s = (0.25, 1.75, 1, 1) exactly in binary
    assert dormant_ratio(exact, tau=0.25) == 0.25, "a unit at s_i = tau is dormant (s_i <= tau), one row counts"
    assert math.isnan(dormant_ratio(acts, mask=torch.zeros(1000, dtype=torch.bool))), "no row counted: no ratio"


def test_dormant_metrics_leave_out_a_flow_head_the_forward_never_ran(model, batch):
    prompt_ids, prompt_mask, response_ids, response_mask = batch
    with torch.no_grad():
        metrics = dormant_metrics(model, FlowHead(32, 16), lambda: teacher_forced(
            model, prompt_ids, prompt_mask, response_ids, response_mask, EOS))
    assert "plasticity/flow_dormant" not in metrics and "plasticity/policy_dormant" in metrics


def test_dormant_metrics_on_policy_and_flow_head(model, batch):
    prompt_ids, prompt_mask, response_ids, response_mask = batch
    head = FlowHead(32, 16)

    def forward():
        out = teacher_forced(model, prompt_ids, prompt_mask, response_ids, response_mask, EOS)
        head(out["state_hidden"], out[head.prompt_input])

    with torch.no_grad():
        metrics = dormant_metrics(model, head, forward, tau=0.1, flow_mask=response_mask,
                                  policy_mask=torch.cat([prompt_mask, response_mask], 1))
        assert set(metrics) == {"plasticity/flow_dormant", "plasticity/policy_dormant",
                                "plasticity/policy_dormant/layer0", "plasticity/policy_dormant/layer1"}
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
        head.inp.bias.fill_(-1e3)  # every ReLU unit of the head is dead
        assert dormant_metrics(model, head, forward)["plasticity/flow_dormant"] == 1.0

    # a probe accumulates over micro-batches and removes its hooks on exit
    with DormantProbe(policy_mlp_activations(model)) as probe, torch.no_grad():
        forward()
        forward()
    assert set(probe.ratios()) == {"policy_mlp0", "policy_mlp1"}
    assert probe._sums["policy_mlp0"][1] == 2 * 3 * (7 + 6)
    assert all(not m._forward_hooks for m in policy_mlp_activations(model).values())
    with DormantProbe(policy_mlp_activations(model)) as once, torch.no_grad():
        forward()
    torch.testing.assert_close(probe._sums["policy_mlp0"][0], 2 * once._sums["policy_mlp0"][0])  # Σ|h| adds up
    mask = torch.cat([prompt_mask, response_mask], 1)
    with DormantProbe(policy_mlp_activations(model), masks={"policy_mlp0": mask}) as masked, torch.no_grad():
        forward()
    assert masked._sums["policy_mlp0"][1] == mask.sum() < 3 * (7 + 6), "padding is not counted"
    assert masked._sums["policy_mlp1"][1] == 3 * (7 + 6), "a module without a mask counts every position"


def test_dormant_metrics_are_the_probes_ratios_under_both_masks(model, batch):
    prompt_ids, prompt_mask, response_ids, response_mask = batch
    head, policy_mask = FlowHead(32, 16), torch.cat([prompt_mask, response_mask], 1)

    def forward():
        out = teacher_forced(model, prompt_ids, prompt_mask, response_ids, response_mask, EOS)
        head(out["state_hidden"], out[head.prompt_input])

    def probed(masks, tau):
        modules = {"flow": head.act, **policy_mlp_activations(model)}
        with DormantProbe(modules, masks) as probe:
            forward()
        return probe.ratios(tau)

    with torch.no_grad():
        got = dormant_metrics(model, head, forward, tau=0.6, policy_mask=policy_mask, flow_mask=response_mask)
        want = probed({"flow": response_mask, "policy_mlp0": policy_mask, "policy_mlp1": policy_mask}, 0.6)
        assert want != probed({}, 0.6), "padding changes the ratios at this tau: the masks are checked"
        assert got == pytest.approx({"plasticity/flow_dormant": want["flow"],
                                     "plasticity/policy_dormant": (want["policy_mlp0"] + want["policy_mlp1"]) / 2,
                                     "plasticity/policy_dormant/layer0": want["policy_mlp0"],
                                     "plasticity/policy_dormant/layer1": want["policy_mlp1"]})
        default, at_tenth = probed({}, 0.1), dormant_metrics(model, head, forward, tau=0.1)
        assert dormant_metrics(model, head, forward) == at_tenth and default != probed({}, 1.1)
        with DormantProbe({"flow": head.act}) as probe:
            forward()
        assert probe.ratios() == probe.ratios(0.1) == {"flow": default["flow"]}, "tau defaults to 0.1"
        with pytest.raises(ValueError, match=r"^mask shape \(3, 5\) does not match activations \(3, 6\)$"):
            with DormantProbe({"flow": head.act}, {"flow": response_mask[:, :-1]}):
                forward()


def test_policy_mlp_activations_needs_gpt2_blocks():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match=r"^Linear has no transformer.h blocks; expected a GPT-2 style model$"):
        policy_mlp_activations(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"^SimpleNamespace has no transformer.h blocks"):
        policy_mlp_activations(SimpleNamespace(transformer=SimpleNamespace()))


def test_should_reactivate():
    assert not should_reactivate(0, 2000) and should_reactivate(2000, 2000) and not should_reactivate(2001, 2000)
    assert not should_reactivate(2000, 0)
    assert should_reactivate(7, 2000, dormant=0.4, threshold=0.3)
    assert not should_reactivate(7, 2000, dormant=0.2, threshold=0.3)
    assert not should_reactivate(7, 2000, dormant=0.9, threshold=None)
    assert should_reactivate(1, 1) and should_reactivate(2, 1), "every step"
    assert not should_reactivate(7, 2000, dormant=0.3, threshold=0.3), "passes the threshold: strictly above"
