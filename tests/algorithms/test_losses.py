"""KL estimators, the policy-gradient loss variants, the clipped value loss and micro-batch weighting,
each against hand values or a plain nested-loop reference written from the definitions (TRL's GRPO trainer)."""

from __future__ import annotations

import math

import pytest
import torch

from algorithms.losses import (
    LOSS_TYPES,
    SURROGATES,
    SurrogateParams,
    accumulation_weight,
    cispo_surrogate,
    clipped_surrogate,
    kl_estimate,
    policy_loss,
    sapo_surrogate,
    token_loss_weights,
    value_loss,
)

F64 = torch.float64


# ---------------------------------------------------------------- kl_estimate


def test_kl_estimate_hand_values():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # log pi/ref = log 2
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([math.log(2)]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), torch.tensor([0.5 * math.log(2) ** 2]))
    # ref/pi - 1 - log(ref/pi) = 0.5 - 1 + log 2
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), torch.tensor([0.5 - 1 + math.log(2)]))
    # the other direction: pi = .25, ref = .5 -> ref/pi = 2
    torch.testing.assert_close(kl_estimate(ref, logp, "k1"), torch.tensor([-math.log(2)]))
    torch.testing.assert_close(kl_estimate(ref, logp, "k3"), torch.tensor([2 - 1 - math.log(2)]))


def test_kl_estimate_default_kind_is_k3():
    logp, ref = torch.tensor([-0.3, -2.0]), torch.tensor([-1.0, -0.1])
    torch.testing.assert_close(kl_estimate(logp, ref), kl_estimate(logp, ref, "k3"))


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimate_is_zero_when_policies_agree(kind):
    logp = -torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) * 5
    assert torch.equal(kl_estimate(logp, logp.clone(), kind), torch.zeros(4, 6))


@pytest.mark.parametrize("kind", ["k2", "k3"])
def test_kl_estimate_k2_k3_are_nonnegative_on_random_inputs(kind):
    gen = torch.Generator().manual_seed(1)
    logp, ref = -torch.rand(1000, generator=gen) * 10, -torch.rand(1000, generator=gen) * 10
    assert (kl_estimate(logp, ref, kind) >= 0).all()


