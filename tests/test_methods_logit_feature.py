"""Logit methods (KD, DKD) against hand-computed values; feature methods (AT, FitNet) on zoo models."""

from __future__ import annotations

import math

import pytest
import torch

from dfakd import models
from dfakd.errors import DfakdError
from dfakd.methods.at import AT
from dfakd.methods.dkd import DKD
from dfakd.methods.fitnet import FitNet
from dfakd.methods.kd import KD
from dfakd.models import NetFeatures

# a fixed tiny batch: 2 samples x 3 classes
S_LOGITS = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]
T_LOGITS = [[3.0, 1.0, 0.2], [1.0, 1.5, -2.0]]
LABELS = [2, 0]


@pytest.fixture(scope="module")
def pair():
    """Teacher resnet20 and student resnet8 (CIFAR, 10 classes)."""
    torch.manual_seed(0)
    return models.build("resnet20", 10), models.build("resnet8", 10)


def logit_feats(logits: list[list[float]], requires_grad: bool = False) -> NetFeatures:
    return NetFeatures(candidates=[], logits=torch.tensor(logits, requires_grad=requires_grad))


def softmax(z: list[float], T: float) -> list[float]:
    e = [math.exp(v / T) for v in z]
    total = sum(e)
    return [v / total for v in e]


def kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) = sum_i p_i log(p_i / q_i)."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


# ---------------------------------------------------------------- KD


def test_kd_equals_hand_computed_value():
    T, weight = 4.0, 0.9
    per_sample = [kl(softmax(t, T), softmax(s, T)) for s, t in zip(S_LOGITS, T_LOGITS, strict=True)]
    expected = weight * T * T * sum(per_sample) / len(per_sample)

    method = KD(models.build("resnet8", 10), models.build("resnet8", 10), {})
    out = method(logit_feats(S_LOGITS), logit_feats(T_LOGITS), torch.tensor(LABELS), 0.0)
    assert set(out) == {"kd"}
    assert out["kd"].item() == pytest.approx(expected, rel=1e-5)


def test_kd_options_change_value():
    T, weight = 2.0, 3.0
    per_sample = [kl(softmax(t, T), softmax(s, T)) for s, t in zip(S_LOGITS, T_LOGITS, strict=True)]
    expected = weight * T * T * sum(per_sample) / len(per_sample)
    net = models.build("resnet8", 10)
    method = KD(net, net, {"weight": weight, "temperature": T})
    out = method(logit_feats(S_LOGITS), logit_feats(T_LOGITS), torch.tensor(LABELS), 5.0)
    assert out["kd"].item() == pytest.approx(expected, rel=1e-5)


def test_kd_identical_logits_is_zero_and_grad_reaches_student_only():
    net = models.build("resnet8", 10)
    method = KD(net, net, {})
    logits = torch.randn(4, 10).tolist()
    same = method(logit_feats(logits), logit_feats(logits), torch.zeros(4), 0.0)
    assert same["kd"].item() == 0.0
    s = logit_feats(S_LOGITS, requires_grad=True)
    t = logit_feats(T_LOGITS, requires_grad=True)
    method(s, t, torch.tensor(LABELS), 0.0)["kd"].backward()
    assert s.logits.grad is not None and s.logits.grad.abs().sum() > 0
    assert t.logits.grad is None


# ---------------------------------------------------------------- DKD


def dkd_by_hand(T: float) -> tuple[float, float]:
    """Unweighted (batch-mean, times T^2) TCKD and NCKD of the fixed batch, written out step by step."""
    tckd, nckd = [], []
    for s, t, y in zip(S_LOGITS, T_LOGITS, LABELS, strict=True):
        p_s, p_t = softmax(s, T), softmax(t, T)
        others = [j for j in range(len(s)) if j != y]
        b_s = [p_s[y], sum(p_s[j] for j in others)]
        b_t = [p_t[y], sum(p_t[j] for j in others)]
        tckd.append(kl(b_t, b_s))
        # softmax over the non-target classes only
        q_s = softmax([s[j] for j in others], T)
        q_t = softmax([t[j] for j in others], T)
        nckd.append(kl(q_t, q_s))
    n = len(LABELS)
    return T * T * sum(tckd) / n, T * T * sum(nckd) / n


