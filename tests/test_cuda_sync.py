"""A training step waits for the GPU nowhere: train, distill (kd, ofd, dfa) and search steps, each with
its batch drawn from the device-resident stream, run under ``torch.cuda.set_sync_debug_mode("error")``
(any host-device synchronization raises). Tiny models on random data, through ``SupervisedTask.step`` /
``SearchTask.step`` and the loop's per-step code (:func:`dfakd.training.loop.run_step`), not the CLI.

The CUDA variant runs where a GPU is present; the CPU variant runs the same code (no sync check there) so
that the harness itself is exercised everywhere.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from conftest import average_aggregation

from dfakd import config, methods, models
from dfakd.data import BatchStream
from dfakd.data.datasets import ImageSplit
from dfakd.jobs.search import PairedBatches, SearchTask
from dfakd.methods.bridge import Searcher
from dfakd.methods.distill import DistillStep
from dfakd.training.loop import FiniteWatch, run_step
from dfakd.training.runtime import Progress, prepare_module

TEACHER, STUDENT, CLASSES = "resnet20", "resnet8", 10
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=CUDA)]
STEPS = 3  # checked steps, after one warm-up step (first-call allocations, cuDNN set-up)


@contextlib.contextmanager
def no_sync(device: torch.device) -> Iterator[None]:
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def job_config(device: torch.device, precision: str) -> dict:
    cfg = copy.deepcopy(config.DEFAULTS)
    cfg["runtime"].update(precision=precision, channels_last=device.type == "cuda", finite_check_every=50)
    cfg["recipe"].update(epochs=1, batch_size=8)
    cfg["search"].update(epochs=1, batch_size=8)
    return cfg


def stream(device: torch.device, n: int = 40, stream_id: int = 0, augment: str = "crop_flip") -> BatchStream:
    gen = torch.Generator().manual_seed(stream_id)
    split = ImageSplit(
        torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
        torch.randint(0, CLASSES, (n,), generator=gen),
        [str(c) for c in range(CLASSES)],
    )
    return BatchStream(
        split, 8, device, MEAN, STD, train=True, augment=augment, seed=1, stream_id=stream_id,
        channels_last=device.type == "cuda",
    )  # fmt: skip


def frozen_teacher(device: torch.device) -> models.FeatureNet:
    torch.manual_seed(0)
    teacher = models.build(TEACHER, CLASSES)
    with torch.no_grad():
        teacher(torch.randn(16, 3, 32, 32))  # BatchNorm statistics of some activations
    teacher = prepare_module(teacher, device, device.type == "cuda").eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def run_steps(task, batches, device: torch.device) -> None:
    """One warm-up step, then ``STEPS`` steps with every host-device sync an error (on CUDA)."""
    watch = FiniteWatch(task.checked_terms, every=50, where="-")
    sums: dict[str, torch.Tensor] = {}
    # no line falls in the checked steps (a printed line reads the terms back: once per log_every steps)
    progress = Progress(10**6, "sync-test", every=10**6)
    steps = len(batches)
    assert steps >= STEPS + 1
    it = iter(batches)
    run_step(task, watch, sums, progress, 0, 0, steps, next(it))
    with no_sync(device):
        for step in range(1, STEPS + 1):
            batch = next(it)  # the stream's draws (permutation, crops, flips) happen inside the check
            terms = run_step(task, watch, sums, progress, 0, step, steps, batch)
    watch.check()  # the deferred read-back: after the checked steps
    assert set(task.checked_terms) <= set(terms)
    assert all(v.device.type == device.type for v in terms.values())


@pytest.fixture(scope="module")
def aggregation(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An ``average`` aggregation (every candidate of every group: the most teacher features dfa uses)."""
    return average_aggregation(tmp_path_factory.mktemp("agg"), TEACHER, STUDENT, CLASSES)


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_step_does_not_sync(device_name: str, precision: str):
    from dfakd.training.supervised import SupervisedTask

    device = torch.device(device_name)
    cfg = job_config(device, precision)
    torch.manual_seed(0)
    model = prepare_module(models.build(STUDENT, CLASSES), device, device.type == "cuda")

    def step_loss(x, y, epoch):  # dfakd train's step loss
        logits = model(x)
        return F.cross_entropy(logits, y), logits, {}

    train = stream(device)
    task = SupervisedTask(cfg, model, model, step_loss, train, stream(device, 16, 9, "none"), device)
    run_steps(task, task.batches(0), device)


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("spec", ["kd", "ofd", "dfa"])
def test_distill_step_does_not_sync(device_name: str, precision: str, spec: str, aggregation: str):
    from dfakd.training.supervised import SupervisedTask

    device = torch.device(device_name)
    cfg = job_config(device, precision)
    teacher = frozen_teacher(device)
    torch.manual_seed(1)
    student = models.build(STUDENT, CLASSES).to(device)
    context = methods.DistillContext(TEACHER, aggregation)
    parts = methods.build(methods.parse_method(spec), teacher, student, {}, context)
    step = prepare_module(DistillStep(student, teacher, parts, 1.0), device, device.type == "cuda")
    unaugmented = stream(device, 16, 5, "none")
    for part in step.parts:
        part.prepare(teacher, unaugmented)  # before the checked steps, as dfakd distill does
    test = stream(device, 16, 9, "none")
    task = SupervisedTask(cfg, step, student, step.loss, stream(device), test, device)
    run_steps(task, task.batches(0), device)


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_search_step_does_not_sync(device_name: str, precision: str):
    device = torch.device(device_name)
    cfg = job_config(device, precision)
    teacher = frozen_teacher(device)
    torch.manual_seed(2)
    student = prepare_module(models.build(STUDENT, CLASSES), device, device.type == "cuda")
    searcher = Searcher(cfg, teacher, student, device)
    task = SearchTask(cfg, searcher, PairedBatches(stream(device), stream(device, 40, 1)))
    run_steps(task, task.batches(0), device)
    assert task.pending  # the alphas were recorded on the device, read back only at the epoch's end