def test_kl_estimate_keeps_shape_and_gradient():
    logp = torch.randn(2, 3, requires_grad=True)
    kl = kl_estimate(logp, torch.zeros(2, 3), "k3")
    assert kl.shape == (2, 3)
    kl.sum().backward()
    # d/dx [exp(-x) - 1 + x] = 1 - exp(-x)
    torch.testing.assert_close(logp.grad, 1 - torch.exp(-logp.detach()))


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_kl_estimate_k1_k3_are_unbiased_monte_carlo_estimates(kind):
    pi = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=F64)
    ref = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=F64)
    true_kl = (pi * (pi.log() - ref.log())).sum()
    samples = torch.multinomial(pi, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = kl_estimate(pi.log()[samples], ref.log()[samples], kind).mean()
    assert abs(estimate.item() - true_kl.item()) < 0.02


def test_kl_estimate_k2_is_close_but_biased_for_nearby_policies():
    # k2's expectation is 0.5 E[(log pi/ref)^2], close to KL when pi ~ ref
    pi = torch.tensor([0.26, 0.25, 0.25, 0.24], dtype=F64)
    ref = torch.full((4,), 0.25, dtype=F64)
    exact_k2 = (pi * 0.5 * (pi.log() - ref.log()) ** 2).sum()
    true_kl = (pi * (pi.log() - ref.log())).sum()
    assert abs(exact_k2 - true_kl) < 1e-4


def test_kl_estimate_rejects_unknown_kind_naming_the_choices():
    with pytest.raises(ValueError) as err:
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")
    for choice in ("k1", "k2", "k3"):
        assert choice in str(err.value)


# ---------------------------------------------------------------- policy_loss: loop reference


def reference_policy_loss(
    logp, old_logp, adv, mask, clip_low, clip_high, loss_type, kl=None, beta=0.0, max_len=None, num_tokens=None
):
    """Nested loops over sequences and tokens, straight from the definitions; differentiable in logp."""
    B, T = len(mask), len(mask[0])

    def a(i, t):
        return adv[i] if adv.dim() == 1 else adv[i, t]

    def real(i):
        return [t for t in range(T) if mask[i][t]]

    seq_log_ratio = []  # gspo: each sequence's mean log-ratio, detached (GSPO-token: sg(s_i) pi_t / sg(pi_t))
    for i in range(B):
        toks = real(i)
        total = 0.0
        for t in toks:
            total = total + (logp[i, t] - old_logp[i, t]).detach()
        seq_log_ratio.append(total / max(len(toks), 1))

    per_token = {}
    low_count = high_count = 0
    for i in range(B):
        for t in real(i):
            if loss_type == "gspo":
                log_ratio = seq_log_ratio[i] + logp[i, t] - logp[i, t].detach()
            else:
                log_ratio = logp[i, t] - old_logp[i, t]
            r = torch.exp(log_ratio)
            clipped = torch.clamp(r, 1 - clip_low, 1 + clip_high)
            term = -torch.minimum(r * a(i, t), clipped * a(i, t))
            if kl is not None:
                term = term + beta * kl[i, t]
            per_token[i, t] = term
            low_count += int(r.item() < 1 - clip_low and a(i, t).item() < 0)
            high_count += int(r.item() > 1 + clip_high and a(i, t).item() > 0)

    n_real = len(per_token)
    total = sum(per_token.values())
    if loss_type in ("grpo", "gspo"):
        loss = 0.0
        for i in range(B):
            toks = real(i)
            if toks:
                loss = loss + sum(per_token[i, t] for t in toks) / len(toks)
        loss = loss / B
    elif loss_type == "bnpo":
        loss = total / n_real
    elif loss_type == "dr_grpo":
        loss = total / (B * (max_len or T))
    elif loss_type == "dapo":
        loss = total / (num_tokens if num_tokens is not None else n_real)
    return loss, {
        "clip_frac_low": low_count / n_real,
        "clip_frac_high": high_count / n_real,
        "clip_frac": (low_count + high_count) / n_real,
    }


def variant(loss_type: str) -> dict[str, str]:
    """policy_loss's arguments for a loss variant of these tests: "gspo" is grpo's aggregation of a ratio per
    sequence (algo.loss_type=grpo algo.ratio_level=sequence)."""
    return {"loss_type": "grpo", "ratio_level": "sequence"} if loss_type == "gspo" else {"loss_type": loss_type}


VARIANTS = (*LOSS_TYPES, "gspo")


def ragged_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(F64)


def random_batch(seed, per_token_adv, B=5, T=7, lengths=(7, 1, 4, 6, 3), spread=0.4):
    """Random log-probs with ratios spread widely enough that both clip sides are hit."""
    gen = torch.Generator().manual_seed(seed)
    old_logp = -torch.rand(B, T, generator=gen, dtype=F64) * 3 - 0.05
    logp = (old_logp + torch.randn(B, T, generator=gen, dtype=F64) * spread).requires_grad_(True)
    shape = (B, T) if per_token_adv else (B,)
    adv = torch.randn(*shape, generator=gen, dtype=F64)
    mask = ragged_mask(list(lengths), T)  # row 1's only real token is the first
    kl = torch.rand(B, T, generator=gen, dtype=F64) * 0.3
    return logp, old_logp, adv, mask, kl


CASES = [
    (loss_type, per_token_adv, beta)
    for loss_type in VARIANTS
    for per_token_adv in (False, True)
    for beta in (0.0, 0.04)
]


@pytest.mark.parametrize("loss_type,per_token_adv,beta", CASES)
def test_policy_loss_value_and_gradient_match_loop_reference(loss_type, per_token_adv, beta):
    seed = CASES.index((loss_type, per_token_adv, beta))
    logp, old_logp, adv, mask, kl = random_batch(seed=seed, per_token_adv=per_token_adv)
    loss, stats = policy_loss(
        logp, old_logp, adv, mask, clip_low=0.2, clip_high=0.28, kl=kl, beta=beta, **variant(loss_type)
    )
    ref, ref_stats = reference_policy_loss(logp, old_logp, adv, mask, 0.2, 0.28, loss_type, kl=kl, beta=beta)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    (grad,) = torch.autograd.grad(loss, logp)
    (ref_grad,) = torch.autograd.grad(ref, logp)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-6)
    assert (grad[~mask.bool()] == 0).all()  # padding gets no gradient
    for key in ("clip_frac_low", "clip_frac_high", "clip_frac"):
        assert stats[key].item() == pytest.approx(ref_stats[key], abs=1e-6), key  # stats are fp32 fractions
    if beta:
        torch.testing.assert_close(stats["kl/loss_term"], (kl * mask).sum() / mask.sum())