@pytest.mark.parametrize(
    "options",
    [{}, {"weight": 0.5, "alpha": 1.5, "beta": 3.0, "temperature": 2.0, "warmup_epochs": 0}],
)
def test_dkd_equals_hand_computed_value(options):
    full = {**DKD.DEFAULTS, **options}
    tckd, nckd = dkd_by_hand(full["temperature"])
    net = models.build("resnet8", 10)
    method = DKD(net, net, options)
    out = method(logit_feats(S_LOGITS), logit_feats(T_LOGITS), torch.tensor(LABELS), 100.0)
    assert set(out) == {"dkd_tckd", "dkd_nckd"}
    assert out["dkd_tckd"].item() == pytest.approx(full["weight"] * full["alpha"] * tckd, rel=1e-5)
    assert out["dkd_nckd"].item() == pytest.approx(full["weight"] * full["beta"] * nckd, rel=1e-5)


def test_dkd_warmup():
    net = models.build("resnet8", 10)
    method = DKD(net, net, {"warmup_epochs": 20})
    s, t, y = logit_feats(S_LOGITS), logit_feats(T_LOGITS), torch.tensor(LABELS)
    at0, half, full, later = (method(s, t, y, e) for e in (0.0, 10.0, 20.0, 35.5))
    for key in ("dkd_tckd", "dkd_nckd"):
        assert full[key].item() > 0
        assert at0[key].item() == 0.0
        assert half[key].item() == pytest.approx(0.5 * full[key].item(), rel=1e-6)
        assert later[key].item() == pytest.approx(full[key].item(), rel=1e-6)
    no_warmup = DKD(net, net, {"warmup_epochs": 0})(s, t, y, 0.0)
    assert no_warmup["dkd_tckd"].item() == pytest.approx(full["dkd_tckd"].item(), rel=1e-6)


def test_dkd_matches_reference_formula_on_random_logits():
    """Cross-check against the paper's formula as mdistiller writes it: log of summed probabilities."""
    torch.manual_seed(1)
    zs, zt, y = torch.randn(8, 10) * 3, torch.randn(8, 10) * 3, torch.randint(0, 10, (8,))
    T, beta = 4.0, 8.0
    gt = torch.nn.functional.one_hot(y, 10).float()
    p_s, p_t = torch.softmax(zs / T, 1), torch.softmax(zt / T, 1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * (1 - gt)).sum(1)], 1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], 1)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(1).mean() * T**2
    q_t = torch.softmax(zt / T - 1000.0 * gt, 1)
    log_q_s = torch.log_softmax(zs / T - 1000.0 * gt, 1)
    nckd = (q_t * (q_t.clamp_min(1e-30).log() - log_q_s)).sum(1).mean() * T**2
    net = models.build("resnet8", 10)
    out = DKD(net, net, {})(NetFeatures([], zs), NetFeatures([], zt), y, 20.0)
    assert out["dkd_tckd"].item() == pytest.approx(tckd.item(), rel=1e-4)
    assert out["dkd_nckd"].item() == pytest.approx(beta * nckd.item(), rel=1e-4)


def test_dkd_identical_logits_is_zero_and_finite_when_confident():
    net = models.build("resnet8", 10)
    method = DKD(net, net, {"warmup_epochs": 0})
    z = torch.randn(4, 10)
    y = torch.tensor([0, 1, 2, 3])
    out = method(NetFeatures([], z), NetFeatures([], z.clone()), y, 0.0)
    assert out["dkd_tckd"].item() == 0.0 and out["dkd_nckd"].item() == 0.0
    # an extremely confident student: the non-target mass underflows in float32, the loss stays finite
    zs = torch.zeros(2, 10, requires_grad=True)
    with torch.no_grad():
        zs[:, 0] = 1000.0
    out = method(NetFeatures([], zs), NetFeatures([], torch.randn(2, 10)), torch.tensor([0, 0]), 0.0)
    total = out["dkd_tckd"] + out["dkd_nckd"]
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(zs.grad).all()


# ---------------------------------------------------------------- AT


def test_at_identical_features_is_zero(pair):
    teacher, _ = pair
    with torch.no_grad():
        feats = teacher.forward_features(torch.randn(2, 3, 32, 32))
    assert AT(teacher, teacher, {})(feats, feats, torch.zeros(2), 0.0)["at"].item() == 0.0


