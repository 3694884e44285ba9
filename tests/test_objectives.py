"""The objectives against float64 hand evaluations of METHOD.md, limiting cases and bounds."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from snpo.objectives import (
    OBJECTIVES,
    ObjectiveConfig,
    bounded_loser_term,
    preference_logits,
    preference_loss,
)


def hand_logit(ec, er, rc, rr, negative, objective, beta, lam, k):
    """METHOD.md evaluated one pair at a time with Python floats (float64)."""
    l_c = beta / 2 * (rc - ec)
    l_r = beta / 2 * (rr - er)
    swap = objective in ("snpo", "snpo-naive") and negative
    l_w, l_l = (l_r, l_c) if swap else (l_c, l_r)
    if objective in ("bdpo", "snpo"):
        k = beta / 2 if k is None else k
        r = 2 * k / beta * l_l
        l_l = beta / (2 * k) * math.log(lam * math.exp(r) + 1 - lam)
    return l_w - l_l


def random_errors(n=64, seed=0, scale=1e-3):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 4, generator=g, dtype=torch.float64) * 0.2 + 0.05
    wiggle = (torch.rand(n, 4, generator=g, dtype=torch.float64) - 0.5) * scale
    ec, er = base[:, 0] + wiggle[:, 0], base[:, 1] + wiggle[:, 1]
    rc, rr = base[:, 0] + wiggle[:, 2], base[:, 1] + wiggle[:, 3]
    negative = torch.rand(n, generator=g) < 0.5
    return ec, er, rc, rr, negative


@pytest.mark.parametrize("objective", ["dpo", "bdpo", "snpo-naive", "snpo"])
@pytest.mark.parametrize("mix_scale", [None, 1.0, 0.37])
@pytest.mark.parametrize("beta", [2000.0, 5000.0])
def test_logits_match_hand_evaluation(objective, mix_scale, beta):
    ec, er, rc, rr, negative = random_errors()
    lam = 0.9
    z = preference_logits(ec, er, rc, rr, negative, objective=objective, beta=beta,
                          mix_lambda=lam, mix_scale=mix_scale)
    assert z.dtype == torch.float64
    for i in range(len(z)):
        expected = hand_logit(float(ec[i]), float(er[i]), float(rc[i]), float(rr[i]),
                              bool(negative[i]), objective, beta, lam, mix_scale)
        assert float(z[i]) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    loss, _ = preference_loss(ec, er, rc, rr, negative, objective=objective, beta=beta,
                              mix_lambda=lam, mix_scale=mix_scale)
    hand_loss = sum(math.log1p(math.exp(-float(zi))) for zi in z) / len(z)
    assert float(loss) == pytest.approx(hand_loss, rel=1e-9)


def test_lambda_one_reduces_bounded_to_unbounded():
    ec, er, rc, rr, negative = random_errors(scale=1e-2)
    for bounded, plain in [("snpo", "snpo-naive"), ("bdpo", "dpo")]:
        a = preference_logits(ec, er, rc, rr, negative, objective=bounded, beta=2000, mix_lambda=1.0)
        b = preference_logits(ec, er, rc, rr, negative, objective=plain, beta=2000)
        assert torch.equal(a, b)


def test_conditional_branch_only_makes_snpo_equal_bdpo():
    ec, er, rc, rr, _ = random_errors()
    none = torch.zeros(len(ec), dtype=torch.bool)
    for swapping, plain in [("snpo", "bdpo"), ("snpo-naive", "dpo")]:
        a = preference_logits(ec, er, rc, rr, none, objective=swapping, beta=2000, mix_lambda=0.8)
        b = preference_logits(ec, er, rc, rr, none, objective=plain, beta=2000, mix_lambda=0.8)
        assert torch.equal(a, b)


def test_null_branch_swaps_roles():
    ec, er, rc, rr, _ = random_errors()
    all_null = torch.ones(len(ec), dtype=torch.bool)
    swapped = preference_logits(ec, er, rc, rr, all_null, objective="snpo", beta=2000)
    reversed_pairs = preference_logits(er, ec, rr, rc, ~all_null, objective="snpo", beta=2000)
    assert torch.equal(swapped, reversed_pairs)
    # dpo and bdpo never swap: the null branch is plain CFG dropout
    plain = preference_logits(ec, er, rc, rr, all_null, objective="bdpo", beta=2000)
    assert torch.equal(plain, preference_logits(ec, er, rc, rr, ~all_null, objective="bdpo", beta=2000))


def test_policy_equal_to_reference_gives_zero_logit():
    """M(0) = 0: at initialisation every objective starts at z = 0, loss = log 2."""
    e = torch.rand(8, dtype=torch.float64)
    for objective in ["dpo", "bdpo", "snpo-naive", "snpo"]:
        for scale in [None, 1.0]:
            z = preference_logits(e, e.flip(0), e, e.flip(0), torch.rand(8) < 0.5,
                                  objective=objective, beta=2000, mix_scale=scale)
            assert torch.allclose(z, torch.zeros_like(z), atol=1e-12)


@pytest.mark.parametrize("negative", [False, True])
def test_one_gradient_step_lowers_the_winners_error(negative):
    """The sign check of METHOD.md: training on snpo makes the WINNER more likely."""
    ec = torch.tensor([0.30], dtype=torch.float64, requires_grad=True)
    er = torch.tensor([0.31], dtype=torch.float64, requires_grad=True)
    rc = torch.tensor([0.30], dtype=torch.float64)
    rr = torch.tensor([0.31], dtype=torch.float64)
    loss, _ = preference_loss(ec, er, rc, rr, torch.tensor([negative]), objective="snpo", beta=2000)
    loss.backward()
    with torch.no_grad():
        new_ec, new_er = ec - 1e-4 * ec.grad, er - 1e-4 * er.grad
    ec, er = ec.detach(), er.detach()
    winner_before, winner_after = (er, new_er) if negative else (ec, new_ec)
    loser_before, loser_after = (ec, new_ec) if negative else (er, new_er)
    assert float(winner_after) < float(winner_before)
    assert float(loser_after) > float(loser_before)


def test_one_gradient_step_on_a_shared_model_lowers_winner_error():
    """With errors produced by a shared parameter vector, one small step still lowers e[w]."""
    torch.manual_seed(0)
    theta = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    x_c, x_r = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    for negative in [False, True]:
        def errors(t):
            return ((t - x_c) ** 2).mean().view(1), ((t - x_r) ** 2).mean().view(1)
        ec, er = errors(theta)
        with torch.no_grad():
            rc, rr = errors(torch.zeros(5, dtype=torch.float64))
        loss, _ = preference_loss(ec, er, rc, rr, torch.tensor([negative]), objective="snpo", beta=10)
        (grad,) = torch.autograd.grad(loss, theta)
        new_ec, new_er = errors(theta.detach() - 1e-3 * grad)
        winner_before, winner_after = (er, new_er) if negative else (ec, new_ec)
        assert float(winner_after.detach()) < float(winner_before.detach())


def test_loser_contribution_is_bounded():
    """M(l) >= (beta / 2k) log(1 - lam), the cap is -log(1 - lam) logits for k = beta/2,
    and the gradient through a crushed loser vanishes (it stops paying), unlike dpo's."""
    beta, lam = 2000.0, 0.9
    rewards = torch.linspace(-1e4, 50, 2001, dtype=torch.float64)
    for k in [None, 1.0, 10.0]:
        kk = beta / 2 if k is None else k
        m = bounded_loser_term(rewards, beta=beta, mix_lambda=lam, mix_scale=k)
        floor = beta / (2 * kk) * math.log(1 - lam)
        assert bool((m >= floor - 1e-9).all())
    cap = bounded_loser_term(torch.tensor([-1e6], dtype=torch.float64), beta=beta, mix_lambda=lam)
    assert float(cap) == pytest.approx(math.log(0.1), rel=1e-12)  # = -2.302585...

    # d loss / d e_loser -> 0 as the loser is pushed down (e_pol - e_ref large), for snpo;
    # for dpo it tends to beta/2 * sigmoid(-z) which stays large while the winner is poor.
    def loser_grad(objective, loser_gap):
        er = torch.tensor([0.1 + loser_gap], dtype=torch.float64, requires_grad=True)
        loss, _ = preference_loss(torch.tensor([0.2], dtype=torch.float64), er,
                                  torch.tensor([0.1], dtype=torch.float64),
                                  torch.tensor([0.1], dtype=torch.float64),
                                  torch.tensor([False]), objective=objective, beta=beta)
        loss.backward()
        return float(er.grad)

    assert abs(loser_grad("snpo", 0.05)) < 1e-12 * abs(loser_grad("dpo", 0.05)) + 1e-30
    assert abs(loser_grad("dpo", 0.05)) > 100


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_numerically_stable_at_extremes(dtype, objective):
    for beta in [1.0, 2000.0, 10_000.0]:
        for lo, hi in [(0.0, 0.0), (0.0, 1e3), (1e3, 0.0), (1e3, 1e3), (0.0, 1e-6)]:
            ec = torch.tensor([lo, hi, lo, hi], dtype=dtype, requires_grad=True)
            er = torch.tensor([hi, lo, lo, hi], dtype=dtype, requires_grad=True)
            rc = torch.tensor([hi, lo, hi, 0.0], dtype=dtype)
            rr = torch.tensor([lo, hi, hi, 1e3], dtype=dtype)
            neg = torch.tensor([True, False, True, False])
            for scale in [None, 1.0]:
                loss, metrics = preference_loss(ec, er, rc, rr, neg, objective=objective,
                                                beta=beta, mix_scale=scale)
                loss.backward()
                assert torch.isfinite(loss), (beta, lo, hi)
                assert torch.isfinite(ec.grad).all()
                assert er.grad is None or torch.isfinite(er.grad).all()
                # both branches hold pairs: every metric (per-branch ones included) is finite
                bad = {k: float(v) for k, v in metrics.items() if not torch.isfinite(v)}
                assert not bad, (beta, lo, hi, bad)
                ec.grad = er.grad = None


