"""Beyond the paper (issue 14): Diffusion-SDPO's safeguard, Diffusion-KTO and MaPO.

Each loss and gradient against an independent float64 evaluation of the paper's formula on
fixed inputs, with limiting cases; the safeguard's promise on a tiny model (one step with it
does not raise the winner's error where plain DPO's step does); the unpaired reader and its
skip counts; KTO's reference point under gradient accumulation; each method trained by
``snpo train`` on tiny SD1.5 and SD3 pipelines and loaded into diffusers; the bench rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fixtures_data import encode, make_pickapic_parquet, solid_image
from snpo.backbones.base import Backbone
from snpo.cli import main
from snpo.data import PairedTransform
from snpo.data.unpaired import (
    PairSplitSource,
    SplitPairDataset,
    UnpairedDataset,
    collate_unpaired,
    load_unpaired_source,
    parse_label,
)
from snpo.errors import ConfigError
from snpo.methods.single import SingleNetworkMethod
from snpo.objectives import ObjectiveConfig, preference_loss
from snpo.objectives.kto import kto_loss, kto_reference_point
from snpo.objectives.mapo import likelihood_proxy, mapo_loss
from snpo.objectives.sdpo import safeguard_errors, safeguard_factor
from snpo.training.config import TrainConfig
from tiny_pipelines import RESOLUTION, make_sd3, make_sd15

ROOT = Path(__file__).resolve().parents[1]
PAIR_OBJECTIVES = ("dpo", "bdpo", "snpo-naive", "snpo")


# ---- Diffusion-SDPO: the factor ---------------------------------------------------------------
def sdpo_factor_float64(rw: np.ndarray, rl: np.ndarray, mu: float) -> float:
    """The paper's closed form, written out: lam = min(1, (1 - mu)||g_w||^2 / <g_w, g_l>) when
    the output-space gradients g = 2 r / D conflict (<g_w, g_l> > 0), else 1."""
    d = rw.size
    gw, gl = 2 * rw.ravel() / d, 2 * rl.ravel() / d
    dot = float(gw @ gl)
    return 1.0 if dot <= 0 else min(1.0, max(0.0, (1 - mu) * float(gw @ gw) / dot))


@pytest.mark.parametrize("mu", [0.0, 0.3, 0.9, 1.0])
def test_safeguard_factor_matches_the_closed_form_per_pair_and_per_batch(mu):
    g = np.random.default_rng(0)
    base = g.normal(size=(6, 4, 3, 3))
    rw = 0.3 * base + 0.1 * g.normal(size=base.shape)  # mostly aligned with rl: conflicts
    rl = base + 0.2 * g.normal(size=base.shape)
    rl[1] = -rw[1]  # opposite: no conflict
    rw[2] = 0.01 * rl[2]  # a winner almost fitted: its factor is small
    lam = safeguard_factor(torch.tensor(rw, dtype=torch.float32), torch.tensor(rl, dtype=torch.float32), mu)
    expected = [sdpo_factor_float64(rw[i], rl[i], mu) for i in range(6)]
    np.testing.assert_allclose(lam.numpy(), expected, rtol=1e-5, atol=1e-7)
    assert lam[1] == 1.0
    # the public code's rule: one factor from sums over the micro-batch
    batch = safeguard_factor(torch.tensor(rw), torch.tensor(rl), mu, scope="batch")
    np.testing.assert_allclose(batch.numpy(), [sdpo_factor_float64(rw, rl, mu)] * 6, rtol=1e-5, atol=1e-7)


def test_safeguard_factor_limiting_cases():
    r = torch.randn(3, 2, 4, 4)
    ones = torch.ones(3)
    # no conflict: opposite or orthogonal gradients leave the loser's gradient alone
    torch.testing.assert_close(safeguard_factor(r, -r, 0.5), ones)
    orthogonal = torch.zeros_like(r)
    orthogonal[:, 0], r2 = 1.0, torch.zeros_like(r)
    r2[:, 1] = 1.0
    torch.testing.assert_close(safeguard_factor(orthogonal, r2, 0.5), ones)
    # identical residuals: lam = 1 - mu; a loser far out along the winner's direction: small
    torch.testing.assert_close(safeguard_factor(r, r, 0.25), torch.full((3,), 0.75))
    torch.testing.assert_close(safeguard_factor(r, 10 * r, 0.0), torch.full((3,), 0.1))
    # mu = 1: a conflicting loser pays nothing; a weak conflict (cap above 1) is clipped to 1
    torch.testing.assert_close(safeguard_factor(r, r, 1.0), torch.zeros(3))
    torch.testing.assert_close(safeguard_factor(r, 0.01 * r, 0.0), ones)
    with pytest.raises(ConfigError, match="safeguard_mu"):
        safeguard_factor(r, r, 1.5)


def dpo_like_float64(ew, el, rw, rl, beta, lam_mix, k):
    """Independent float64 evaluation of -logsigmoid(l_w - M(l_l)) (METHOD.md)."""
    lw, ll = beta / 2 * (rw - ew), beta / 2 * (rl - el)
    if lam_mix < 1:
        r = (2 * k / beta) * ll
        ll = (beta / (2 * k)) * torch.log(lam_mix * torch.exp(r) + 1 - lam_mix)
    return -F.logsigmoid(lw - ll)


@pytest.mark.parametrize("objective", PAIR_OBJECTIVES)
def test_safeguard_changes_only_the_losers_gradient_by_the_factor(objective):
    """Loss value and every metric unchanged; d loss / d e_winner unchanged; d loss / d e_loser
    multiplied by lam (float64 reference of the objective's own formula), on both branches."""
    g = torch.Generator().manual_seed(1)
    b, beta = 6, 400.0
    err_c, err_r = 0.2 + 0.1 * torch.rand(b, generator=g), 0.2 + 0.1 * torch.rand(b, generator=g)
    ref_c, ref_r = err_c + 0.003 * torch.randn(b, generator=g), err_r + 0.003 * torch.randn(b, generator=g)
    res_c, res_r = torch.randn(b, 4, 3, 3, generator=g), torch.randn(b, 4, 3, 3, generator=g)
    res_r[::2] = 2 * res_c[::2] + 0.1 * res_r[::2]  # conflicts on half of the pairs
    negative = torch.tensor([False, True, False, True, True, False])
    config = ObjectiveConfig(objective, beta)

    def run(safeguard: bool):
        c, r = err_c.clone().requires_grad_(True), err_r.clone().requires_grad_(True)
        ec, er, lam = (c, r, None)
        if safeguard:
            ec, er, lam = safeguard_errors(c, r, res_c, res_r, negative, swap=config.swaps, mu=0.4)
        loss, metrics = preference_loss(ec, er, ref_c, ref_r, negative, objective=objective, beta=beta)
        loss.backward()
        return loss, metrics, c.grad, r.grad, lam

    loss0, m0, gc0, gr0, _ = run(False)
    loss1, m1, gc1, gr1, lam = run(True)
    torch.testing.assert_close(loss1, loss0)
    assert {k: v.item() for k, v in m1.items()} == pytest.approx({k: v.item() for k, v in m0.items()}, nan_ok=True)

    # float64 reference: winner/loser by the objective's roles
    swap = negative if config.swaps else torch.zeros_like(negative)
    ew = torch.where(swap, err_r, err_c).double().requires_grad_(True)
    el = torch.where(swap, err_c, err_r).double().requires_grad_(True)
    rw, rl = torch.where(swap, ref_r, ref_c).double(), torch.where(swap, ref_c, ref_r).double()
    lam_mix = 0.9 if objective in ("bdpo", "snpo") else 1.0
    dpo_like_float64(ew, el, rw, rl, beta, lam_mix, beta / 2).mean().backward()
    mask = swap.view(-1, 1, 1, 1)
    expected_lam = [sdpo_factor_float64(w.numpy(), lo.numpy(), 0.4) for w, lo in
                    zip(torch.where(mask, res_r, res_c), torch.where(mask, res_c, res_r))]
    np.testing.assert_allclose(lam.numpy(), expected_lam, rtol=1e-5, atol=1e-7)
    grad_w = torch.where(swap, gr1, gc1).double()
    grad_l = torch.where(swap, gc1, gr1).double()
    torch.testing.assert_close(grad_w, ew.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grad_l, el.grad * lam.double(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(torch.where(swap, gc0, gr0).double(), el.grad, rtol=1e-4, atol=1e-7)


# ---- Diffusion-SDPO: the promise on a tiny model ----------------------------------------------
class Bias(torch.nn.Module):
    """A denoiser whose prediction is one learned latent: its output-space gradient IS its
    parameter gradient, so SDPO's first-order guarantee is exact for it."""

    def __init__(self, shape):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(shape))

    def forward(self, noisy):
        return self.bias.expand(noisy.shape[0], *self.bias.shape)


class BiasBackbone(Backbone):
    """The smallest backbone: identity "VAE", the sample (x0) as the target, a Bias denoiser."""

    family = "stub"

    def __init__(self, shape=(2, 3, 3)):
        super().__init__()
        self.denoiser = Bias(shape)
        self.noise_scheduler = SimpleNamespace(config=SimpleNamespace(prediction_type="sample",
                                                                      num_train_timesteps=1000))

    def encode_images(self, pixels):
        return pixels

    def decode_latents(self, latents):
        return latents

    def encode_prompts(self, prompts, **extras):
        return {"encoder_hidden_states": torch.ones(len(prompts), 1, 1)}

    def null_condition(self, cond):
        return {k: torch.zeros_like(v) for k, v in cond.items()}

    def frozen_modules(self):
        return {}

    def save_trained(self, output_dir, denoiser=None):
        return []

    def add_noise(self, latents, noise, timesteps):
        return latents

    def predict(self, model, noisy, timesteps, cond):
        return model(noisy)


def winner_error_after_one_step(objective, safeguard, *, null_branch, monkeypatch):
    import snpo.methods.single as single

    real = single.draw_pairs

    def draws_on_branch(backbone, latents, p, seeds):  # every pair on the chosen branch
        d = real(backbone, latents, p, seeds)
        d.coin = torch.full_like(d.coin, null_branch)
        return d

    monkeypatch.setattr(single, "draw_pairs", draws_on_branch)
    backbone = BiasBackbone()
    params = backbone.prepare_for_training()
    v = torch.linspace(-1, 1, 18).reshape(1, 2, 3, 3)
    near, far = -0.1 * v, -1.0 * v  # the winner almost fitted, the loser far out the same way
    # roles: the winner is chosen on the conditional branch, rejected on snpo's null branch
    winner_is_chosen = not (null_branch and ObjectiveConfig(objective).swaps)
    chosen, rejected = (near, far) if winner_is_chosen else (far, near)
    batch = {"chosen_pixels": chosen, "rejected_pixels": rejected, "prompt": ["p"]}
    method = SingleNetworkMethod(backbone, ObjectiveConfig(objective, beta=100.0), 0.0,
                                 safeguard=(0.5, "pair") if safeguard else None)
    loss, metrics = method.compute_loss(backbone.denoiser, batch, [7])
    loss.backward()
    with torch.no_grad():
        for p in params:
            p -= 1e-3 * p.grad
    winner = near
    before = (winner ** 2).mean().item()  # the bias starts at 0
    after = ((backbone.denoiser.bias - winner[0]) ** 2).mean().item()
    return before, after, metrics


@pytest.mark.parametrize("objective, null_branch", [("dpo", False), ("bdpo", False), ("snpo", False),
                                                    ("snpo", True), ("snpo-naive", True)])
def test_one_safeguarded_step_does_not_raise_the_winners_error_where_plain_one_does(
        objective, null_branch, monkeypatch):
    before, plain, _ = winner_error_after_one_step(objective, False, null_branch=null_branch, monkeypatch=monkeypatch)
    assert plain > before  # the collapse: the loser's push drags the winner along
    before, guarded, metrics = winner_error_after_one_step(objective, True, null_branch=null_branch,
                                                           monkeypatch=monkeypatch)
    assert guarded < before
    assert 0 < metrics["safeguard/factor"].item() < 1 and metrics["safeguard/active"].item() == 1


# ---- Diffusion-KTO ------------------------------------------------------------------------------
def test_kto_loss_and_gradient_match_the_float64_formula():
    g = torch.Generator().manual_seed(2)
    n, beta = 8, 300.0
    err = (0.3 + 0.05 * torch.rand(n, generator=g)).requires_grad_(True)
    ref = err.detach() + 0.002 * torch.randn(n, generator=g)
    good = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    reward = beta / 2 * (ref - err.detach())
    point = kto_reference_point(reward.sum(), n)
    loss, metrics = kto_loss(err, ref, good, point, beta=beta, desirable_weight=1.5, undesirable_weight=0.5)
    loss.backward()

    # float64: the code's form, sigmoid(sign * beta_dpo * (g - kl)) with beta_dpo = beta / 2
    e = err.detach().double().requires_grad_(True)
    gt = ref.double() - e
    kl = torch.clamp(gt.detach().mean(), min=0)
    sign = good.double() * 2 - 1
    w = torch.where(good, 1.5, 0.5).double()
    ref_loss = (w * (1 - torch.sigmoid(sign * (beta / 2) * (gt - kl)))).mean()
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(err.grad.double(), e.grad, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(metrics["kto/reference_point"].double(), (beta / 2) * kl, rtol=1e-5, atol=1e-7)
    assert metrics["rewards/chosen"] == pytest.approx(reward[good].mean().item(), rel=1e-5)


def test_kto_limiting_cases():
    err = torch.full((4,), 0.5)
    good = torch.tensor([True, False, True, False])
    # policy = reference: every utility is 0, the loss is 1 - sigmoid(0) = 1/2 per image
    loss, m = kto_loss(err, err.clone(), good, torch.tensor(0.0), beta=1000.0)
    assert loss.item() == pytest.approx(0.5) and m["rewards/accuracies"].item() == 0
    # the reference point is clamped at 0: a policy worse than the reference on average
    assert kto_reference_point(torch.tensor(-3.0), 4).item() == 0.0
    assert kto_reference_point(torch.tensor(2.0), 4).item() == 0.5
    # the reference point is detached: no gradient flows through it
    e = torch.full((2,), 0.5, requires_grad=True)
    point = kto_reference_point((500 * (0.6 - e)).sum(), 2)
    kto_loss(e, torch.full((2,), 0.6), torch.tensor([True, False]), point, beta=1000.0)[0].backward()
    assert e.grad[0] > 0 > e.grad[1]  # a descent step lowers the desirable error, raises the other


# ---- MaPO ---------------------------------------------------------------------------------------
def test_mapo_loss_and_gradient_match_the_float64_formula():
    g = torch.Generator().manual_seed(3)
    ec = (0.2 + 0.3 * torch.rand(5, generator=g)).requires_grad_(True)
    er = (0.2 + 0.3 * torch.rand(5, generator=g)).requires_grad_(True)
    loss, metrics = mapo_loss(ec, er, beta=0.1, snr=0.5, timesteps=1000)
    loss.backward()

    # float64, the public code's compute_loss line by line
    w, lo = ec.detach().double().requires_grad_(True), er.detach().double().requires_grad_(True)
    log_odds = (0.5 * w) / (torch.exp(0.5 * w) - 1) - (0.5 * lo) / (torch.exp(0.5 * lo) - 1)
    ratio = F.logsigmoid(log_odds * 1000)
    expected = w.mean() - (0.1 * ratio).mean()
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ec.grad.double(), w.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(er.grad.double(), lo.grad, rtol=1e-4, atol=1e-7)
    assert torch.isnan(metrics["logratio/chosen"])  # no reference: no log-ratio
    # limits: phi(0) = 1; equal errors give z = 0 and the loss e_w + beta log 2
    assert likelihood_proxy(torch.tensor([0.0, 1e-9]), 0.5).tolist() == pytest.approx([1.0, 1.0])
    e = torch.full((3,), 0.4)
    loss, m = mapo_loss(e, e.clone(), beta=0.1, snr=0.5, timesteps=1000)
    assert loss.item() == pytest.approx(0.4 + 0.1 * np.log(2), rel=1e-6)
    assert m["rewards/margins"].item() == 0


# ---- the unpaired reader ------------------------------------------------------------------------
def make_unpaired_jsonl(folder: Path, n_good: int = 6) -> Path:
    """``n_good`` usable rows (alternating labels, in several spellings) and one bad row of
    each kind: missing image file, bad label, empty caption, overlong caption, a corrupt image
    (found only when decoded) and a line that is not JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "img").mkdir(exist_ok=True)
    labels = [True, 1, "false", 0, "yes", 0.0, "TRUE", "no"]
    lines = []
    for i in range(n_good):
        name = f"img/{i}.png"
        solid_image((40 * i % 255, 200, 30) if i % 2 == 0 else (200, 20, 40 * i % 255)).save(folder / name)
        lines.append(json.dumps({"prompt": f"a red cat {i}", "image": name, "label": labels[i % len(labels)]}))
    solid_image((1, 2, 3)).save(folder / "img/ok.png")
    (folder / "img/corrupt.png").write_bytes(b"not an image at all")
    lines += [
        json.dumps({"prompt": "missing", "image": "img/nope.png", "label": 1}),
        json.dumps({"prompt": "bad label", "image": "img/ok.png", "label": "maybe"}),
        json.dumps({"prompt": "  ", "image": "img/ok.png", "label": 0}),
        json.dumps({"prompt": "x" * 3000, "image": "img/ok.png", "label": 1}),
        json.dumps({"prompt": "corrupt", "image": "img/corrupt.png", "label": 1}),
        "{not json",
    ]
    path = folder / "feedback.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_label_spellings():
    for value in (True, 1, 1.0, "1", "true", " Yes ", np.bool_(True), np.int64(1)):
        assert parse_label(value) is True, value
    for value in (False, 0, 0.0, "0", "FALSE", "no", np.float32(0)):
        assert parse_label(value) is False, value
    for value in (None, 2, 0.5, float("nan"), "", "maybe", [1]):
        assert parse_label(value) is None, value


def test_unpaired_jsonl_skips_and_counts_bad_rows(tmp_path):
    path = make_unpaired_jsonl(tmp_path / "fb")
    source = load_unpaired_source(path, max_caption_chars=2000)
    report = source.scan()
    assert report.counts == {"empty_caption": 1, "overlong_caption": 1, "bad_label": 1, "unreadable_image": 1,
                             "malformed_row": 1}
    assert report.summary().startswith("kept 7 of 12 rows")
    assert source.labels().tolist() == [True, True, False, False, True, False, True]
    rows = UnpairedDataset(source, PairedTransform(16))
    batch = collate_unpaired([rows[i] for i in range(len(rows))])  # the corrupt one is substituted
    assert batch["size"] == 7 and batch["pixels"].shape == (7, 3, 16, 16)
    assert batch["label"].tolist() == [True, True, False, False, True, False, True]
    assert rows.report["unreadable_image"] == 2 and [s.kind for s in batch["skipped"]] == ["unreadable_image"]


def test_unpaired_csv_parquet_and_hf_dataset(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    img = tmp_path / "a.png"
    solid_image((9, 9, 9)).save(img)
    (tmp_path / "f.csv").write_text("caption,image,label\nhello,a.png,true\nworld,a.png,0\nbad,a.png,7\n")
    csv = load_unpaired_source(tmp_path / "f.csv")
    assert csv.scan().counts == {"bad_label": 1} and csv.labels().tolist() == [True, False]
    table = pa.table({"prompt": ["a", "b", "c"], "image": [encode(solid_image((1, 1, 1))), None, b"junk"],
                      "label": [True, False, None]})
    pq.write_table(table, tmp_path / "fb.parquet")
    par = load_unpaired_source(tmp_path / "fb.parquet")
    assert par.scan().counts == {"bad_label": 1} and len(par) == 2  # images are checked when decoded
    assert par.get(0).label is True and par.get(0).image.size == (32, 24)
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"prompt": ["a", "b"], "image": [str(img), str(img)], "label": [1, 0]})
    hf = load_unpaired_source(ds)
    assert hf.labels().tolist() == [True, False] and hf.get(1).label is False


def test_pickapic_pairs_split_into_labelled_rows(tmp_path):
    path = tmp_path / "train-00000.parquet"
    info = make_pickapic_parquet(path, 10, bad_rows={"bad_label": 1})
    source = load_unpaired_source(path)
    assert isinstance(source, PairSplitSource)
    report = source.scan()
    assert report["tie"] == 2 and report["bad_label"] == 1  # the paired reader's own counts
    pairs = source.pairs
    assert len(source) == 2 * len(pairs) and source.labels().tolist() == [True, False] * len(pairs)
    for i in range(len(pairs)):
        pair = pairs.get(i)
        chosen, rejected = source.get(2 * i), source.get(2 * i + 1)
        assert chosen.label and not rejected.label and chosen.prompt == pair.prompt
        assert chosen.image.tobytes() == pair.chosen.tobytes()
        assert rejected.image.tobytes() == pair.rejected.tobytes()
    del info


def test_split_pair_dataset_keeps_cached_latents_and_conditions():
    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"prompt": f"p{i}", "key": f"k{i}", "chosen_latents": torch.full((2,), float(i)),
                    "rejected_latents": torch.full((2,), -float(i)),
                    "cond_chosen": {"e": torch.tensor([1.0 + i])}, "cond_rejected": {"e": torch.tensor([-1.0 - i])}}

    rows = SplitPairDataset(Pairs())
    batch = collate_unpaired([rows[i] for i in range(4)])
    assert batch["label"].tolist() == [True, False, True, False]
    assert batch["latents"][:, 0].tolist() == [0, 0, 1, -1] and batch["cond"]["e"][:, 0].tolist() == [1, -1, 2, -2]
    assert batch["key"] == ["k0:chosen", "k0:rejected", "k1:chosen", "k1:rejected"]


# ---- configuration -------------------------------------------------------------------------------
@pytest.mark.parametrize("values, field", [
    (dict(method="sft", safeguard=True), "safeguard"),
    (dict(method="kto", safeguard=True), "safeguard"),
    (dict(method="mapo", safeguard=True), "safeguard"),
    (dict(method="chats", safeguard=True), "safeguard"),
    (dict(method="dpo", safeguard=True, safeguard_mu=1.5), "safeguard_mu"),
    (dict(method="dpo", safeguard_scope="step"), "safeguard_scope"),
    (dict(method="kto", kto_undesirable_weight=0.0), "kto_undesirable_weight"),
    (dict(method="mapo", mapo_beta=-1.0), "mapo_beta"),
    (dict(method="mapo", mapo_snr=0.0), "mapo_snr"),
])
def test_beyond_paper_keys_are_checked_with_one_line_errors(values, field):
    with pytest.raises(ConfigError) as err:
        TrainConfig(model_name_or_path="m", dataset_name="d", **values).validate()
    assert str(err.value).startswith(f"{field}:")
    for method in PAIR_OBJECTIVES:
        TrainConfig(model_name_or_path="m", dataset_name="d", method=method, safeguard=True).validate()


# ---- snpo train, end to end ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("beyond")
    data = root / "train-00000.parquet"
    make_pickapic_parquet(data, 8, with_ties=False)
    return root, make_sd15(root / "sd"), data


def args_for(model, data, out, **overrides) -> list[str]:
    values = dict(model_name_or_path=model, dataset_name=data, output_dir=out, resolution=RESOLUTION,
                  per_device_train_batch_size=2, learning_rate=1e-2, lr_scheduler="constant", beta=500,
                  lora_rank=4, max_steps=2, checkpointing_steps=0, report_to="none", seed=0, cfg_dropout=0.5)
    values.update(overrides)
    return ["train", *[x for k, v in values.items() for x in (f"--{k}", str(v))]]


def sd15_images(model, lora=None, unet=None):
    from diffusers import StableDiffusionPipeline

    kwargs = {"unet": unet} if unet is not None else {}
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    return pipe("a red cat", num_inference_steps=2, height=RESOLUTION, width=RESOLUTION,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def test_kto_trains_from_unpaired_jsonl_with_bad_rows_counted_and_loads_into_diffusers(world, tmp_path, capsys):
    root, model, _ = world
    data = make_unpaired_jsonl(tmp_path / "fb")
    out = tmp_path / "kto"
    assert main(args_for(model, data, out, method="kto", max_steps=4)) == 0
    printed = capsys.readouterr().out
    assert ("kept 7 of 12 rows; skipped: empty_caption 1, overlong_caption 1, bad_label 1, unreadable_image 1, "
            "malformed_row 1; 4 desirable and 3 undesirable images") in printed
    card = (out / "README.md").read_text()
    assert "unreadable_image 2" in card  # the corrupt image, met while training and substituted
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["loss"]) and "kto/reference_point" in m for m in lines)
    assert np.abs(sd15_images(model, lora=out) - sd15_images(model)).max() > 1e-3


def test_kto_reference_point_is_the_steps_under_gradient_accumulation(world, tmp_path, monkeypatch):
    """Batch 2 and batch 1 with accumulation 2 train the same weights: the reference point is
    the whole step's. Without the step preview each micro-batch would use its own."""
    from snpo.methods.kto import KTOMethod

    root, model, data = world
    runs = {}
    for name, extra in [("batch2", {}), ("accum2", dict(per_device_train_batch_size=1, gradient_accumulation_steps=2))]:
        assert main(args_for(model, data, tmp_path / name, method="kto", max_steps=3, **extra)) == 0
        runs[name] = load_file(tmp_path / name / "pytorch_lora_weights.safetensors")
    for key in runs["batch2"]:
        torch.testing.assert_close(runs["accum2"][key], runs["batch2"][key], atol=2e-5, rtol=1e-4)  # float noise
    monkeypatch.setattr(KTOMethod, "prepare_step", None)  # control: per-micro-batch reference points
    assert main(args_for(model, data, tmp_path / "naive", method="kto", max_steps=3, per_device_train_batch_size=1,
                         gradient_accumulation_steps=2)) == 0
    naive = load_file(tmp_path / "naive" / "pytorch_lora_weights.safetensors")
    gap = max((naive[k] - runs["batch2"][k]).abs().max().item() for k in naive)
    print("control gap", gap)
    assert gap > 1e-3


def test_mapo_runs_no_reference_and_keeps_no_frozen_copy(world, tmp_path):
    from diffusers import UNet2DConditionModel

    from snpo.training.job import build_job

    root, model, data = world
    for lora in (4, 0):
        out = tmp_path / f"mapo-{lora}"
        config = TrainConfig(model_name_or_path=str(model), dataset_name=str(data), output_dir=str(out),
                             resolution=RESOLUTION, per_device_train_batch_size=2, learning_rate=1e-3,
                             lr_scheduler="constant", lora_rank=lora, max_steps=2, checkpointing_steps=0,
                             report_to="none", method="mapo")
        job = build_job(config, show_progress=False)
        assert job.backbone._reference is None  # full fine-tune: no frozen copy either

        def no_reference():
            raise AssertionError("MaPO ran the reference")

        job.backbone.reference = no_reference
        job.trainer.train()
        if lora:
            after = sd15_images(model, lora=out)
        else:
            after = sd15_images(model, unet=UNet2DConditionModel.from_pretrained(out, subfolder="unet"))
        assert np.abs(after - sd15_images(model)).max() > 1e-3


def test_safeguarded_dpo_trains_and_loads_into_diffusers(world, tmp_path):
    root, model, data = world
    out = tmp_path / "dpo-safeguard"
    assert main(args_for(model, data, out, method="dpo", safeguard="true", safeguard_mu=0.9)) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= m["safeguard/factor"] <= 1 for m in lines)
    assert np.abs(sd15_images(model, lora=out) - sd15_images(model)).max() > 1e-3


@pytest.fixture(scope="module")
def sd3_model(world):
    return make_sd3(world[0] / "sd3")


@pytest.mark.parametrize("method, extra", [("kto", {}), ("mapo", {}), ("snpo", {"safeguard": "true"})])
def test_sd3_trains_each_and_loads_into_the_pipeline(method, extra, world, sd3_model, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    root, _, data = world
    out = tmp_path / method
    assert main(args_for(sd3_model, data, out, method=method, max_sequence_length=24, **extra)) == 0
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_model)
    pipe.set_progress_bar_config(disable=True)

    def images():
        return pipe("a red cat", num_inference_steps=2, height=RESOLUTION, width=RESOLUTION, max_sequence_length=24,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    before = images()
    pipe.load_lora_weights(out)
    assert np.abs(images() - before).max() > 1e-3


# ---- snpo bench ----------------------------------------------------------------------------------
def test_bench_shows_each_next_to_dpo_in_one_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SNPO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--variants", "dpo,dpo-safeguard,kto,mapo,snpo-full,mapo-full",
                 "--output_dir", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["failures"] == {}
    rows = {h["what"]: h["ratio"] for h in summary["headline"]}
    for what in ("DPO + SDPO safeguard vs DPO step time", "Diffusion-KTO vs DPO step time (the same images a step)",
                 "MaPO vs DPO step time (no reference forward)", "MaPO vs DPO: peak memory",
                 "MaPO vs SNPO full fine-tune: peak memory (no frozen reference copy)"):
        assert rows[what] and rows[what] > 0, what
    v = summary["variants"]
    assert "reference_forward" not in v["mapo"]["flops_per_step"]
    assert v["mapo-full"]["parameters"]["reference_copy"] == 0 < v["snpo-full"]["parameters"]["reference_copy"]


# ---- several processes ----------------------------------------------------------------------------
@pytest.mark.slow
def test_kto_two_processes_equal_one_process_with_accumulation(world, tmp_path):
    root, model, data = world
    args = args_for(model, data, tmp_path / "two", method="kto", per_device_train_batch_size=1, max_steps=3)
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"), "-m", "snpo.cli"]
    proc = subprocess.run([*launch, *args], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = tmp_path / "one"
    assert main(args_for(model, data, one, method="kto", per_device_train_batch_size=1, max_steps=3,
                         gradient_accumulation_steps=2)) == 0
    a = load_file(tmp_path / "two" / "pytorch_lora_weights.safetensors")
    b = load_file(one / "pytorch_lora_weights.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


# ---- the toy study's "beyond the paper" table ------------------------------------------------------
def test_toy_study_runs_and_reports_the_beyond_paper_table():
    from snpo.toy import stats as S
    from snpo.toy.demo import DemoConfig
    from snpo.toy.demo_report import Table, _beyond_paper, instrument
    from snpo.toy.study import RunResult, RunSpec

    runs = {r.name: r for r in DemoConfig(beyond_paper=True, batch_size=16).runs()}
    assert runs["snpo+safeguard"].method == "snpo" and dict(runs["snpo+safeguard"].overrides) == {"safeguard": True}
    assert dict(runs["dpo+safeguard"].overrides) == {"safeguard": True}
    assert dict(runs["kto"].overrides) == {"per_device_train_batch_size": 32}  # a pair step's images
    assert runs["mapo"].method == "mapo" and {r.pool for r in runs.values() if r.group == "beyond"} == {"pickapic-like"}
    assert "kto" not in {r.name for r in DemoConfig().runs()}

    rng = np.random.default_rng(0)
    base = rng.normal(0.6, 0.05, size=(4, 24))
    shift = {"reference": 0.0, "dpo": 0.03, "snpo": 0.05, "snpo+safeguard": 0.08, "dpo+safeguard": 0.05,
             "kto": 0.03, "mapo": 0.0}
    results = []
    for name, d in shift.items():
        group = {"reference": "reference", "dpo": "main", "snpo": "main"}.get(name, "beyond")
        arrays = {"label": base + d, "heldout": base + d, "sharpness": np.ones_like(base)}
        results.append(RunResult(RunSpec(name, None if name == "reference" else name.split("+")[0], "p", group),
                                 0, {"train_seconds": 1.0}, arrays))
    table = Table(results, "p")
    config = SimpleNamespace(primary_pool="p", quick=False, noninferiority_margin=0.01, batch_size=16)
    report = {"regimes": {"p": {"instrument": instrument(table, "p")}}}
    md = "\n".join(_beyond_paper(table, config, report))
    verdicts = {c["claim"].split(":")[0]: c["verdict"] for c in report["beyond_paper"]["claims"]}
    assert verdicts["They add up"] == S.HOLDS  # +0.08 vs +0.05
    assert verdicts["The safeguard makes the bound unnecessary"] == S.HOLDS  # equal to snpo
    assert verdicts["No reference needed"] != S.HOLDS  # MaPO 0.03 below DPO
    assert "## Beyond the paper" in md and "| kto |" in md
    quick = SimpleNamespace(**{**vars(config), "quick": True})
    assert "No verdicts (quick run)" in "\n".join(_beyond_paper(table, quick, {"regimes": {}}))


def test_split_rows_see_the_pairs_images_crops_and_conditions(tmp_path):
    """A split row is its pair's image with the pair's own random crop and flip, and encodes
    (SDXL: time_ids from its size and crop) to the pair's chosen/rejected rows."""
    from snpo.backbones import load_backbone
    from snpo.data import PreferencePairDataset, collate_pairs, load_preference_source
    from snpo.methods.kto import encode_items
    from tiny_pipelines import make_sdxl

    path = tmp_path / "train-00000.parquet"
    make_pickapic_parquet(path, 6, with_ties=False)
    transform = PairedTransform(RESOLUTION, center_crop=False, random_flip=True)
    pairs = PreferencePairDataset(load_preference_source(path), transform, seed=3)
    rows = UnpairedDataset(load_unpaired_source(path), transform, seed=3)
    pairs.set_epoch(2), rows.set_epoch(2)
    pair_batch = collate_pairs([pairs[i] for i in range(3)])
    row_batch = collate_unpaired([rows[i] for i in range(6)])
    for side, rows_of_side in (("chosen", slice(0, None, 2)), ("rejected", slice(1, None, 2))):
        for key in ("pixels", "original_size", "crop_top_left"):
            torch.testing.assert_close(row_batch[key][rows_of_side], pair_batch[f"{side}_{key}"])
    backbone = load_backbone(make_sdxl(tmp_path / "sdxl"))
    chosen, rejected, cond = backbone.encode_batch(pair_batch)
    latents, row_cond = encode_items(backbone, row_batch)
    torch.testing.assert_close(latents[0::2], chosen)
    torch.testing.assert_close(latents[1::2], rejected)
    for key, value in cond.items():
        torch.testing.assert_close(row_cond[key][0::2], value[:3], msg=key)
        torch.testing.assert_close(row_cond[key][1::2], value[3:], msg=key)
