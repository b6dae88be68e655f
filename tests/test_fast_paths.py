"""The fast paths keep the results: one teacher forward per step, bf16 / channels-last losses against the
plain fp32 path, the batched device-resident data pipeline against a per-image reference, and evaluation
independent of its batch size. All on CPU (a CUDA variant runs where a GPU is present); a few seconds.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import average_aggregation

from dfakd import config, methods, models
from dfakd.data import BatchStream
from dfakd.data.datasets import ImageSplit
from dfakd.data.stream import epoch_generator
from dfakd.methods.bridge import Searcher
from dfakd.methods.distill import DistillStep
from dfakd.training.loop import evaluate
from dfakd.training.runtime import autocast, prepare_module

CPU = torch.device("cpu")
TEACHER, STUDENT, CLASSES = "resnet20", "resnet8", 10
ALL = ["kd", "dkd", "at", "fitnet", "ofd", "dfa"]
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def aggregation(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An ``average`` aggregation (every candidate of every group: the most teacher features dfa uses)."""
    return average_aggregation(tmp_path_factory.mktemp("agg"), TEACHER, STUDENT, CLASSES)


def batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)


def make_step(spec: str, aggregation: str, seed: int = 0) -> DistillStep:
    """``DistillStep`` as ``dfakd distill`` builds it: frozen eval-mode teacher, methods, margins prepared."""
    torch.manual_seed(seed)
    teacher = models.build(TEACHER, CLASSES)
    with torch.no_grad():  # BatchNorm statistics of real activations, so logits have a trained scale
        for s in range(3):
            teacher(batch(32, seed + 50 + s)[0])
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = models.build(STUDENT, CLASSES)
    names = methods.parse_method(spec)
    parts = methods.build(names, teacher, student, {}, methods.DistillContext(TEACHER, aggregation))
    step = DistillStep(student, teacher, parts, 1.0)
    x, y = batch(seed=seed + 100)
    for part in step.parts:
        part.prepare(teacher, [(x, y)])
    return step.train()


class Counter:
    """Counts a module's ``forward_features`` calls and its ``module(x)`` calls (forward pre-hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.features = self.calls = 0
        inner = module.forward_features

        def counted(x):
            self.features += 1
            return inner(x)

        module.forward_features = counted  # instance attribute: found before the class's method
        module.register_forward_pre_hook(lambda *_: self._call())

    def _call(self) -> None:
        self.calls += 1

    @property
    def passes(self) -> int:
        return self.features + self.calls


# ------------------------------------------------------------------------------ one teacher forward


@pytest.mark.parametrize("spec", [*ALL, "dfa+kd", "kd+dkd+at+fitnet+ofd+dfa"])
def test_one_distillation_step_runs_exactly_one_teacher_forward(spec: str, aggregation: str):
    step = make_step(spec, aggregation)
    teacher, student = Counter(step.teacher[0]), Counter(step.student)
    x, y = batch()
    total, logits, terms = step.loss(x, y, 0.5)
    total.backward()
    assert (teacher.features, teacher.calls) == (1, 0)  # forward_features once, never teacher(x)
    assert (student.features, student.calls) == (1, 0)
    assert set(terms) > {"ce"} and torch.isfinite(total)


def test_vanilla_runs_no_teacher_forward(aggregation: str):
    step = make_step("vanilla", aggregation)
    teacher = Counter(step.teacher[0])
    x, y = batch()
    total, _, terms = step.loss(x, y, 0.5)
    assert teacher.passes == 0 and set(terms) == {"ce"}


def test_search_steps_run_one_teacher_forward_each():
    torch.manual_seed(0)
    teacher = models.build(TEACHER, CLASSES).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    searcher = Searcher(copy.deepcopy(config.DEFAULTS), teacher, models.build(STUDENT, CLASSES), CPU)
    counter = Counter(teacher)
    x, y = batch()
    searcher.weight_step(x, y, 0.01)
    assert counter.passes == 1
    searcher.beta_step(x, y, [0])
    assert counter.passes == 2


# ------------------------------------------------------------------------ bf16 and channels-last


def loss_terms(step: DistillStep, precision: str, channels_last: bool) -> dict[str, float]:
    """The step's loss terms on a fixed batch, from a copy of ``step`` (so every variant starts equal)."""
    step = copy.deepcopy(step)
    step.teacher = [prepare_module(copy.deepcopy(step.teacher[0]), CPU, channels_last)]
    step = prepare_module(step, CPU, channels_last)
    x, y = batch()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(CPU, precision):
        total, _, terms = step.loss(x, y, 10.0)
    out = {k: float(v) for k, v in terms.items()}
    out["total"] = float(total)
    return out