@pytest.mark.parametrize("loss_type", ["grpo", "gspo"])
def test_policy_loss_clip_stats_count_both_sides(loss_type):
    # a batch with wide ratio spread hits both clip sides, so the stat comparisons are not vacuous
    logp, old_logp, adv, mask, _ = random_batch(seed=7, per_token_adv=loss_type == "grpo", spread=1.0)
    if loss_type == "gspo":
        # whole-sequence shifts: up with A > 0 (high clip), down with A < 0 (low clip), and the two
        # sides that do not count (up with A < 0, down with A > 0)
        shift = torch.tensor([0.6, -0.6, 0.0, 0.6, -0.6], dtype=F64)[:, None]
        noise = 0.05 * torch.randn(old_logp.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
        logp = (old_logp + shift + noise).requires_grad_(True)
        adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=F64)
    _, ref_stats = reference_policy_loss(logp, old_logp, adv, mask, 0.2, 0.28, loss_type)
    assert ref_stats["clip_frac_low"] > 0 and ref_stats["clip_frac_high"] > 0
    _, stats = policy_loss(logp, old_logp, adv, mask, 0.2, 0.28, **variant(loss_type))
    assert stats["clip_frac_low"].item() == pytest.approx(ref_stats["clip_frac_low"])
    assert stats["clip_frac_high"].item() == pytest.approx(ref_stats["clip_frac_high"])
    assert stats["clip_frac"].item() == pytest.approx(ref_stats["clip_frac"])


@pytest.mark.parametrize("loss_type", VARIANTS)
def test_policy_loss_ignores_padding_values(loss_type):
    logp, old_logp, adv, mask, kl = random_batch(seed=3, per_token_adv=True)
    loss, _ = policy_loss(logp, old_logp, adv, mask, kl=kl, beta=0.04, **variant(loss_type))
    pad = ~mask.bool()
    logp2, old2, adv2, kl2 = logp.detach().clone(), old_logp.clone(), adv.clone(), kl.clone()
    logp2[pad], old2[pad], adv2[pad], kl2[pad] = 5.0, -40.0, 1e3, 1e3
    loss2, _ = policy_loss(logp2, old2, adv2, mask, kl=kl2, beta=0.04, **variant(loss_type))
    torch.testing.assert_close(loss2, loss.detach())


@pytest.mark.parametrize("loss_type", ["dr_grpo", "dapo"])
def test_policy_loss_explicit_denominators_match_reference(loss_type):
    logp, old_logp, adv, mask, _ = random_batch(seed=11, per_token_adv=False)
    kwargs = {"max_len": 12} if loss_type == "dr_grpo" else {"num_tokens": 50.0}
    loss, _ = policy_loss(logp, old_logp, adv, mask, 0.2, 0.28, loss_type=loss_type, **kwargs)
    ref, _ = reference_policy_loss(logp, old_logp, adv, mask, 0.2, 0.28, loss_type, **kwargs)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)


