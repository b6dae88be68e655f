"""DFA (METHOD.md sections 2-4): bridge-loss gradient paths, the search's alternating steps, derivation
modes, ``dfa`` with the ``last`` aggregation against ``ofd``, margins against OFD's closed form, clear
errors for bad aggregation files, and a tiny search -> derive -> distill run through the command line.

Models: teacher ``resnet20`` and student ``resnet8`` (three groups at 32/16/8 px, 3 and 1 blocks each).
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import run_cli, write_config
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from dfakd import cli, config, data, jobs, models
from dfakd.jobs import search as search_job
from dfakd.jobs.common import test_stream as make_test_stream
from dfakd.methods import aggregation
from dfakd.methods.base import DistillContext, match_groups
from dfakd.methods.bridge import BridgeSearch, frozen_batchnorm_stats, unit_distance
from dfakd.methods.ofd import DFA, OFD
from dfakd.models import FeatureNet, GroupInfo, NetFeatures
from dfakd.training.loop import evaluate

T_ARCH, S_ARCH = "resnet20", "resnet8"
T_LAYERS = {32: ["layer1.0", "layer1.1", "layer1.2"], 16: ["layer2.0", "layer2.1", "layer2.2"]}
T_LAYERS[8] = ["layer3.0", "layer3.1", "layer3.2"]
SPATIALS = [32, 16, 8]

# ------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a small shared CPU, torch's default thread pool spends most of its time
    waiting for a busy core (a resnet20 step on 4 images took ~3 s with 2 threads, 15 ms with 1).
    The CLI jobs below get the same through ``runtime.threads: 1``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_pair(num_classes: int = 10, seed: int = 0) -> tuple[FeatureNet, FeatureNet]:
    """A frozen eval-mode teacher and a train-mode student."""
    torch.manual_seed(seed)
    teacher = models.build(T_ARCH, num_classes).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = models.build(S_ARCH, num_classes).train()
    return teacher, student


def random_batch(seed: int, n: int = 4, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, num_classes, (n,), generator=gen)


def save_teacher(path: Path, num_classes: int, seed: int = 0) -> Path:
    """A teacher file in the package's layout (what `dfakd train` / `import-teacher` write)."""
    torch.manual_seed(seed)
    state = models.build(T_ARCH, num_classes).state_dict()
    torch.save({"model": state, "arch": T_ARCH, "num_classes": num_classes}, path)
    return path


COLORS = [(210, 50, 50), (50, 210, 50), (50, 50, 210)]