@pytest.fixture(scope="module")
def all_methods_step(aggregation: str) -> DistillStep:
    return make_step("+".join(ALL), aggregation)


@pytest.fixture(scope="module")
def fp32_terms(all_methods_step: DistillStep) -> dict[str, float]:
    return loss_terms(all_methods_step, "fp32", channels_last=False)


# bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3). Losses summed or averaged over many
# elements (CE, at, fitnet, ofd, dfa, the total) stay within a few 1e-3 of fp32 (measured <= 7e-3 over
# 10 seeds, 2 memory formats): 5e-2 relative, which a wrong cast, a missing .float() or a loss on the
# wrong tensor exceeds by far.
BF16_REL = 5e-2
# The logit-KL terms (kd, dkd_tckd, dkd_nckd) compare two softmaxes of logits that the classifier
# computes in bf16 under autocast. Rounding a logit z moves log-softmax(z / T) by ~2^-9 |z| / T, so the
# KL divergence itself moves by a few 1e-3 nats whatever its value: near-equal distributions (a small
# KL) see a large *relative* error (measured: kd up to 15%, dkd_tckd up to 220%). These terms are bounded
# in nats, before their weight * T^2 (* alpha / beta) factor: 2e-2 nats (measured <= 8e-3). With the
# classifier in fp32 (the change proposed in docs/BENCHMARKS.md) every term is within 6e-3 relative.
KL_NATS = 2e-2


def kl_coefficients(step: DistillStep) -> dict[str, float]:
    """What multiplies the KL divergence in each logit-KL term (epoch 10, as in ``loss_terms``)."""
    out = {}
    for part in step.parts:
        if part.name == "kd":
            out["kd"] = part.weight * part.temperature**2
        elif part.name == "dkd":
            scale = part.weight * part.warmup_factor(10.0) * part.temperature**2
            out["dkd_tckd"], out["dkd_nckd"] = scale * part.alpha, scale * part.beta
    return out


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_autocast_losses_agree_with_fp32(all_methods_step, fp32_terms, channels_last: bool):
    bf16 = loss_terms(all_methods_step, "bf16", channels_last)
    assert set(bf16) == set(fp32_terms)
    kl = kl_coefficients(all_methods_step)
    assert set(kl) == {"kd", "dkd_tckd", "dkd_nckd"}
    for name, ref in fp32_terms.items():
        if name in kl:
            assert abs(bf16[name] - ref) <= KL_NATS * kl[name], name
        else:
            assert bf16[name] == pytest.approx(ref, rel=BF16_REL), name


# channels-last changes only the memory order (other conv kernels, another summation order): 1e-5
# relative (measured <= 3.2e-6 over 16 cases). ofd/dfa's partial L2 has a discontinuous mask
# ((s > t) | (t > 0)); an element within rounding of its boundary may switch, and their sums over ~1e5
# elements run in another order: 5e-5 relative for those two (measured <= 1.1e-5). A small KL (dkd_tckd
# ~ 0.03) is a difference of near-equal log-probabilities (measured up to 1.3e-5 relative, 5e-8 nats), so
# the KL terms may also use 1e-6 nats, ten times the fp32 roundoff of a log-probability.
CL_REL = {"ofd": 5e-5, "dfa": 5e-5}
CL_KL_NATS = 1e-6


def test_channels_last_loss_equals_contiguous(all_methods_step, fp32_terms):
    cl = loss_terms(all_methods_step, "fp32", channels_last=True)
    assert set(cl) == set(fp32_terms)
    kl = kl_coefficients(all_methods_step)
    for name, ref in fp32_terms.items():
        tolerance = pytest.approx(ref, rel=CL_REL.get(name, 1e-5), abs=CL_KL_NATS * kl.get(name, 0.0))
        assert cl[name] == tolerance, name