def test_policy_loss_ratio_one_gives_minus_mean_advantage():
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.3, 0.3, 0.3]]))
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss, stats = policy_loss(logp, logp.clone(), adv, mask, loss_type="grpo")
    torch.testing.assert_close(loss, torch.tensor(-(2.0 - 1.0) / 2))
    assert stats["clip_frac"] == 0 and stats["approx_kl"] == 0
    torch.testing.assert_close(stats["ratio_mean"], torch.tensor(1.0))


def test_policy_loss_hand_computed_clipping():
    # one token, ratio 2: with A > 0 the clipped branch (1.28 A) is the min; with A < 0 the unclipped one is
    logp, old = torch.tensor([[math.log(0.8)]]), torch.tensor([[math.log(0.4)]])
    mask = torch.ones(1, 1)
    pos, stats = policy_loss(logp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(pos, torch.tensor(-1.28))
    assert stats["clip_frac_high"] == 1 and stats["clip_frac_low"] == 0
    neg, stats = policy_loss(logp, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(neg, torch.tensor(2.0))
    assert stats["clip_frac"] == 0


def test_policy_loss_gspo_uses_one_ratio_per_sequence():
    # token log-ratios +0.5 and -0.5 average to 0: the sequence ratio is 1, so loss = -A even though
    # each token alone would be clipped
    old = torch.zeros(1, 2)
    logp = torch.tensor([[0.5, -0.5]])
    loss, stats = policy_loss(logp, old, torch.tensor([3.0]), torch.ones(1, 2), ratio_level="sequence")
    torch.testing.assert_close(loss, torch.tensor(-3.0))
    assert stats["clip_frac"] == 0
    token_level, _ = policy_loss(logp, old, torch.tensor([3.0]), torch.ones(1, 2), loss_type="grpo")
    assert token_level.item() != pytest.approx(-3.0)


def test_policy_loss_beta_zero_ignores_kl():
    logp, old_logp, adv, mask, kl = random_batch(seed=5, per_token_adv=False)
    with_kl, _ = policy_loss(logp, old_logp, adv, mask, kl=kl, beta=0.0)
    without, _ = policy_loss(logp, old_logp, adv, mask)
    torch.testing.assert_close(with_kl, without)


def test_policy_loss_stats_are_detached():
    logp, old_logp, adv, mask, kl = random_batch(seed=6, per_token_adv=False)
    _, stats = policy_loss(logp, old_logp, adv, mask, kl=kl, beta=0.1)
    assert all(not v.requires_grad for v in stats.values())
    assert {"clip_frac_low", "clip_frac_high", "clip_frac", "ratio_mean", "approx_kl", "kl/loss_term"} <= set(stats)


def test_policy_loss_rejects_unknown_loss_type_naming_the_choices():
    with pytest.raises(ValueError) as err:
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), loss_type="ppo2")
    for choice in LOSS_TYPES:
        assert choice in str(err.value)


# ---------------------------------------------------------------- value_loss


def reference_value_loss(values, old_values, returns, mask, clip):
    total, n, clipped_count = 0.0, 0, 0
    for i in range(values.shape[0]):
        for t in range(values.shape[1]):
            if not mask[i, t]:
                continue
            v, v_old, r = values[i, t], old_values[i, t], returns[i, t]
            v_clipped = v_old + torch.clamp(v - v_old, -clip, clip)
            unclipped_err, clipped_err = (v - r) ** 2, (v_clipped - r) ** 2
            total = total + 0.5 * torch.maximum(unclipped_err, clipped_err)
            clipped_count += int(clipped_err.item() > unclipped_err.item())
            n += 1
    return total / n, clipped_count / n


