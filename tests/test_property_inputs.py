"""Property: for inputs nobody listed, every verb ends with exit 0 or 2, never a traceback, and on exit 2
writes nothing under the results folder.

Hypothesis mutates valid documents at random (a value replaced by one of many wrong or odd values, a key
deleted, an unknown key added, one to three times) and runs the real CLI entry on them, in process:
job configs for ``train``, ``search``, ``distill``, ``evaluate`` and ``derive``; aggregation files for a
DFA student; ``search.json`` documents for ``derive``; workflow configs for a ``snakemake`` dry run.
Valid mutations that would train for long (many epochs, big threads counts) are not run: this test is about
bad input, and the tiny dataset keeps the valid ones to about a second. ``tracking.*`` is left alone (a
mutated store would be a real server address or sleep through retries); its values are range-checked like
every other key, and ``test_bad_inputs.py`` covers them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import cli_env, tiny_config, write_imagefolder
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dfakd import cli, config, models

REPO = Path(__file__).resolve().parents[1]
ODD_VALUES = [
    None, True, False, 0, 1, -1, 2, 3, 10**12, -(10**12), 0.5, -0.5, 1e-300, 1e308,
    math.nan, math.inf, -math.inf, "", "ten", "auto", "none", "full", "prune", "cuda", "cpu", "resnet8",
    "resnet20", "nonexistent/path", "a b", "é", [], [1], [0.5, 0.5], [0.5, 1.5], ["x"], [None, None, None],
    {}, {"x": 1}, {"kd": {"weight": "heavy"}},
]  # fmt: skip
values = st.one_of(
    st.sampled_from(ODD_VALUES),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.text(alphabet="abcxyz01_.-/ ", max_size=6),
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, doc: Any, frozen: tuple[str, ...] = ()) -> Any:
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if not (p and p[0] in frozen)]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if op == "replace":
            parent[path[-1]] = draw(values)
        elif op == "delete" and isinstance(parent, (dict, list)):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "epochs", "weight", "1"]))] = draw(values)
    return doc


class World:
    """A tiny ImageFolder (a valid job trains in about a second), a teacher, a search.json and an
    aggregation file, all valid."""

    def __init__(self, base: Path) -> None:
        self.base = base
        images = write_imagefolder(base / "imgs", n_train=4, n_test=2)
        cfg = tiny_config(images.root, base / "unused", epochs=1, batch_size=4)
        cfg["runtime"].update(eval_batch_size=8, log_every=1000, threads=1)
        cfg["search"] = {"epochs": 1, "batch_size": 2}
        cfg["teacher"] = {"arch": "resnet20", "checkpoint": str(base / "teacher.pt")}
        cfg["distill"] = {"aggregation": str(base / "agg.yaml")}
        self.cfg = cfg
        teacher = models.build("resnet20", 3)
        torch.save({"model": teacher.state_dict(), "arch": "resnet20", "num_classes": 3}, base / "teacher.pt")
        self.search = {
            "teacher": "resnet20",
            "student": "resnet8",
            "groups": [
                {"spatial": 32, "layers": ["layer1.0", "layer1.1", "layer1.2"], "alpha": [0.2, 0.3, 0.5]},
                {"spatial": 16, "layers": ["layer2.0", "layer2.1", "layer2.2"], "alpha": [0.1, 0.1, 0.8]},
                {"spatial": 8, "layers": ["layer3.0", "layer3.1", "layer3.2"], "alpha": [0.6, 0.2, 0.2]},
            ],
        }
        self.aggregation = {
            "format": "dfakd-aggregation/1",
            "teacher": "resnet20",
            "mode": "full",
            "groups": [
                {"spatial": 32, "layers": {"layer1.0": 0.25, "layer1.2": 0.75}},
                {"spatial": 16, "layers": {"layer2.2": 1.0}},
                {"spatial": 8, "layers": {"layer3.1": 0.5, "layer3.2": 0.5}},
            ],
        }
        (base / "agg.yaml").write_text(yaml.safe_dump(self.aggregation))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("property"))


def _affordable(cfg: dict[str, Any]) -> bool:
    """A valid config that trains at most a few tiny epochs."""
    try:
        resolved = config.load(json_configs=[json.dumps(cfg, allow_nan=True)])
    except Exception:
        return True  # invalid: the verb refuses it at once
    return (
        resolved["recipe"]["epochs"] <= 2
        and resolved["search"]["epochs"] <= 1
        and resolved["runtime"]["threads"] <= 2
        and models.is_available(resolved["model"]["arch"])
        and resolved["model"]["arch"] in ("resnet8", "resnet14", "resnet20")
    )


def _run(world: World, argv: list[str]) -> None:
    """Run one verb in a fresh folder; check the property."""
    scratch = Path(tempfile.mkdtemp(dir=world.base))
    results = scratch / "results"
    args = [a.replace("{results}", str(results)).replace("{scratch}", str(scratch)) for a in argv]
    threads, err = torch.get_num_threads(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(args)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    text = err.getvalue()
    event(f"{args[0]} exit {code}")
    assert "Traceback" not in text, text
    assert code in (0, 2), (args, text)
    if code == 2:
        assert text.strip().splitlines()[-1].startswith(f"dfakd {args[0]}: error: "), text
        assert not results.exists() or not any(results.rglob("*")), (args, text, list(results.rglob("*")))
    shutil.rmtree(scratch, ignore_errors=True)


def _write(path: str, doc: Any, world: World) -> str:
    text = yaml.safe_dump(doc, allow_unicode=True) if path.endswith(".yaml") else json.dumps(doc)
    target = world.base / path
    target.write_text(text)
    return str(target)


VERBS = {
    "train": lambda c: ["train", "-c", c, "-o", "{results}/run"],
    "search": lambda c: ["search", "-c", c, "-o", "{results}/run"],
    "distill-kd": lambda c: ["distill", "-c", c, "--method", "kd", "-o", "{results}/run"],
    "distill-dfa": lambda c: ["distill", "-c", c, "--method", "dfa", "-o", "{results}/run"],
    "evaluate": lambda c: ["evaluate", "-c", c, "--checkpoint", "{teacher}", "-o", "{results}/eval.json"],
    "derive": lambda c: ["derive", "-c", c, "--mode", "average", "-o", "{results}/agg.yaml"],
}
# derandomized: CI runs the same examples every time (a failure reproduces); raise max_examples or drop
# derandomize locally to explore further
PROPERTY = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY
@given(data=st.data())
def test_mutated_job_configs(world: World, data: st.DataObject) -> None:
    verb = data.draw(st.sampled_from(sorted(VERBS)))
    cfg = data.draw(mutated(world.cfg, frozen=("tracking",)))
    if not isinstance(cfg, dict) or not _affordable(cfg):
        event("not run: a long valid job")
        return
    path = _write("mutated.yaml", cfg, world)
    teacher = str(world.base / "teacher.pt")
    _run(world, [a.replace("{teacher}", teacher) for a in VERBS[verb](path)])


@PROPERTY
@given(data=st.data())
def test_mutated_aggregation_files(world: World, data: st.DataObject) -> None:
    agg = _write("agg_mutated.yaml", data.draw(mutated(world.aggregation)), world)
    cfg = copy.deepcopy(world.cfg)
    cfg["distill"]["aggregation"] = agg
    _run(
        world, ["distill", "-c", _write("cfg_agg.yaml", cfg, world), "--method", "dfa", "-o", "{results}/run"]
    )


@PROPERTY
@given(data=st.data())
def test_mutated_search_documents(world: World, data: st.DataObject) -> None:
    search = _write("search_mutated.json", data.draw(mutated(world.search)), world)
    mode = data.draw(st.sampled_from(["full", "prune", "argmax", "topk"]))
    cfg = _write("cfg_derive.yaml", world.cfg, world)
    _run(world, ["derive", "-c", cfg, "--mode", mode, "--search", search, "-o", "{results}/agg.yaml"])


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_workflow_configs_stop_the_plan_in_words(data: st.DataObject, tmp_path_factory) -> None:
    """A dry run of a mutated workflow config either plans or stops with a config/schema error."""
    base = tmp_path_factory.mktemp("wf")
    demo = yaml.safe_load((REPO / "config/config.yaml").read_text())
    cfg = data.draw(mutated(demo))
    if isinstance(cfg, dict):
        cfg["results_dir"] = str(base / "results")
    path = base / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", str(path)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text[-3000:]
    if proc.returncode != 0:
        assert "config error" in text or "ValidationError" in text or "schema" in text.lower(), text[-3000:]
    assert not (base / "results").exists() or not any((base / "results").rglob("*"))