def test_channels_last_training_step_keeps_the_memory_format(aggregation: str):
    step = prepare_module(make_step("dfa+kd", aggregation), CPU, True)
    step.teacher = [prepare_module(step.teacher[0], CPU, True)]
    x, y = batch()
    with autocast(CPU, "bf16"):
        total, logits, _ = step.loss(x.contiguous(memory_format=torch.channels_last), y, 0.5)
    total.backward()
    conv = step.student.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert conv.grad is not None and conv.grad.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------- device-resident pipeline


def reference_batches(split: ImageSplit, stream: BatchStream, epoch: int, pad_mode: str):
    """Per image, on the CPU: pad, crop at the drawn offset, flip, normalize. Draws the same random
    numbers in the same order as ``BatchStream`` (permutation, then per batch: rows, columns, flips)."""
    dev = stream.device  # the stream draws on a generator on its device; the reference reads the draws
    gen = epoch_generator(stream.seed, epoch, stream.stream_id, dev)
    n, bs = len(split), stream.batch_size
    order = torch.randperm(n, generator=gen, device=dev).cpu()
    mean = torch.tensor(MEAN).view(3, 1, 1) * 255.0
    std = torch.tensor(STD).view(3, 1, 1) * 255.0
    for b in range(n // bs):
        idx = order[b * bs : (b + 1) * bs]
        oy = torch.randint(0, 9, (bs,), generator=gen, device=dev).cpu()
        ox = torch.randint(0, 9, (bs,), generator=gen, device=dev).cpu()
        flip = (torch.rand(bs, generator=gen, device=dev) < 0.5).cpu()
        xs = []
        for k, i in enumerate(idx.tolist()):
            img = split.images[i]
            mode = "constant" if pad_mode == "constant" else "reflect"
            padded = F.pad(img[None], (4, 4, 4, 4), mode=mode)[0]
            crop = padded[:, oy[k] : oy[k] + 32, ox[k] : ox[k] + 32]
            if flip[k]:
                crop = crop.flip(2)
            xs.append((crop.float() - mean) / std)
        yield torch.stack(xs), split.labels[idx]


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("pad_mode,channels_last", [("constant", False), ("reflect", True)])
def test_batched_pipeline_equals_per_image_reference(device, pad_mode: str, channels_last: bool):
    gen = torch.Generator().manual_seed(5)
    split = ImageSplit(
        torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8, generator=gen),
        torch.randint(0, CLASSES, (50,), generator=gen),
        [str(c) for c in range(CLASSES)],
    )
    stream = BatchStream(
        split,
        16,
        device,
        MEAN,
        STD,
        train=True,
        augment="crop_flip",
        pad_mode=pad_mode,
        seed=3,
        stream_id=1,
        channels_last=channels_last,
    )
    assert stream.images.device.type == device.type  # the uint8 data lives on the device
    for epoch in (0, 2):
        stream.set_epoch(epoch)
        got = list(stream)
        want = list(reference_batches(split, stream, epoch, pad_mode))
        assert len(got) == len(want) == 3  # 50 // 16, the last incomplete batch dropped
        for (x, y), (rx, ry) in zip(got, want, strict=True):
            assert x.device.type == device.type and x.dtype == torch.float32
            if channels_last:
                assert x.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(x.cpu(), rx), "batched crop/flip/normalize differs from the per-image one"
            assert torch.equal(y.cpu(), ry)