@pytest.mark.parametrize("clip", [0.05, 0.2, 1.0])
def test_value_loss_value_gradient_and_clip_frac_match_loop_reference(clip):
    gen = torch.Generator().manual_seed(int(clip * 100))
    B, T = 4, 6
    old_values = torch.randn(B, T, generator=gen, dtype=F64)
    values = (old_values + torch.randn(B, T, generator=gen, dtype=F64) * 0.5).requires_grad_(True)
    returns = torch.randn(B, T, generator=gen, dtype=F64)
    mask = ragged_mask([6, 1, 3, 5], T)
    loss, stats = value_loss(values, old_values, returns, mask, clip=clip)
    ref, ref_frac = reference_value_loss(values, old_values, returns, mask, clip)
    torch.testing.assert_close(loss, ref, atol=1e-7, rtol=1e-7)
    (grad,) = torch.autograd.grad(loss, values)
    (ref_grad,) = torch.autograd.grad(ref, values)
    torch.testing.assert_close(grad, ref_grad, atol=1e-7, rtol=1e-7)
    assert stats["value_clip_frac"].item() == pytest.approx(ref_frac)
    if clip == 0.05:
        assert 0 < ref_frac < 1  # both branches are exercised


def test_value_loss_hand_computed():
    old = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[2.0, 0.0]])
    # token 0: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24; token 1: (0.1)^2 = clipped -> 0.01
    loss, stats = value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (3.24 + 0.01) / 2))
    assert stats["value_clip_frac"].item() == pytest.approx(0.5)


# ---------------------------------------------------------------- accumulation_weight


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_accumulation_weight_is_the_share_for_mean_losses(loss_type):
    assert accumulation_weight(loss_type, 0.25) == 0.25


def test_accumulation_weight_is_one_for_dapo():
    assert accumulation_weight("dapo", 0.25) == 1.0


@pytest.mark.parametrize("loss_type", ["grpo", "gspo", "dr_grpo", "dapo", "bnpo"])
def test_weighted_micro_batch_losses_sum_to_the_minibatch_loss(loss_type):
    B, T = 6, 8
    # bnpo is only micro-batch-additive when the micro-batches hold equal token counts (15 each here)
    lengths = [8, 1, 6, 5, 3, 7] if loss_type == "bnpo" else [8, 1, 6, 2, 3, 7]
    logp, old_logp, adv, mask, kl = random_batch(seed=21, per_token_adv=False, B=B, T=T, lengths=lengths)
    kwargs = {**variant(loss_type), "clip_low": 0.2, "clip_high": 0.28, "kl": kl, "beta": 0.04}
    extra = {"max_len": T} if loss_type == "dr_grpo" else {}
    if loss_type == "dapo":
        extra = {"num_tokens": mask.sum().item()}
    if loss_type == "gspo":
        loss_type = "grpo"  # its micro-batch weight
    full, _ = policy_loss(logp, old_logp, adv, mask, **kwargs, **extra)
    accumulated = 0.0
    for part in (slice(0, 3), slice(3, 6)):
        # micro-batches trimmed to their own longest sequence, as a collator would
        t_max = int(mask[part].sum(1).max())
        micro, _ = policy_loss(
            logp[part, :t_max],
            old_logp[part, :t_max],
            adv[part],
            mask[part, :t_max],
            **{**kwargs, "kl": kl[part, :t_max]},
            **extra,
        )
        accumulated = accumulated + accumulation_weight(loss_type, 0.5) * micro
    torch.testing.assert_close(accumulated, full, atol=1e-10, rtol=1e-10)
    (g_full,) = torch.autograd.grad(full, logp)
    (g_acc,) = torch.autograd.grad(accumulated, logp)
    torch.testing.assert_close(g_acc, g_full, atol=1e-10, rtol=1e-10)