def test_metrics_follow_dataset_labels_and_branches():
    ec = torch.tensor([0.10, 0.20, 0.30, 0.40], dtype=torch.float64)
    er = torch.tensor([0.15, 0.10, 0.30, 0.50], dtype=torch.float64)
    rc = torch.tensor([0.12, 0.20, 0.28, 0.40], dtype=torch.float64)
    rr = torch.tensor([0.15, 0.12, 0.30, 0.45], dtype=torch.float64)
    neg = torch.tensor([False, False, True, True])
    beta = 100.0
    _, m = preference_loss(ec, er, rc, rr, neg, objective="snpo-naive", beta=beta)
    l_c = [beta / 2 * (r - e) for r, e in zip(rc.tolist(), ec.tolist())]
    l_r = [beta / 2 * (r - e) for r, e in zip(rr.tolist(), er.tolist())]
    z = [l_c[i] - l_r[i] if not neg[i] else l_r[i] - l_c[i] for i in range(4)]
    assert float(m["rewards/chosen"]) == pytest.approx(sum(l_c) / 4)
    assert float(m["rewards/rejected"]) == pytest.approx(sum(l_r) / 4)
    assert float(m["rewards/margins"]) == pytest.approx((sum(l_c) - sum(l_r)) / 4)
    assert float(m["rewards/accuracies"]) == pytest.approx(sum(zi > 0 for zi in z) / 4)
    assert float(m["branch/negative_fraction"]) == pytest.approx(0.5)
    assert float(m["branch/conditional/accuracy"]) == pytest.approx((z[0] > 0) / 2 + (z[1] > 0) / 2)
    assert float(m["branch/negative/loss"]) == pytest.approx(
        (F.softplus(torch.tensor(-z[2])) + F.softplus(torch.tensor(-z[3]))).item() / 2)
    assert float(m["logratio/chosen"]) == pytest.approx(((0.12 - 0.10) + (0.20 - 0.20)) / 2)
    assert float(m["logratio/rejected"]) == pytest.approx(((0.15 - 0.15) + (0.12 - 0.10)) / 2)
    _, m = preference_loss(ec, er, rc, rr, torch.zeros(4, dtype=torch.bool), objective="dpo", beta=beta)
    assert math.isnan(float(m["branch/negative/loss"]))