def _legacy_crop_flip(images: torch.Tensor, gen: torch.Generator, pad: int, pad_mode: str) -> torch.Tensor:
    """``crop_flip`` as dfakd wrote it before the draws moved to the device (CPU generator, ``.to``)."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="constant" if pad_mode == "constant" else "reflect")
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    rows = oy[:, None] + torch.arange(h)
    cols = torch.arange(w).expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + ox[:, None]
    out = padded.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def _legacy_resized_crop_flip(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``resized_crop_flip`` before the draws moved to the device (default scale and ratio)."""
    from torchvision.ops import roi_align

    n, _, h, w = images.shape
    area = h * w * torch.empty(n).uniform_(0.08, 1.0, generator=gen)
    log_r = torch.empty(n).uniform_(
        torch.log(torch.tensor(3 / 4)).item(), torch.log(torch.tensor(4 / 3)).item(), generator=gen
    )
    aspect = torch.exp(log_r)
    cw = torch.sqrt(area * aspect).round().clamp(1, w)
    ch = torch.sqrt(area / aspect).round().clamp(1, h)
    x0 = (torch.rand(n, generator=gen) * (w - cw + 1)).floor()
    y0 = (torch.rand(n, generator=gen) * (h - ch + 1)).floor()
    boxes = torch.stack([torch.arange(n, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], 1)
    out = roi_align(images.float(), boxes, output_size=(h, w), sampling_ratio=2, aligned=True)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out.round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("augment", ["crop_flip", "resized_crop_flip"])
def test_device_drawn_stream_is_bit_identical_to_the_cpu_generator_stream_on_cpu(augment: str):
    """On the CPU the device generator is a CPU generator: the batches of every epoch are exactly those
    of the earlier CPU-generator code (permutation, then per batch the augmentation's draws)."""
    gen = torch.Generator().manual_seed(7)
    split = ImageSplit(
        torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=gen),
        torch.randint(0, CLASSES, (40,), generator=gen),
        [str(c) for c in range(CLASSES)],
    )
    stream = BatchStream(split, 16, CPU, MEAN, STD, train=True, augment=augment, seed=11, stream_id=1)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1) * 255.0, torch.tensor(STD).view(1, 3, 1, 1) * 255.0
    for epoch in (0, 3):
        stream.set_epoch(epoch)
        old = torch.Generator().manual_seed(11 * 1_000_003 + epoch * 7_919 + 1)  # the old epoch_generator
        order = torch.randperm(40, generator=old)
        for b, (x, y) in enumerate(stream):
            idx = order[b * 16 : (b + 1) * 16]
            images = split.images[idx]
            if augment == "crop_flip":
                images = _legacy_crop_flip(images, old, 4, "constant")
            else:
                images = _legacy_resized_crop_flip(images, old)
            assert torch.equal(x, (images.float() - mean) / std)
            assert torch.equal(y, split.labels[idx])


def test_pipeline_without_channels_last_gives_contiguous_batches():
    split = ImageSplit(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64), ["a"])
    stream = BatchStream(split, 4, CPU, MEAN, STD, train=True, augment="crop_flip", channels_last=False)
    assert all(x.is_contiguous() for x, _ in stream)


# ------------------------------------------------------------------------------------------ evaluation


@pytest.fixture(scope="module")
def eval_model() -> torch.nn.Module:
    """resnet8 with non-trivial BatchNorm running statistics (a few train-mode forwards)."""
    torch.manual_seed(1)
    model = models.build(STUDENT, CLASSES)
    with torch.no_grad():
        for seed in range(3):
            model(batch(32, seed)[0])
    return model.eval()


def test_evaluation_does_not_depend_on_the_batch_size(eval_model):
    gen = torch.Generator().manual_seed(9)
    split = ImageSplit(
        torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=gen),
        torch.randint(0, CLASSES, (40,), generator=gen),
        [str(c) for c in range(CLASSES)],
    )
    big = evaluate(eval_model, BatchStream(split, 512, CPU, MEAN, STD, train=False))
    small = evaluate(eval_model, BatchStream(split, 7, CPU, MEAN, STD, train=False))  # 5 x 7 + 5
    assert big["n"] == small["n"] == 40
    assert big["top1"] == small["top1"] and big["top5"] == small["top5"]
    assert big["loss"] == pytest.approx(small["loss"], rel=1e-6, abs=1e-6)