def test_bnpo_micro_batches_with_unequal_token_counts_do_not_add_up():
    # documents the known limitation: bnpo's per-micro-batch token mean is not share-weightable
    logp, old_logp, adv, mask, _ = random_batch(seed=22, per_token_adv=False, B=4, T=6, lengths=[6, 6, 1, 1])
    full, _ = policy_loss(logp, old_logp, adv, mask, loss_type="bnpo")
    parts = [
        policy_loss(logp[s], old_logp[s], adv[s], mask[s], loss_type="bnpo")[0] for s in (slice(0, 2), slice(2, 4))
    ]
    accumulated = sum(accumulation_weight("bnpo", 0.5) * p for p in parts)
    assert abs(accumulated.item() - full.item()) > 1e-3


# ---------------------------------------------------------------- token_loss_weights


def test_token_loss_weights_hand_values():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # B = 2, T = 3, 3 real tokens
    expected = {
        "grpo": [[1 / 4, 1 / 4, 0], [1 / 2, 0, 0]],  # 1 / (B * row length)
        "bnpo": [[1 / 3, 1 / 3, 0], [1 / 3, 0, 0]],  # 1 / real tokens
        "dr_grpo": [[1 / 10, 1 / 10, 0], [1 / 10, 0, 0]],  # 1 / (B * max_len), max_len = 5
        "dapo": [[1 / 12, 1 / 12, 0], [1 / 12, 0, 0]],  # 1 / the minibatch's 12 tokens
    }
    for loss_type, values in expected.items():
        torch.testing.assert_close(
            token_loss_weights(mask, loss_type, max_len=5, num_tokens=12), torch.tensor(values), msg=loss_type
        )


def test_token_loss_weights_of_an_empty_row_are_zero_not_nan():
    mask = torch.tensor([[0, 0], [1, 1]])
    for loss_type in LOSS_TYPES:
        weights = token_loss_weights(mask, loss_type, num_tokens=0)
        assert torch.isfinite(weights).all() and (weights[0] == 0).all(), loss_type


def test_clipped_surrogate_hand_values():
    logp = torch.log(torch.tensor([0.5, 1.5, 1.1, 0.5]))  # old log-probs 0: these are the ratios
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0])
    out = clipped_surrogate(logp, torch.zeros(4), adv, SurrogateParams())
    # A > 0: min(r, clip(r)) A -> 0.5, 1.2; A < 0: min(r A, clip(r) A) -> -2.2, -0.8 (the pessimistic side)
    torch.testing.assert_close(out.loss, -torch.tensor([0.5, 1.2, -2.2, -0.8]))
    assert out.clipped_high.tolist() == [False, True, False, False]
    assert out.clipped_low.tolist() == [False, False, False, True]


# ---------------------------------------------------------------- CISPO and SAPO: hand values, autograd


def test_cispo_hand_values_and_gradient():
    # ratios 0.5, 2, 8 (old log-probs log 0.1 and friends); cap 5: weights 0.5, 2, 5 (detached)
    old = torch.log(torch.tensor([0.2, 0.05, 0.01], dtype=F64))
    logp = torch.log(torch.tensor([0.1, 0.1, 0.08], dtype=F64)).requires_grad_(True)
    adv = torch.tensor([1.0, -2.0, 3.0], dtype=F64)
    out = cispo_surrogate(logp, old, adv, SurrogateParams(cispo_cap=5.0))
    weights = torch.tensor([0.5, 2.0, 5.0], dtype=F64)
    torch.testing.assert_close(out.loss, -weights * adv * logp.detach())
    (grad,) = torch.autograd.grad(out.loss.sum(), logp)
    torch.testing.assert_close(grad, -weights * adv)  # every token keeps a gradient, capped at 5 A
    assert out.clipped_high.tolist() == [False, False, True] and not out.clipped_low.any()


