"""Configuration: defaults, YAML + --set merging, and errors that name the key (or file and line)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dfakd import config
from dfakd.errors import DfakdError
from dfakd.training.schedule import lr_at


def _yaml(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_load_and_validate():
    cfg = config.load()
    assert cfg == config.DEFAULTS
    assert cfg is not config.DEFAULTS and cfg["recipe"] is not config.DEFAULTS["recipe"]
    cfg["recipe"]["lr"] = 1.0  # a loaded config is a copy
    assert config.DEFAULTS["recipe"]["lr"] == 0.05


def test_repository_job_configs_load():
    root = Path(__file__).resolve().parents[1] / "config" / "jobs"
    paths = sorted(root.rglob("*.yaml"))
    assert paths
    for path in paths:
        config.load([path])  # every shipped job config is valid on its own


def test_yaml_and_overrides_merge(tmp_path: Path):
    base = _yaml(tmp_path, "recipe:\n  epochs: 3\n  lr: 0.1\nmodel:\n  arch: resnet8\n", "a.yaml")
    more = _yaml(tmp_path, "recipe:\n  lr: 0.2\ntracking:\n  tags: {team: x}\n", "b.yaml")
    cfg = config.load(
        [base, more],
        ["recipe.epochs=7", "dataset.mean=[0.1, 0.2, 0.3]", "tracking.tags.who=me", "runtime.device=cpu"],
    )
    assert cfg["recipe"]["epochs"] == 7  # --set wins over files
    assert cfg["recipe"]["lr"] == 0.2  # later file wins over earlier
    assert cfg["model"]["arch"] == "resnet8"
    assert cfg["dataset"]["mean"] == [0.1, 0.2, 0.3]
    assert cfg["tracking"]["tags"] == {"team": "x", "who": "me"}
    assert cfg["runtime"]["device"] == "cpu"
    # untouched siblings keep their defaults
    assert cfg["recipe"]["momentum"] == 0.9 and cfg["recipe"]["milestones"] == [150, 180, 210]
    assert cfg["runtime"]["eval_batch_size"] == 512


def test_int_accepted_for_float_key_and_stored_as_float():
    cfg = config.load(overrides=["recipe.lr=1", "recipe.weight_decay=0"])
    assert cfg["recipe"]["lr"] == 1.0 and isinstance(cfg["recipe"]["lr"], float)
    assert isinstance(cfg["recipe"]["weight_decay"], float)


def test_empty_yaml_is_defaults(tmp_path: Path):
    assert config.load([_yaml(tmp_path, "# nothing\n")]) == config.DEFAULTS


@pytest.mark.parametrize(
    ("source", "key"),
    [
        ("recipe:\n  epoch: 3\n", "recipe.epoch"),
        ("recipes:\n  epochs: 3\n", "recipes"),
        ("dataset:\n  name: mnist5k\n  rooot: x\n", "dataset.rooot"),
    ],
)
def test_unknown_key_named(tmp_path: Path, source: str, key: str):
    with pytest.raises(DfakdError, match=f"unknown config key '{key}'"):
        config.load([_yaml(tmp_path, source)])


def test_unknown_override_key_named():
    with pytest.raises(DfakdError, match="unknown config key 'runtime.gpus'"):
        config.load(overrides=["runtime.gpus=2"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("recipe.epochs=three", "recipe.epochs"),
        ("recipe.epochs=2.5", "recipe.epochs"),
        ("recipe.epochs=true", "recipe.epochs"),
        ("recipe.lr=fast", "recipe.lr"),
        ("recipe.nesterov=1", "recipe.nesterov"),
        ("recipe.milestones=5", "recipe.milestones"),
        ("dataset.num_classes=ten", "dataset.num_classes"),
        ("dataset.mean=0.5", "dataset.mean"),
        ("recipe=5", "recipe"),
        ("tracking.tags=x", "tracking.tags"),
    ],
)
def test_wrong_type_names_key(override: str, key: str):
    with pytest.raises(DfakdError, match=f"config key '{key}' must"):
        config.load(overrides=[override])


def test_malformed_yaml_names_file_and_line(tmp_path: Path):
    path = _yaml(tmp_path, "recipe:\n  epochs: 3\n  lr: [0.1\nmodel:\n  arch: resnet8\n")
    with pytest.raises(DfakdError) as err:
        config.load([path])
    message = str(err.value)
    assert str(path) in message and "malformed YAML" in message
    assert "line 4" in message  # where the parser notices the unclosed list
    assert "\n" not in message


def test_bad_indentation_names_line(tmp_path: Path):
    path = _yaml(tmp_path, "seed: 1\nrecipe:\n  epochs: 3\n   lr: 0.1\n")
    with pytest.raises(DfakdError, match=r"line 4"):
        config.load([path])


def test_non_mapping_and_missing_file(tmp_path: Path):
    with pytest.raises(DfakdError, match="must hold a mapping"):
        config.load([_yaml(tmp_path, "- a\n- b\n")])
    with pytest.raises(DfakdError, match="config file not found"):
        config.load([tmp_path / "absent.yaml"])


def test_malformed_override():
    with pytest.raises(DfakdError, match="KEY=VALUE"):
        config.load(overrides=["recipe.epochs"])
    with pytest.raises(DfakdError, match="recipe.milestones"):
        config.load(overrides=["recipe.milestones=[1, 2"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("recipe.epochs=0", "recipe.epochs"),
        ("recipe.batch_size=0", "recipe.batch_size"),
        ("recipe.lr=-0.1", "recipe.lr"),
        ("recipe.lr=0", "recipe.lr"),
        ("recipe.momentum=1.0", "recipe.momentum"),
        ("recipe.weight_decay=-1", "recipe.weight_decay"),
        ("recipe.gamma=0", "recipe.gamma"),
        ("recipe.warmup_epochs=-1", "recipe.warmup_epochs"),
        ("recipe.milestones=[0, 5]", "recipe.milestones"),
        ("recipe.milestones=[1.5]", "recipe.milestones"),
        ("recipe.schedule=step", "recipe.schedule"),
        ("runtime.device=gpu", "runtime.device"),
        ("runtime.device=cuda:x", "runtime.device"),
        ("runtime.device=cuda:", "runtime.device"),
        ("runtime.precision=fp16", "runtime.precision"),
        ("runtime.compile=fast", "runtime.compile"),
        ("runtime.compile=1", "runtime.compile"),
        ("runtime.eval_batch_size=0", "runtime.eval_batch_size"),
        ("runtime.log_every=0", "runtime.log_every"),
        ("dataset.augment=mixup", "dataset.augment"),
        ("dataset.pad_mode=edge", "dataset.pad_mode"),
        ("dataset.mean=[0.5, 0.5]", "dataset.mean"),
        ("dataset.std=[0.5, 0.0, 0.5]", "dataset.std"),
    ],
)
def test_invalid_values_name_key(override: str, key: str):
    with pytest.raises(DfakdError, match=f"config key '{key}'"):
        config.load(overrides=[override])


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_valid_devices(device: str):
    assert config.load(overrides=[f"runtime.device={device}"])["runtime"]["device"] == device


@pytest.mark.parametrize("value", ["false", "true", "default", "reduce-overhead", "max-autotune"])
def test_valid_compile_modes(value: str):
    assert config.load(overrides=[f"runtime.compile={value}"])["runtime"]["compile"] == yaml.safe_load(value)


def test_flatten_and_dump_round_trip():
    cfg = config.load(overrides=["tracking.tags.a=1"])
    flat = config.flatten(cfg)
    assert flat["recipe.lr"] == 0.05 and flat["model.arch"] == "resnet20"
    assert flat["recipe.milestones"] == "[150, 180, 210]" and flat["dataset.mean"] is None
    assert flat["tracking.tags.a"] == 1
    assert yaml.safe_load(config.dump(cfg)) == cfg
    assert config.get(cfg, "runtime.eval_batch_size") == 512


# ----------------------------------------------------------------------------------------------- lr


def _recipe(**kw):
    return {**config.DEFAULTS["recipe"], "lr": 0.1, **kw}


def test_lr_multistep():
    recipe = _recipe(schedule="multistep", milestones=[3, 5], gamma=0.1, epochs=8)
    got = [lr_at(e, recipe) for e in range(8)]
    # RepDistiller: 1-based epoch > milestone decays, i.e. 0-based epoch >= milestone
    assert got == [0.1, 0.1, 0.1, 0.1 * 0.1, 0.1 * 0.1, 0.1 * 0.1**2, 0.1 * 0.1**2, 0.1 * 0.1**2]
    assert got[3] == pytest.approx(0.01, rel=1e-12) and got[5] == pytest.approx(0.001, rel=1e-12)


def test_lr_cosine():
    recipe = _recipe(schedule="cosine", epochs=4)
    got = [lr_at(e, recipe) for e in range(4)]
    expected = [0.05 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert got == expected
    assert got[0] == 0.1 and got[2] == pytest.approx(0.05, abs=1e-15)


def test_lr_warmup_then_cosine():
    recipe = _recipe(schedule="cosine", epochs=6, warmup_epochs=2)
    got = [lr_at(e, recipe) for e in range(6)]
    assert got[0] == pytest.approx(0.01, rel=1e-12)  # from lr / 10
    assert got[1] == pytest.approx(0.1 * (0.1 + 0.9 * 0.5), rel=1e-12)
    assert got[2] == 0.1  # warmup done: cosine starts at the full lr
    assert got[3:] == [0.05 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3)]


def test_lr_warmup_then_multistep():
    recipe = _recipe(schedule="multistep", milestones=[4], epochs=6, warmup_epochs=3)
    got = [lr_at(e, recipe) for e in range(6)]
    assert got[:3] == pytest.approx([0.01, 0.04, 0.07], rel=1e-12)
    assert got[3] == 0.1 and got[4:] == pytest.approx([0.01, 0.01], rel=1e-12)


# what the workflow compares (Snakemake's params) and what a job's fingerprint holds must agree: a run-only
# key decides neither, every other key of a stage's sections reaches both

RUN_ONLY_VALUES = {
    "dataset.download": st.booleans(),
    "runtime.device": st.sampled_from(["auto", "cpu"]),
    "runtime.threads": st.integers(0, 8),
    "runtime.log_every": st.integers(1, 500),
    "runtime.eval_batch_size": st.integers(1, 2048),
    "runtime.compile": st.sampled_from([False, True, "default", "reduce-overhead"]),
    "runtime.deterministic": st.booleans(),
    "runtime.channels_last": st.sampled_from(["auto", True, False]),
    "runtime.finite_check_every": st.integers(0, 100),
    "tracking.enabled": st.booleans(),
    "tracking.retries": st.integers(0, 5),
    "tracking.experiment": st.text("abcxyz_-", min_size=1, max_size=8),
    "tracking.tags": st.dictionaries(st.sampled_from(["method", "who"]), st.text("ab", max_size=3)),
}


def nested(flat: dict) -> dict:
    out: dict = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def test_run_only_keys_are_the_defaults_own():
    flat = config.flatten(config.DEFAULTS)
    assert set(config.RUN_ONLY_KEYS) <= set(flat)
    assert {k for k in flat if config.is_run_only(k)} == set(RUN_ONLY_VALUES) | {
        k for k in flat if k.startswith("tracking.")
    }


@given(
    run_only=st.dictionaries(st.sampled_from(sorted(RUN_ONLY_VALUES)), st.none(), min_size=1).flatmap(
        lambda keys: st.fixed_dictionaries({k: RUN_ONLY_VALUES[k] for k in keys})
    ),
    precision=st.sampled_from(["auto", "fp32", "bf16"]),
    lr=st.floats(0.001, 1.0),
)
@settings(max_examples=60, deadline=None)
def test_split_run_only_keeps_apart_what_decides_results(run_only: dict, precision: str, lr: float):
    from dfakd.jobs.common import STAGE_SECTIONS, stage_settings

    deciding = {"runtime": {"precision": precision}, "recipe": {"lr": lr}, "seed": 3}
    job = config.merge(config.merge(config.DEFAULTS, deciding), nested(run_only))
    decides, runs = config.split_run_only(job)
    flat_decides, flat_runs = config.flatten(decides), config.flatten(runs)
    assert not set(flat_decides) & set(flat_runs)
    assert {**flat_decides, **flat_runs} == config.flatten(job)
    assert all(config.is_run_only(k) for k in flat_runs) and not any(map(config.is_run_only, flat_decides))
    assert decides == config.split_run_only(config.merge(config.DEFAULTS, deciding))[0]
    # the fingerprinted settings of every stage come from the deciding part alone
    baseline = config.load(json_configs=[json.dumps(deciding)])
    for stage in STAGE_SECTIONS:
        assert stage_settings(job, stage) == stage_settings(baseline, stage), stage