def write_separable_folder(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """ImageFolder of 32x32 PNGs, one clearly different colour per class under mild noise."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, colour in enumerate(COLORS):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                noise = rng.integers(-30, 31, size=(32, 32, 3))
                arr = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{i:03d}.png")
    return root


def job_config(data_root: Path, base: Path, teacher_ckpt: Path | None = None, **sections: Any) -> dict:
    cfg: dict[str, Any] = {
        "seed": 0,
        "results_dir": str(base / "results"),
        "dataset": {"name": "imagefolder", "root": str(data_root)},
        "model": {"arch": S_ARCH},
        "teacher": {"arch": T_ARCH, "checkpoint": str(teacher_ckpt) if teacher_ckpt else None},
        "recipe": {"epochs": 2, "batch_size": 8, "lr": 0.05, "milestones": [100]},
        "runtime": {"device": "cpu", "eval_batch_size": 64, "log_every": 100, "threads": 1},
        "tracking": {"enabled": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def one_line_error(rc: int, stderr: str, verb: str) -> str:
    """Exit code 2 and exactly one stderr line ``dfakd VERB: error: ...``, no traceback."""
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"dfakd {verb}: error: "), lines[0]
    return lines[0]


# ----------------------------------------------------------------- 1. bridge-loss gradient structure


def _stage(param_name: str) -> int:
    """Forward position of a student parameter: 0 stem, 1..3 layer1..layer3 (groups 0..2), 4 head."""
    top = param_name.split(".")[0]
    return {"conv1": 0, "bn1": 0, "layer1": 1, "layer2": 2, "layer3": 3, "fc": 4}[top]


@pytest.mark.parametrize("i", [0, 1, 2])
def test_bridge_gradients_follow_the_two_paths(i: int):
    teacher, student = build_pair()
    bridge = BridgeSearch(match_groups(teacher, student))
    with torch.no_grad():  # a non-uniform alpha, so nothing hinges on a symmetric starting point
        bridge.betas[i].copy_(torch.tensor([0.3, -0.2, 0.1]))
    x, y = random_batch(1)
    with torch.no_grad():
        t = teacher.forward_features(x)
    s = student.forward_features(x)
    terms = bridge.bridge(student, s, t, y, [i])
    assert set(terms) == {f"ts_{i}", f"st_{i}"}

    params = {f"student.{n}": p for n, p in student.named_parameters()}
    params |= {f"bridge.{n}": p for n, p in bridge.named_parameters()}

    def touched(term: str) -> set[str]:
        """Parameters whose gradient is not None and not all zero."""
        grads = torch.autograd.grad(terms[term], list(params.values()), retain_graph=True, allow_unused=True)
        return {n for n, g in zip(params, grads, strict=True) if g is not None and bool(g.ne(0).any())}

    up_to_i = {f"student.{n}" for n, _ in student.named_parameters() if _stage(n) <= i + 1}
    after_i = {f"student.{n}" for n, _ in student.named_parameters() if _stage(n) > i + 1}
    assert up_to_i and after_i
    beta = f"bridge.betas.{i}"
    ts_conn = {f"bridge.ts.{i}.{n}" for n, _ in bridge.ts[i].named_parameters()}
    st_conn = {f"bridge.st.{i}.{n}" for n, _ in bridge.st[i].named_parameters()}

    # teacher -> student: beta_i, the TS connector and the student after group i; nothing before it
    ts = touched(f"ts_{i}")
    expected_ts = {beta} | ts_conn | after_i
    assert ts == expected_ts, f"missing {sorted(expected_ts - ts)}, unexpected {sorted(ts - expected_ts)}"
    # student -> teacher: beta_i, the ST connector and the student's stem and groups up to i
    st = touched(f"st_{i}")
    expected_st = {beta} | st_conn | up_to_i
    assert st == expected_st, f"missing {sorted(expected_st - st)}, unexpected {sorted(st - expected_st)}"


# ----------------------------------------------- 1b. eq. 11: the student-to-teacher path is scale-free


def _st_term_and_beta_grad(scale: float, i: int = 0, distance: str = "normalized"):
    teacher, student = build_pair()
    torch.manual_seed(1)
    bridge = BridgeSearch(match_groups(teacher, student), st_distance=distance)
    with torch.no_grad():
        bridge.betas[i].copy_(torch.tensor([0.3, -0.2, 0.1]))
    x, y = random_batch(1)
    with torch.no_grad():
        t = teacher.forward_features(x)
        s = student.forward_features(x)
    t.candidates[i] = [c * scale for c in t.candidates[i]]
    st = bridge.bridge(student, s, t, y, [i])[f"st_{i}"]
    (grad,) = torch.autograd.grad(st, [bridge.betas[i]])
    return st.detach(), grad


@settings(max_examples=12, deadline=None, derandomize=True)
@given(scale=st.floats(min_value=1e-3, max_value=1e3))
def test_st_term_and_its_beta_gradient_ignore_the_scale_of_the_candidates(scale: float):
    base_term, base_grad = _st_term_and_beta_grad(1.0)
    term, grad = _st_term_and_beta_grad(scale)
    assert term == pytest.approx(base_term.item(), rel=1e-4, abs=1e-6)
    assert torch.allclose(grad, base_grad, rtol=1e-3, atol=1e-6), (grad, base_grad)


def test_raw_mse_ablation_is_not_scale_free():
    base_term, _ = _st_term_and_beta_grad(1.0, distance="mse")
    term, _ = _st_term_and_beta_grad(2.0, distance="mse")
    assert term.item() != pytest.approx(base_term.item(), rel=1e-2)


def test_st_term_is_zero_when_the_aggregate_is_a_positive_multiple_of_the_mapped_student_feature():
    teacher, student = build_pair()
    bridge = BridgeSearch(match_groups(teacher, student))
    x, y = random_batch(1)
    with torch.no_grad():
        t = teacher.forward_features(x)
        s = student.forward_features(x)
        mapped = bridge.st[1](s.candidates[1][-1])
    t.candidates[1] = [2.5 * mapped, 0.5 * mapped, 7.0 * mapped]  # any alpha mixes them to c * mapped
    st_term = bridge.bridge(student, s, t, y, [1])["st_1"]
    assert st_term.item() == pytest.approx(0.0, abs=1e-6)
    assert unit_distance(mapped, -mapped).item() == pytest.approx(4.0, rel=1e-5)  # opposite: |u - (-u)|^2


def test_connectors_are_1x1_convolutions_with_an_optional_bn():
    pairs = match_groups(*build_pair())
    plain, with_bn = BridgeSearch(pairs), BridgeSearch(pairs, st_bn=True)
    for bridge, layers in ((plain, (nn.Conv2d,)), (with_bn, (nn.Conv2d, nn.BatchNorm2d))):
        for i in range(len(pairs)):
            assert tuple(type(m) for m in bridge.st[i]) == layers
            assert isinstance(bridge.ts[i], nn.Conv2d) and bridge.ts[i].kernel_size == (1, 1)
            assert bridge.st[i][0].kernel_size == (1, 1)


def test_full_derivation_is_the_softmax_of_beta_exactly():
    beta = torch.tensor([0.7, -1.3, 0.25, 2.0], dtype=torch.float32)
    alpha = torch.softmax(beta, 0).tolist()
    assert aggregation.derive_weights(alpha, "full") == alpha  # not renormalized, not rounded
    doc = {"teacher": T_ARCH, "groups": [{"spatial": 8, "layers": ["a", "b", "c", "d"], "alpha": alpha}]}
    agg = aggregation.from_search(doc, "full", 0.1, 2)
    assert list(agg.groups[0].layers.values()) == alpha
    assert config.DEFAULTS["derive"]["mode"] == "full"


# ---------------------------------------------------------------- 2. beta step vs weight step


def test_frozen_batchnorm_stats_keeps_running_statistics_bit_for_bit():
    _, student = build_pair()
    bridge = BridgeSearch(match_groups(*build_pair()))
    x, _ = random_batch(2)
    before = {k: v.clone() for k, v in [*student.state_dict().items(), *bridge.state_dict().items()]}
    momenta = [m.momentum for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
    with frozen_batchnorm_stats(student, bridge):
        s = student.forward_features(x)
        bridge.st[0](s.candidates[0][-1])
    after = {k: v for k, v in [*student.state_dict().items(), *bridge.state_dict().items()]}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.momentum for m in student.modules() if isinstance(m, nn.BatchNorm2d)] == momenta
    student.forward_features(x)  # outside: the statistics do move (the check above is not vacuous)
    assert not torch.equal(before["bn1.running_mean"], student.bn1.running_mean)
    assert int(student.bn1.num_batches_tracked) == int(before["bn1.num_batches_tracked"]) + 1


def _snapshot(student: nn.Module, bridge: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (BN running stats and num_batches_tracked included)."""
    snap = {f"student.{k}": v.detach().clone() for k, v in student.state_dict().items()}
    snap |= {f"bridge.{k}": v.detach().clone() for k, v in bridge.state_dict().items()}
    return snap


def _is_beta(key: str) -> bool:
    return key.startswith("bridge.betas.")


@pytest.mark.slow
def test_search_loop_beta_step_changes_no_weight_and_weight_step_no_beta(tmp_path: Path, monkeypatch):
    """Runs the real `search` loop and snapshots the whole state after every optimizer step (a global
    optimizer post-hook). Algorithm 1's order: every iteration steps beta first, then w. After beta step
    k the next snapshot (after weight step k) may differ in anything but betas, and after weight step k
    the next (after beta step k+1, which includes the beta half's forward under `frozen_batchnorm_stats`)
    only in betas."""
    root = write_separable_folder(tmp_path / "imgs", n_train=8, n_test=2)
    teacher_ckpt = save_teacher(tmp_path / "teacher.pt", num_classes=3)
    cfg = job_config(root, tmp_path, teacher_ckpt, search={"epochs": 1, "batch_size": 4})
    cfg = config.load([write_config(tmp_path / "cfg.yaml", cfg)])

    seen: dict[str, Any] = {}
    original = BridgeSearch.bridge

    def spy(self, student, *args, **kwargs):
        seen["bridge"], seen["student"] = self, student
        return original(self, student, *args, **kwargs)

    monkeypatch.setattr(BridgeSearch, "bridge", spy)
    events: list[tuple[str, list[int], dict[str, torch.Tensor]]] = []

    def post_step(optimizer, args, kwargs):
        kind = "beta" if isinstance(optimizer, torch.optim.Adam) else "weight"
        events.append((kind, list(seen["bridge"].active), _snapshot(seen["student"], seen["bridge"])))

    handle = register_optimizer_step_post_hook(post_step)
    try:
        search_job(cfg, tmp_path / "run")
    finally:
        handle.remove()

    # 12 images per half / batch 4 = 3 steps per phase, 3 groupwise phases
    assert [e[0] for e in events] == ["beta", "weight"] * 9
    assert [e[1] for e in events[::2]] == [[0]] * 3 + [[1]] * 3 + [[2]] * 3
    keys = events[0][2].keys()
    assert any(k.endswith("running_var") for k in keys) and any(
        k.endswith("num_batches_tracked") for k in keys
    )
    # the first beta step ran before any weight step: the weights are still the initial ones
    assert events[0][2]["student.bn1.num_batches_tracked"].item() == 0

    moved = set()
    for k in range(9):
        (_, active, after_b), (_, _, after_w) = events[2 * k], events[2 * k + 1]
        changed = [key for key in keys if _is_beta(key) and not torch.equal(after_b[key], after_w[key])]
        assert not changed, f"weight step {k} changed {changed}"
        # the weight step is real: weights and BN statistics move
        assert not torch.equal(after_b["student.conv1.weight"], after_w["student.conv1.weight"])
        assert not torch.equal(after_b["student.bn1.running_mean"], after_w["student.bn1.running_mean"])
        if k:
            prev_w = events[2 * k - 1][2]
            changed = [k2 for k2 in keys if not _is_beta(k2) and not torch.equal(prev_w[k2], after_b[k2])]
            # between phases (3 steps each) the group just searched is fixed to its derived weights
            fixed = [f"bridge.fixed_{k // 3 - 1}"] if k % 3 == 0 else []
            assert changed == fixed, f"beta step {k} changed {changed[:5]}"
            for g in range(3):
                same = torch.equal(prev_w[f"bridge.betas.{g}"], after_b[f"bridge.betas.{g}"])
                if g not in active:
                    assert same, f"beta step {k} moved the inactive group {g}"
                elif not same:
                    moved.add(g)
    assert moved == {0, 1, 2}


@pytest.mark.slow
def test_search_warmup_steps_the_weights_only_then_searches_as_usual(tmp_path: Path):
    """`search.warmup_epochs` (ours): the first epochs step the weights alone, the betas stay at zero
    (uniform alphas); then the phases run as without the warm-up, and the cosine lr spans all epochs."""
    root = write_separable_folder(tmp_path / "imgs", n_train=8, n_test=2)
    teacher_ckpt = save_teacher(tmp_path / "teacher.pt", num_classes=3)
    cfg = job_config(root, tmp_path, teacher_ckpt, search={"epochs": 1, "batch_size": 4, "warmup_epochs": 2})
    cfg = config.load([write_config(tmp_path / "cfg.yaml", cfg)])
    events: list[tuple[str, float]] = []

    def post_step(optimizer, args, kwargs):
        kind = "beta" if isinstance(optimizer, torch.optim.Adam) else "weight"
        events.append((kind, optimizer.param_groups[0]["lr"]))

    handle = register_optimizer_step_post_hook(post_step)
    try:
        result = search_job(cfg, tmp_path / "run")
    finally:
        handle.remove()
    # 3 steps per epoch: 2 warm-up epochs of weight steps, then 3 groupwise phases of beta + weight
    assert [kind for kind, _ in events] == ["weight"] * 6 + ["beta", "weight"] * 9
    weight_lrs = [lr for kind, lr in events if kind == "weight"]
    assert weight_lrs == sorted(weight_lrs, reverse=True) and weight_lrs[0] == cfg["search"]["w_lr"]
    assert all(any(abs(b) > 0 for b in g["beta"]) for g in result["groups"])
    rows = (tmp_path / "run" / "search_metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 5  # header, 2 warm-up epochs, 3 phases
    header = rows[0].split(",")
    first = dict(zip(header, rows[1].split(","), strict=True))
    # the warm-up's first epoch: the alphas of every group are still uniform (3 candidates each)
    alphas = [float(v) for k, v in first.items() if k.startswith("alpha.")]
    assert alphas and all(abs(a - 1 / 3) < 1e-6 for a in alphas[:3])
    assert float(first["beta_loss"]) > 0  # measured on the beta half, not stepped


# ------------------------------------------------------------------ 3. dfa with `last` == ofd


def test_dfa_with_derived_last_aggregation_equals_ofd(tmp_path: Path):
    cfg_path = write_config(
        tmp_path / "cfg.yaml",
        {"teacher": {"arch": T_ARCH}, "model": {"arch": S_ARCH}, "derive": {"mode": "last"}},
    )
    agg_path = tmp_path / "last.yaml"
    jobs.derive(config.load([cfg_path]), None, agg_path)
    doc = yaml.safe_load(agg_path.read_text())
    assert doc["mode"] == "last"
    assert [g["layers"] for g in doc["groups"]] == [{T_LAYERS[sp][-1]: 1.0} for sp in SPATIALS]

    teacher, student = build_pair()
    torch.manual_seed(7)
    ofd = OFD.from_config(teacher, student, {}, DistillContext(T_ARCH))
    torch.manual_seed(7)
    dfa = DFA.from_config(teacher, student, {}, DistillContext(T_ARCH, str(agg_path)))
    batches = [random_batch(seed, n=8) for seed in (10, 11, 12)]
    ofd.prepare(teacher, batches)
    dfa.prepare(teacher, batches)
    assert ofd.state_dict().keys() == dfa.state_dict().keys()
    for key, value in ofd.state_dict().items():  # connectors, fixed weights, margins
        assert torch.equal(value, dfa.state_dict()[key]), key

    x, y = random_batch(13)
    with torch.no_grad():
        t = teacher.forward_features(x)
    s = student.forward_features(x)
    loss_ofd, loss_dfa = ofd(s, t, y, 0.0)["ofd"], dfa(s, t, y, 0.0)["dfa"]
    assert loss_ofd.item() > 0
    assert torch.equal(loss_ofd, loss_dfa)
    params = [p for n, p in student.named_parameters() if not n.startswith("fc.")]  # the head is unused
    grads_ofd = torch.autograd.grad(loss_ofd, params, retain_graph=True)
    grads_dfa = torch.autograd.grad(loss_dfa, params)
    assert all(torch.equal(a, b) for a, b in zip(grads_ofd, grads_dfa, strict=True))


# --------------------------------------------------- 4. margin of a BN output vs OFD's closed form


class OneBN(FeatureNet):
    """A 'network' whose single group has a single candidate: the output of one eval-mode BN."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.bn = nn.BatchNorm2d(channels)
        self.group_names = [["bn"]]

    def forward_features(self, x: torch.Tensor) -> NetFeatures:
        h = self.bn(x)
        return NetFeatures(candidates=[[h]], logits=h.mean((2, 3)))

    def forward_from(self, group_index: int, h: torch.Tensor) -> torch.Tensor:
        return h.mean((2, 3))

    def describe_groups(self, input_size: int = 32) -> list[GroupInfo]:
        return [GroupInfo(index=0, names=("bn",), channels=self.channels, spatial=input_size)]


def _phi(z: float) -> float:
    return math.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def _Phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def ofd_margin(s: float, m: float) -> float:
    """OFD's closed form (Heo et al. 2019, get_margin_from_BN) for a BN with weight s and bias m."""
    s = abs(s)
    if _Phi(-m / s) > 0.001:
        return m - s * _phi(m / s) / _Phi(-m / s)
    return -3 * s


def margin_tolerance(s: float, p_neg: float, n: int) -> float:
    """Four standard errors of the estimate from n samples of N(m, s^2) with P(x < 0) = p_neg.

    Formula regime: the estimate is the mean of the ~n * p_neg negative values, whose sd is below |s| (a
    truncated normal has less variance than its parent): SE < |s| / sqrt(n * p_neg). Fallback regime: the
    estimate is -3 * (sample sd of n values), and a sample sd has SE ~ |s| / sqrt(2n). (The BN's eps
    scales the output sd by sqrt(var / (var + 1e-5)), under 2e-5 relative here: negligible.)
    """
    if p_neg > 0.001:
        return 4 * abs(s) / math.sqrt(n * p_neg)
    return 4 * 3 * abs(s) / math.sqrt(2 * n)


def test_margin_of_a_bn_output_matches_ofd_closed_form():
    # (BN weight s, BN bias m) per channel: output ~ N(m, s^2); a negative weight; a channel with few
    # negatives (Phi(-2.5) = 0.6%, still the formula); one in the fallback regime (Phi(-4.375) ~ 6e-6)
    channels = [(1.0, 0.0), (2.0, 1.0), (0.5, -1.0), (-1.5, 0.5), (1.0, 2.5), (-0.8, 3.5)]
    running_mean = torch.tensor([0.5, -2.0, 1.0, 3.0, 0.0, -1.0])
    running_var = torch.tensor([1.0, 4.0, 0.25, 2.0, 9.0, 1.0])
    c = len(channels)
    teacher = OneBN(c).eval()
    with torch.no_grad():
        teacher.bn.weight.copy_(torch.tensor([s for s, _ in channels]))
        teacher.bn.bias.copy_(torch.tensor([m for _, m in channels]))
        teacher.bn.running_mean.copy_(running_mean)
        teacher.bn.running_var.copy_(running_var)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(8):  # inputs x ~ N(running_mean, running_var) per channel
        z = torch.randn(32, c, 32, 32, generator=gen)
        x = running_mean.view(1, c, 1, 1) + running_var.sqrt().view(1, c, 1, 1) * z
        batches.append((x, torch.zeros(32, dtype=torch.long)))
    n = 8 * 32 * 32 * 32  # samples per channel: 262144

    method = OFD.from_config(teacher, OneBN(c), {}, DistillContext("onebn"))
    method.prepare(teacher, batches)
    margin = method.margin_0.tolist()

    for ch, (s, m) in enumerate(channels):
        expected = ofd_margin(s, m)
        p_neg = _Phi(-m / abs(s))
        tol = margin_tolerance(s, p_neg, n)
        assert margin[ch] == pytest.approx(expected, abs=tol), (ch, s, m, margin[ch], expected, tol)
    assert margin[-1] == pytest.approx(-2.4, abs=0.01)  # the fallback really was taken


# ---------------------------------------------------------------------------- 5. derivation modes

ALPHA = {32: [0.05, 0.25, 0.70], 16: [0.5, 0.3, 0.2], 8: [0.08, 0.12, 0.80]}


def search_doc() -> dict[str, Any]:
    """A search.json as `dfakd search` writes it, with beta = log(alpha) (so softmax(beta) = alpha)."""
    groups = []
    for gi, sp in enumerate(SPATIALS):
        beta = [math.log(a) for a in ALPHA[sp]]
        alpha = torch.softmax(torch.tensor(beta, dtype=torch.float64), 0).tolist()
        groups.append(
            {
                "spatial": sp,
                "teacher_group": gi,
                "student_group": gi,
                "layers": T_LAYERS[sp],
                "beta": beta,
                "alpha": alpha,
            }
        )
    return {"teacher": T_ARCH, "student": S_ARCH, "dataset": "imagefolder", "seed": 0, "groups": groups}


def _norm(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items()}


L1, L2, L3 = T_LAYERS[32], T_LAYERS[16], T_LAYERS[8]
ARGMAX = [{L1[2]: 1.0}, {L2[0]: 1.0}, {L3[2]: 1.0}]
# (mode, tau, k) -> expected layers and weights per group (32, 16, 8 px), in forward order
EXPECTED = {
    ("prune", 0.1, 2): [
        _norm({L1[1]: 0.25, L1[2]: 0.70}),
        {L2[0]: 0.5, L2[1]: 0.3, L2[2]: 0.2},
        _norm({L3[1]: 0.12, L3[2]: 0.80}),
    ],
    ("prune", 0.28, 2): [{L1[2]: 1.0}, {L2[0]: 0.625, L2[1]: 0.375}, {L3[2]: 1.0}],
    ("prune", 0.9, 2): ARGMAX,  # nothing reaches tau: the largest alpha is kept
    ("argmax", 0.1, 2): ARGMAX,
    ("topk", 0.1, 2): [
        _norm({L1[1]: 0.25, L1[2]: 0.70}),
        {L2[0]: 0.625, L2[1]: 0.375},
        _norm({L3[1]: 0.12, L3[2]: 0.80}),
    ],
    ("topk", 0.1, 1): ARGMAX,
    ("full", 0.1, 2): [dict(zip(T_LAYERS[sp], ALPHA[sp], strict=True)) for sp in SPATIALS],
}
FIXED = {
    "last": [{L1[2]: 1.0}, {L2[2]: 1.0}, {L3[2]: 1.0}],
    "average": [dict.fromkeys(T_LAYERS[sp], 1 / 3) for sp in SPATIALS],
}


def assert_groups(agg: aggregation.Aggregation, expected: list[dict[str, float]]) -> None:
    assert [g.spatial for g in agg.groups] == SPATIALS
    for g, exp in zip(agg.groups, expected, strict=True):
        assert list(g.layers) == list(exp), g.spatial  # same layers, in the teacher's forward order
        assert g.layers == pytest.approx(exp, rel=1e-9, abs=1e-12), g.spatial
        assert sum(g.layers.values()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(("mode", "tau", "k"), list(EXPECTED))
def test_from_search_modes(mode: str, tau: float, k: int):
    agg = aggregation.from_search(search_doc(), mode, tau, k)
    assert agg.teacher == T_ARCH and agg.mode == mode
    assert_groups(agg, EXPECTED[(mode, tau, k)])


def test_fixed_modes():
    pairs = match_groups(models.build(T_ARCH, 10), models.build(S_ARCH, 10))
    for mode, expected in FIXED.items():
        assert_groups(aggregation.fixed(T_ARCH, pairs, mode), expected)
    a, b, c = (aggregation.fixed(T_ARCH, pairs, "random", seed=sd) for sd in (3, 3, 4))
    assert [g.layers for g in a.groups] == [g.layers for g in b.groups]
    assert [g.layers for g in a.groups] != [g.layers for g in c.groups]
    for g in [*a.groups, *c.groups]:
        assert list(g.layers) == T_LAYERS[g.spatial] and all(w > 0 for w in g.layers.values())
        assert sum(g.layers.values()) == pytest.approx(1.0, abs=1e-12)


def test_ofd_loss_is_the_sum_of_its_group_terms_each_weighted_by_its_decay():
    torch.manual_seed(0)
    teacher, student = models.build("resnet20", 10).eval(), models.build("resnet8", 10)
    context = DistillContext("resnet20")
    ofd = OFD.from_config(teacher, student, OFD.resolve_options({"group_decay": 3.0}), context)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    s, t = student.forward_features(x), teacher.forward_features(x)
    terms = ofd.group_terms(s, t, 4)
    assert torch.allclose(ofd(s, t, y, 0.0)["ofd"], sum(terms))
    for i, term in enumerate(terms):
        mapped, target = ofd.mapped_and_target(s, t, i)
        mask = (mapped > target) | (target > 0)
        expected = 1e-3 / 4 * ((mapped - target).pow(2) * mask).sum() / 3.0 ** (2 - i)
        assert torch.allclose(term, expected)


@pytest.mark.parametrize("mixed", [32, 16, 8])
def test_the_stage2_gap_aggregations_average_one_group_of_resnet20_and_keep_last_elsewhere(mixed: int):
    path = Path(__file__).parents[1] / f"config/experiments/aggregations/resnet20-average-at-{mixed}px.yaml"
    agg = aggregation.load(path)
    teacher, student = models.build("resnet20", 10), models.build("resnet8", 10)
    pairs = match_groups(teacher, student)
    aggregation.check_against(agg, "resnet20", teacher, pairs, str(path))
    for p in pairs:
        weights = agg.weight_vector(p.teacher.names, p.spatial).tolist()
        expected = [1 / 3] * 3 if p.spatial == mixed else [0.0, 0.0, 1.0]
        assert weights == pytest.approx(expected)


@pytest.fixture
def derive_setup(tmp_path: Path) -> tuple[Path, Path]:
    cfg = write_config(
        tmp_path / "cfg.yaml",
        {"teacher": {"arch": T_ARCH}, "model": {"arch": S_ARCH}, "tracking": {"enabled": False}},
    )
    search_json = tmp_path / "search.json"
    search_json.write_text(json.dumps(search_doc(), indent=2))
    return cfg, search_json


def test_derive_cli_subprocess(derive_setup, tmp_path: Path):
    """`python -m dfakd derive` in a fresh interpreter: the default mode, full (Algorithm 1)."""
    cfg, search_json = derive_setup
    out = tmp_path / "agg.yaml"
    proc = run_cli("derive", "-c", cfg, "--search", search_json, "-o", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out} (full)" in proc.stdout
    agg = aggregation.load(out)
    assert agg.teacher == T_ARCH and agg.source == str(search_json)
    full = next(key for key in EXPECTED if key[0] == "full")
    assert_groups(agg, EXPECTED[full])


@pytest.mark.parametrize(("mode", "tau", "k"), list(EXPECTED))
def test_derive_cli_searched_modes(derive_setup, tmp_path: Path, capsys, mode: str, tau: float, k: int):
    """The same CLI entry point in-process (the subprocess test above covers `python -m dfakd`)."""
    cfg, search_json = derive_setup
    out = tmp_path / f"{mode}.yaml"
    args = ["derive", "-c", str(cfg), "--search", str(search_json), "--mode", mode, "-o", str(out)]
    rc = cli.main([*args, "--set", f"derive.tau={tau}", "--set", f"derive.k={k}"])
    assert rc == 0, capsys.readouterr().err
    assert_groups(aggregation.load(out), EXPECTED[(mode, tau, k)])


def test_derive_cli_fixed_modes(derive_setup, tmp_path: Path, capsys):
    cfg, _ = derive_setup

    def derive(mode: str, *extra: str) -> aggregation.Aggregation:
        out = tmp_path / f"{mode}{len(list(tmp_path.iterdir()))}.yaml"
        assert cli.main(["derive", "-c", str(cfg), "--mode", mode, "-o", str(out), *extra]) == 0
        return aggregation.load(out)

    for mode, expected in FIXED.items():
        agg = derive(mode)
        assert agg.mode == mode
        assert_groups(agg, expected)
    a, b, c = derive("random", "--set", "seed=5"), derive("random", "--set", "seed=5"), derive("random")
    assert a.source == "fixed:random:seed5"
    assert [g.layers for g in a.groups] == [g.layers for g in b.groups]
    assert [g.layers for g in a.groups] != [g.layers for g in c.groups]
    for g in [*a.groups, *c.groups]:
        assert list(g.layers) == T_LAYERS[g.spatial] and all(w > 0 for w in g.layers.values())
        assert sum(g.layers.values()) == pytest.approx(1.0, abs=1e-6)  # as read back from YAML


# ------------------------------------------------ 5b. bad aggregation files fail before training


def _agg_file(path: Path, groups: list[dict[str, Any]], teacher: str = T_ARCH) -> Path:
    doc = {"format": aggregation.FORMAT, "teacher": teacher, "mode": "prune", "groups": groups}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


GOOD_GROUPS = [{"spatial": sp, "layers": {T_LAYERS[sp][-1]: 1.0}} for sp in SPATIALS]
BAD_AGGREGATIONS = {
    # name: (groups, teacher in the file, what the one-line message must contain)
    "unknown_layer": (
        [{"spatial": 32, "layers": {"layer1.1": 0.5, "layer1.7": 0.5}}, *GOOD_GROUPS[1:]],
        T_ARCH,
        ["group 32px", "layer1.7", "lacks", "layer1.0, layer1.1, layer1.2"],
    ),
    "extra_group": (
        [*GOOD_GROUPS, {"spatial": 4, "layers": {"layer3.2": 1.0}}],
        T_ARCH,
        ["[4, 8, 16, 32] px", "[8, 16, 32] px"],
    ),
    "missing_group": (GOOD_GROUPS[:2], T_ARCH, ["[16, 32] px", "[8, 16, 32] px"]),
    "bad_sum": (
        [{"spatial": 32, "layers": {"layer1.1": 0.5, "layer1.2": 0.6}}, *GOOD_GROUPS[1:]],
        T_ARCH,
        ["group 32px", "sum to 1.1", "not 1"],
    ),
    "other_teacher": (GOOD_GROUPS, "resnet56", ["'resnet56'", f"not '{T_ARCH}'"]),
}


@pytest.fixture
def distill_setup(tmp_path: Path) -> tuple[Path, Path]:
    """A 10-class teacher file made by `import-teacher`-equivalent layout, and a config whose dataset is
    never read (the error comes before any data is loaded)."""
    teacher = save_teacher(tmp_path / "teacher.pt", num_classes=10)
    cfg = write_config(
        tmp_path / "cfg.yaml",
        {
            "dataset": {"name": "mnist5k", "root": str(tmp_path / "no-data-here")},
            "model": {"arch": S_ARCH},
            "runtime": {"device": "cpu", "threads": 1},
            "tracking": {"enabled": False},
        },
    )
    return teacher, cfg


@pytest.mark.parametrize("case", list(BAD_AGGREGATIONS))
def test_distill_refuses_bad_aggregation(distill_setup, tmp_path: Path, capsys, case: str):
    teacher, cfg = distill_setup
    groups, agg_teacher, needles = BAD_AGGREGATIONS[case]
    bad = _agg_file(tmp_path / "bad.yaml", groups, agg_teacher)
    args = [
        "distill",
        "-c",
        str(cfg),
        "--method",
        "dfa",
        "--aggregation",
        str(bad),
        "--teacher",
        str(teacher),
    ]
    rc = cli.main([*args, "-o", str(tmp_path / "run")])
    captured = capsys.readouterr()
    line = one_line_error(rc, captured.err, "distill")
    assert str(bad) in line
    for needle in needles:
        assert needle in line, (needle, line)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_distill_refuses_bad_aggregation_subprocess(distill_setup, tmp_path: Path):
    """One case through `python -m dfakd distill` in a fresh interpreter, the teacher brought in with
    `python -m dfakd import-teacher` from a community-style `{'model': state_dict}` file."""
    _, cfg = distill_setup
    torch.save({"model": models.build(T_ARCH, 10).state_dict()}, tmp_path / "community.pth")
    bad = _agg_file(tmp_path / "bad.yaml", *BAD_AGGREGATIONS["extra_group"][:2])
    proc = run_cli(
        "import-teacher", tmp_path / "community.pth", "--arch", T_ARCH, "--num-classes", "10",
        "--out", tmp_path / "imported.pt", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(
        "distill", "-c", cfg, "--method", "dfa", "--aggregation", bad, "--teacher", tmp_path / "imported.pt",
        "-o", tmp_path / "run", cwd=tmp_path,
    )  # fmt: skip
    line = one_line_error(proc.returncode, proc.stderr, "distill")
    assert "[4, 8, 16, 32] px" in line


# --------------------------------------------------------- 6. search -> derive -> distill, end to end


def _trajectory_sums(path: Path) -> dict[tuple[int, int], float]:
    sums: dict[tuple[int, int], float] = defaultdict(float)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            sums[(int(row["step"]), int(row["spatial"]))] += float(row["alpha"])
    return sums


@pytest.mark.slow
def test_search_derive_distill_end_to_end(tmp_path: Path):
    root = write_separable_folder(tmp_path / "imgs", n_train=16, n_test=8)
    teacher_run, search_run, distill_run = tmp_path / "teacher", tmp_path / "search", tmp_path / "distill"
    cfg = job_config(
        root,
        tmp_path,
        teacher_run / "best.pt",
        search={"epochs": 1, "batch_size": 8},
    )
    cfg_path = write_config(tmp_path / "cfg.yaml", cfg)

    proc = run_cli("train", "-c", cfg_path, "--set", f"model.arch={T_ARCH}", "-o", teacher_run, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("search", "-c", cfg_path, "-o", search_run, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("search.json", "alphas.png", "alpha_trajectory.csv", "alpha_trajectory.png"):
        assert (search_run / name).is_file(), name
    result = json.loads((search_run / "search.json").read_text())
    assert [g["spatial"] for g in result["groups"]] == SPATIALS
    for g in result["groups"]:
        assert g["layers"] == T_LAYERS[g["spatial"]]
        assert sum(g["alpha"]) == pytest.approx(1.0, abs=1e-6)
        assert g["alpha"] == pytest.approx(torch.softmax(torch.tensor(g["beta"]), 0).tolist(), abs=1e-6)
        assert any(b != 0 for b in g["beta"])  # every group was searched
    sums = _trajectory_sums(search_run / "alpha_trajectory.csv")
    assert {sp for _, sp in sums} == set(SPATIALS)
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in sums.values())

    agg_path = tmp_path / "agg.yaml"
    proc = run_cli(
        "derive", "-c", cfg_path, "--search", search_run / "search.json", "-o", agg_path, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    agg = aggregation.load(agg_path)
    assert [g.spatial for g in agg.groups] == SPATIALS

    proc = run_cli(
        "distill",
        "-c",
        cfg_path,
        "--method",
        "dfa",
        "--aggregation",
        agg_path,
        "-o",
        distill_run,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    distilled = json.loads((distill_run / "result.json").read_text())
    assert distilled["method"] == "dfa" and distilled["arch"] == S_ARCH

    # the student as the job initializes it (torch.manual_seed(seed), then build), on the same test split
    full_cfg = config.load([cfg_path])
    torch.manual_seed(full_cfg["seed"])
    init = models.build(S_ARCH, data.num_classes(full_cfg["dataset"]))
    init_top1 = evaluate(init, make_test_stream(full_cfg, torch.device("cpu")))["top1"]
    assert distilled["last_acc1"] > init_top1, (distilled["last_acc1"], init_top1)