def test_sapo_hand_values_and_gradient():
    # r = 1: the gate is sigmoid(0) * 4 / tau = 2 / tau and its slope sigmoid'(0) * 4 = 1 for either tau
    logp = torch.zeros(2, dtype=F64, requires_grad=True)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    params = SurrogateParams(sapo_tau_pos=1.0, sapo_tau_neg=1.05)
    out = sapo_surrogate(logp, torch.zeros(2, dtype=F64), adv, params)
    torch.testing.assert_close(out.loss, torch.tensor([-2.0 / 1.0, 2.0 / 1.05], dtype=F64))
    (grad,) = torch.autograd.grad(out.loss.sum(), logp)
    torch.testing.assert_close(grad, -adv)  # the plain policy gradient at r = 1
    # r = 2, A = 1, tau 1: loss -4 sigmoid(1); d/dlogp = -4 sigmoid(1) (1 - sigmoid(1)) * r
    logp2 = torch.tensor([math.log(2.0)], dtype=F64, requires_grad=True)
    out2 = sapo_surrogate(logp2, torch.zeros(1, dtype=F64), torch.ones(1, dtype=F64), params)
    sig = 1 / (1 + math.exp(-1.0))
    torch.testing.assert_close(out2.loss, torch.tensor([-4 * sig], dtype=F64))
    (grad2,) = torch.autograd.grad(out2.loss.sum(), logp2)
    torch.testing.assert_close(grad2, torch.tensor([-4 * sig * (1 - sig) * 2.0], dtype=F64))


@pytest.mark.parametrize("surrogate", ["cispo", "sapo"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_cispo_and_sapo_policy_loss_match_a_plain_autograd_reference(surrogate, loss_type):
    logp, old_logp, adv, mask, _ = random_batch(seed=31, per_token_adv=False, spread=1.0)
    params = SurrogateParams(cispo_cap=1.5, sapo_tau_pos=1.0, sapo_tau_neg=1.05)
    loss, stats = policy_loss(logp, old_logp, adv, mask, loss_type=loss_type, surrogate=surrogate, params=params)
    # the definitions written out on the whole batch
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    if surrogate == "cispo":
        per_token = -torch.clamp(ratio, max=1.5).detach() * a * logp
    else:
        tau = torch.where(a > 0, 1.0, 1.05).to(F64)
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * a
    n_real, B = mask.sum(), mask.shape[0]
    if loss_type == "grpo":
        ref = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    elif loss_type == "dr_grpo":
        ref = (per_token * mask).sum() / (B * mask.shape[1])
    else:  # bnpo, and dapo with the batch's own token count
        ref = (per_token * mask).sum() / n_real
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(ref, logp)[0])
    if surrogate == "cispo":
        expected = ((ratio > 1.5) & (a > 0)).to(F64)
        torch.testing.assert_close(stats["clip_frac_high"].to(F64), (expected * mask).sum() / n_real)


@pytest.mark.parametrize("surrogate", sorted(SURROGATES))
def test_sequence_ratio_gives_gspo_gradient_with_one_advantage_per_sequence(surrogate):
    # GSPO (Zheng et al. 2025) differentiates through s_i = exp(mean_t log r_t); the token form used here has
    # the same value and, with one advantage and one weight per sequence, the same gradient
    logp, old_logp, adv, mask, _ = random_batch(seed=41, per_token_adv=False, spread=0.3)
    params = SurrogateParams(cispo_cap=1.1)
    loss, _ = policy_loss(logp, old_logp, adv, mask, surrogate=surrogate, ratio_level="sequence", params=params)
    seq_log_ratio = ((logp - old_logp) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)  # with grad
    seq_logp = logp.detach() + (seq_log_ratio - seq_log_ratio.detach())  # CISPO reads logp itself
    if surrogate == "cispo":  # -sg(min(s, cap)) A sum-of-gradient: d/dlogp_t = s A
        per_token = -torch.clamp(torch.exp(seq_log_ratio), max=1.1).detach() * adv[:, None] * seq_logp
    else:
        fn = SURROGATES[surrogate]
        per_token = fn(old_logp + seq_log_ratio, old_logp, adv[:, None], params).loss
    ref = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    torch.testing.assert_close(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(ref, logp)[0])


def test_gspo_loss_type_names_what_to_write():
    with pytest.raises(ValueError, match="ratio_level=sequence"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), loss_type="gspo")