def test_sft_loss_is_the_chosen_error():
    ec, er, rc, rr, neg = random_errors()
    loss, m = preference_loss(ec, er, rc, rr, neg, objective="sft", beta=2000)
    assert float(loss) == pytest.approx(float(ec.mean()))
    with pytest.raises(ValueError, match="sft"):
        preference_logits(ec, er, rc, rr, neg, objective="sft", beta=2000)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"objective": "ipo"}, "objective"),
        ({"beta": 0.0}, "beta"),
        ({"beta": -5.0}, "beta"),
        ({"beta": float("inf")}, "beta"),
        ({"mix_lambda": 0.0}, "mix_lambda"),
        ({"mix_lambda": 1.5}, "mix_lambda"),
        ({"mix_scale": 0.0}, "mix_scale"),
        ({"mix_scale": -1.0}, "mix_scale"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    args = {"objective": "snpo", "beta": 2000.0, "mix_lambda": 0.9, "mix_scale": None, **kwargs}
    with pytest.raises(ValueError) as err:
        ObjectiveConfig(**args)
    message = str(err.value)
    assert message.startswith(field + ":") and "\n" not in message
    with pytest.raises(ValueError, match=f"^{field}:"):
        e = torch.zeros(2)
        preference_logits(e, e, e, e, torch.zeros(2, dtype=torch.bool), **args)


def test_bounded_term_is_exact_at_zero_and_finite_everywhere():
    """M(0) = 0 exactly (so z = 0 and accuracy 0 at initialisation), in every dtype, and
    M agrees with the float64 formula across the switch between its two branches."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        zero = bounded_loser_term(torch.zeros(3, dtype=dtype), beta=2000, mix_lambda=0.9)
        assert torch.equal(zero, torch.zeros(3, dtype=dtype))
    r = torch.tensor([-50.0, -1.0, 0.5, 19.9, 20.1, 60.0, 500.0], dtype=torch.float64, requires_grad=True)
    m = bounded_loser_term(r, beta=2.0, mix_lambda=0.9)  # k = beta/2 = 1, so r = l
    expected = [math.log(0.9 * math.exp(x) + 0.1) if x < 300 else x + math.log(0.9) for x in r.tolist()]
    assert torch.allclose(m, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    m.sum().backward()
    assert torch.isfinite(r.grad).all()