def test_at_value_and_gradients(pair):
    teacher, student = pair
    teacher.zero_grad(set_to_none=True)
    student.zero_grad(set_to_none=True)
    x = torch.randn(2, 3, 32, 32)
    t = teacher.forward_features(x)  # with grad on purpose: the method must not backprop into the teacher
    s = student.forward_features(x)
    method = AT(teacher, student, {"weight": 1000.0, "p": 2.0})
    out = method(s, t, torch.zeros(2), 0.0)
    assert set(out) == {"at"}

    expected = 0.0
    for fs, ft in zip(s.group_ends, t.group_ends, strict=True):  # resnet20/resnet8 pair all three groups
        a_s = torch.relu(fs).pow(2).mean(1).reshape(2, -1)
        a_t = torch.relu(ft).pow(2).mean(1).reshape(2, -1)
        a_s = a_s / a_s.norm(dim=1, keepdim=True)
        a_t = a_t / a_t.norm(dim=1, keepdim=True)
        expected += ((a_s - a_t) ** 2).mean().item()
    assert out["at"].item() == pytest.approx(1000.0 * expected, rel=1e-5)
    assert out["at"].item() > 0

    out["at"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert list(method.parameters()) == []


def test_at_only_uses_groups_of_the_same_spatial_size():
    teacher, student = models.build("resnet20", 10), models.build("resnet8", 10)
    method = AT(teacher, student, {})
    assert method.pairs == [(0, 0), (1, 1), (2, 2)]


# ---------------------------------------------------------------- FitNet


def test_fitnet_value_and_gradients():
    teacher, student = models.build("wrn_16_2", 10), models.build("resnet8", 10)
    method = FitNet(teacher, student, {})
    # three matched pairs -> the middle one (16x16): resnet8 32 channels -> wrn_16_2 64 channels
    assert (method.teacher_group, method.student_group) == (1, 1)
    conv = method.regressor[0]
    assert (conv.in_channels, conv.out_channels, conv.bias) == (32, 64, None)

    x = torch.randn(2, 3, 32, 32)
    t = teacher.forward_features(x)
    s = student.forward_features(x)
    out = method(s, t, torch.zeros(2), 0.0)
    assert set(out) == {"fitnet"}
    guided = method.regressor(torch.relu(s.group_ends[1]))
    expected = 100.0 * ((guided - torch.relu(t.group_ends[1])) ** 2).mean()
    assert out["fitnet"].item() == pytest.approx(expected.item(), rel=1e-5)

    out["fitnet"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.regressor.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_fitnet_hint_group_option(pair):
    teacher, student = pair
    assert FitNet(teacher, student, {"hint_group": 0}).teacher_group == 0
    assert FitNet(teacher, student, {"hint_group": 2}).regressor[0].out_channels == 64
    for bad in (3, -2, 1.0, "1", True):
        with pytest.raises(DfakdError, match="hint_group"):
            FitNet(teacher, student, {"hint_group": bad})


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("cls", [KD, DKD, AT, FitNet])
def test_unknown_option_is_named(pair, cls):
    teacher, student = pair
    with pytest.raises(DfakdError, match="tempreature") as err:
        cls(teacher, student, {"tempreature": 4.0})
    assert cls.name in str(err.value)


@pytest.mark.parametrize(
    ("cls", "options", "key"),
    [
        (KD, {"temperature": 0.0}, "temperature"),
        (DKD, {"temperature": -1.0}, "temperature"),
        (DKD, {"warmup_epochs": -5}, "warmup_epochs"),
        (AT, {"p": 0.0}, "p"),
    ],
)
def test_bad_option_values_are_rejected(pair, cls, options, key):
    teacher, student = pair
    with pytest.raises(DfakdError, match=f"'{key}'"):
        cls(teacher, student, options)


def test_defaults_and_names():
    assert (KD.name, DKD.name, AT.name, FitNet.name) == ("kd", "dkd", "at", "fitnet")
    assert KD.DEFAULTS == {"weight": 0.9, "temperature": 4.0}
    assert DKD.DEFAULTS == {"weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 20}
    assert AT.DEFAULTS == {"weight": 1000.0, "p": 2.0}
    assert FitNet.DEFAULTS == {"weight": 100.0, "hint_group": -1}