def test_evaluation_runs_under_inference_mode_and_restores_training(eval_model):
    model = copy.deepcopy(eval_model).train()
    seen = []
    model.register_forward_pre_hook(lambda *_: seen.append(torch.is_inference_mode_enabled()))
    gen = torch.Generator().manual_seed(2)
    split = ImageSplit(
        torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=gen),
        torch.zeros(10, dtype=torch.int64),
        [str(c) for c in range(CLASSES)],
    )
    evaluate(model, BatchStream(split, 4, CPU, MEAN, STD, train=False))
    assert seen == [True, True, True] and model.training


# ------------------------------------------------------------------------------- the auto precision rule


@pytest.mark.parametrize(
    ("probes", "native"),
    [
        ({"_is_amx_tile_supported": True, "_is_avx512_bf16_supported": False}, True),
        ({"_is_amx_tile_supported": False, "_is_avx512_bf16_supported": True}, True),
        ({"_is_amx_tile_supported": False, "_is_avx512_bf16_supported": False}, False),
        ({}, False),  # a torch without the probes: no native bf16
        ({"_is_amx_tile_supported": None, "_is_avx512_bf16_supported": None}, False),  # probes that raise
    ],
)
def test_auto_stays_fp32_on_cpu_and_names_the_bf16_opt_in_where_native(monkeypatch, capsys, probes, native):
    """``auto`` precision is fp32 on every CPU (the demo parity check did not put bf16 within the seed
    spread); a job on a CPU with native bf16 gets one line naming the faster opt-in when it opens (not in
    ``setup``: a refused input prints its one error line alone). The probes are guarded."""
    import platform
    import types

    from dfakd.training import runtime

    def probe(value):
        def check() -> bool:
            if value is None:
                raise RuntimeError("cannot tell")
            return value

        return check

    monkeypatch.setattr(torch, "cpu", types.SimpleNamespace(**{k: probe(v) for k, v in probes.items()}))
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert runtime.cpu_has_native_bf16() is native
    cfg = copy.deepcopy(config.DEFAULTS)
    cfg["runtime"]["device"] = "cpu"
    assert runtime.setup(cfg) == CPU
    assert (cfg["runtime"]["precision"], cfg["runtime"]["channels_last"]) == ("fp32", True)
    assert capsys.readouterr().err == ""
    hint = runtime.bf16_hint(cfg["runtime"], CPU)
    assert (hint is not None and "runtime.precision=bf16" in hint) is native
    assert hint is None or "channels_last" not in hint  # already on
    contiguous = copy.deepcopy(config.DEFAULTS)
    contiguous["runtime"].update(device="cpu", channels_last=False)
    runtime.setup(contiguous)
    hint = runtime.bf16_hint(contiguous["runtime"], CPU)
    assert (hint is not None and "--set runtime.channels_last=true" in hint) is native
    explicit = copy.deepcopy(config.DEFAULTS)
    explicit["runtime"].update(device="cpu", precision="bf16", channels_last=True)
    runtime.setup(explicit)  # an explicit setting is kept, and needs no hint
    assert (explicit["runtime"]["precision"], explicit["runtime"]["channels_last"]) == ("bf16", True)
    assert runtime.bf16_hint(explicit["runtime"], CPU) is None


@pytest.mark.parametrize(
    ("machine", "channels_last"), [("x86_64", True), ("AMD64", True), ("aarch64", False), ("arm64", False)]
)
def test_auto_channels_last_on_cpu_only_where_measured(monkeypatch, machine: str, channels_last: bool):
    """fp32 channels-last was measured faster, and within the seed spread of contiguous, on x86-64 CPUs
    (docs/BENCHMARKS.md); elsewhere ``auto`` keeps the contiguous layout. An explicit setting is kept."""
    import platform

    from dfakd.training import runtime

    monkeypatch.setattr(platform, "machine", lambda: machine)
    cfg = copy.deepcopy(config.DEFAULTS)
    cfg["runtime"]["device"] = "cpu"
    runtime.setup(cfg)
    assert cfg["runtime"]["channels_last"] is channels_last
    for explicit in (True, False):
        cfg = copy.deepcopy(config.DEFAULTS)
        cfg["runtime"].update(device="cpu", channels_last=explicit)
        runtime.setup(cfg)
        assert cfg["runtime"]["channels_last"] is explicit
