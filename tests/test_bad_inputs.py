"""Bad input gets a clear error: one line naming the key, file or value and what is allowed, exit code 2,
no traceback, and nothing written to the results folder. Table-driven, through the real CLI entry."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config, write_imagefolder

from dfakd import cli, models

T_32 = ["layer1.0", "layer1.1", "layer1.2"]  # resnet20's 32 px candidates


class NotAWeight:
    """A custom class: a checkpoint holding one must not be unpickled."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


@dataclass
class World:
    """Shared inputs: a tiny ImageFolder, a valid job config, a resnet20 teacher and aggregation files."""

    base: Path
    cfg: dict
    files: dict[str, Path] = field(default_factory=dict)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    base = tmp_path_factory.mktemp("bad")
    images = write_imagefolder(base / "imgs", n_train=4, n_test=2)
    cfg = tiny_config(images.root, base / "results", epochs=1)
    cfg["teacher"] = {"arch": "resnet20", "checkpoint": str(base / "teacher.pt")}
    w = World(base, cfg)
    teacher = models.build("resnet20", 3)
    torch.save({"model": teacher.state_dict(), "arch": "resnet20", "num_classes": 3}, base / "teacher.pt")
    torch.save({"model": teacher.state_dict()}, base / "community.pth")
    torch.save({"model": teacher.state_dict(), "extra": NotAWeight()}, base / "pickled.pth")
    raw = (base / "teacher.pt").read_bytes()
    (base / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (base / "garbage.pt").write_bytes(b"\x00not a checkpoint at all" * 10)
    (base / "malformed.yaml").write_text("recipe:\n  epochs: [1, 2\n")
    (base / "list.yaml").write_text("- just\n- a list\n")

    good = {"layer1.0": 0.2, "layer1.2": 0.8}
    groups = [{"spatial": 32, "layers": good}, {"spatial": 16, "layers": {"layer2.2": 1.0}},
              {"spatial": 8, "layers": {"layer3.2": 1.0}}]  # fmt: skip

    def agg(name: str, teacher_arch="resnet20", gs=None, fmt="dfakd-aggregation/1") -> None:
        doc = {"format": fmt, "teacher": teacher_arch, "mode": "prune", "groups": gs or groups}
        (base / name).write_text(yaml.safe_dump(doc))

    agg("agg_unknown_layer.yaml", gs=[{"spatial": 32, "layers": {"layer1.7": 1.0}}, *groups[1:]])
    agg("agg_bad_sum.yaml", gs=[{"spatial": 32, "layers": {"layer1.0": 0.5, "layer1.1": 0.3}}, *groups[1:]])
    agg("agg_extra_group.yaml", gs=[*groups, {"spatial": 4, "layers": {"layer3.2": 1.0}}])
    agg("agg_other_teacher.yaml", teacher_arch="resnet56")
    agg("agg_not_aggregation.yaml", fmt="something-else")
    agg("agg_nan_weight.yaml", gs=[{"spatial": 32, "layers": {"layer1.0": float("nan")}}, *groups[1:]])
    (base / "latin1.yaml").write_bytes(b"seed: 0\n# caf\xe9\n")
    (base / "duplicate.yaml").write_text("recipe:\n  lr: 0.1\n  lr: 0.2\n")
    (base / "a_file").write_text("not a folder\n")
    torch.save(
        {"model": teacher.state_dict(), "arch": "resnet20", "num_classes": "ten"}, base / "classes_str.pt"
    )
    torch.save({"model": teacher.state_dict(), "arch": 7, "num_classes": 3}, base / "arch_int.pt")
    short = {"teacher": "resnet20", "groups": [{"spatial": 32, "layers": T_32, "alpha": [1.0]}]}
    (base / "short_alpha.json").write_text(json.dumps(short))
    (base / "nan_alpha.json").write_text(
        '{"teacher": "resnet20", "groups": [{"spatial": 32, "layers": ["layer1.0"], "alpha": [NaN]}]}'
    )
    return w


def _cfg_file(world: World, name: str, **changes) -> str:
    cfg = yaml.safe_load(yaml.safe_dump(world.cfg))
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = world.base / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


# (id, argv builder, expected fragments of the one-line message)
CASES = [
    ("malformed-yaml", lambda w: ["train", "-c", w.base / "malformed.yaml"], ["malformed YAML", "malformed.yaml", "line 3"]),
    ("config-not-a-mapping", lambda w: ["train", "-c", w.base / "list.yaml"], ["must hold a mapping"]),
    ("config-missing", lambda w: ["train", "-c", w.base / "nope.yaml"], ["config file not found", "nope.yaml"]),
    ("unknown-top-key", lambda w: ["train", "-c", _cfg_file(w, "k1", colour="red")],
     ["unknown config key 'colour'", "allowed here"]),
    ("unknown-nested-key", lambda w: ["train", "-c", _cfg_file(w, "k2", recipe__lrr=0.1)],
     ["unknown config key 'recipe.lrr'"]),
    ("epochs-wrong-type", lambda w: ["train", "-c", _cfg_file(w, "k3", recipe__epochs="ten")],
     ["'recipe.epochs'", "int"]),
    ("epochs-zero", lambda w: ["train", "-c", _cfg_file(w, "k4", recipe__epochs=0)], ["'recipe.epochs'", ">= 1"]),
    ("lr-negative", lambda w: ["train", "-c", _cfg_file(w, "k5", recipe__lr=-0.1)], ["'recipe.lr'", "> 0"]),
    ("batch-zero", lambda w: ["train", "-c", _cfg_file(w, "k6", recipe__batch_size=0)], ["'recipe.batch_size'"]),
    ("weight-decay-negative", lambda w: ["train", "-c", _cfg_file(w, "k7", recipe__weight_decay=-1.0)],
     ["'recipe.weight_decay'"]),
    ("seed-string", lambda w: ["train", "-c", _cfg_file(w, "k8", seed="abc")], ["'seed'", "int"]),
    ("seed-float", lambda w: ["train", "-c", _cfg_file(w, "k9", seed=1.5)], ["'seed'", "int"]),
    ("seed-via-set", lambda w: ["train", "-c", _cfg_file(w, "k10"), "--set", "seed=x1"], ["'seed'"]),
    ("set-without-equals", lambda w: ["train", "-c", _cfg_file(w, "k11"), "--set", "seed"], ["KEY=VALUE"]),
    ("unknown-model", lambda w: ["train", "-c", _cfg_file(w, "k12", model__arch="resnet9")],
     ["unknown model 'resnet9'", "available"]),
    ("unknown-dataset", lambda w: ["train", "-c", _cfg_file(w, "k13", dataset__name="imagenet")],
     ["unknown dataset 'imagenet'", "dataset.name"]),
    ("unknown-schedule", lambda w: ["train", "-c", _cfg_file(w, "k14", recipe__schedule="linear")],
     ["'recipe.schedule'", "multistep, cosine"]),
    ("unknown-augment", lambda w: ["train", "-c", _cfg_file(w, "k15", dataset__augment="mixup")],
     ["'dataset.augment'"]),
    ("missing-dataset-folder", lambda w: ["train", "-c", _cfg_file(w, "k16", dataset__root=str(w.base / "gone"))],
     ["missing directory", "gone"]),
    ("missing-cifar", lambda w: ["train", "-c", _cfg_file(w, "k17", dataset__name="cifar100",
                                                          dataset__root=str(w.base / "cifar"))],
     ["cifar100 not found", "cifar-100-python"]),
    ("num-classes-too-small", lambda w: ["train", "-c", _cfg_file(w, "k18", dataset__num_classes=2)],
     ["'dataset.num_classes'", "3 class folders"]),
    ("mean-wrong-length", lambda w: ["train", "-c", _cfg_file(w, "k19", dataset__mean=[0.5, 0.5])],
     ["'dataset.mean'", "3 numbers"]),
    ("cuda-absent", lambda w: ["train", "-c", _cfg_file(w, "k20", runtime__device="cuda")],
     ["'cuda'", "no CUDA device"]),
    ("device-invalid", lambda w: ["train", "-c", _cfg_file(w, "k21", runtime__device="gpu")], ["runtime.device"]),
    ("unknown-method", lambda w: ["distill", "-c", _cfg_file(w, "k22"), "--method", "crd"],
     ["unknown method 'crd'", "available"]),
    ("method-twice", lambda w: ["distill", "-c", _cfg_file(w, "k23"), "--method", "kd+kd"], ["each method once"]),
    ("unknown-method-option", lambda w: ["distill", "-c", _cfg_file(w, "k24", distill__options={"kd": {"temp": 2}}),
                                         "--method", "kd"], ["unknown option(s) temp", "'kd'"]),
    ("no-teacher-checkpoint", lambda w: ["distill", "-c", _cfg_file(w, "k25", teacher__checkpoint=None),
                                         "--method", "kd"], ["'teacher.checkpoint'"]),
    ("teacher-arch-mismatch", lambda w: ["distill", "-c", _cfg_file(w, "k26", teacher__arch="resnet56"),
                                         "--method", "kd"], ["resnet56", "resnet20"]),
    ("dfa-without-aggregation", lambda w: ["distill", "-c", _cfg_file(w, "k27"), "--method", "dfa"],
     ["needs an aggregation file"]),
    ("aggregation-unknown-layer", lambda w: ["distill", "-c", _cfg_file(w, "k28"), "--method", "dfa",
                                             "--aggregation", w.base / "agg_unknown_layer.yaml"],
     ["layer1.7", "lacks"]),
    ("aggregation-weights-sum", lambda w: ["distill", "-c", _cfg_file(w, "k29"), "--method", "dfa",
                                           "--aggregation", w.base / "agg_bad_sum.yaml"], ["sum to 0.8", "not 1"]),
    ("aggregation-groups-mismatch", lambda w: ["distill", "-c", _cfg_file(w, "k30"), "--method", "dfa",
                                               "--aggregation", w.base / "agg_extra_group.yaml"],
     ["groups at [4, 8, 16, 32] px", "[8, 16, 32] px"]),
    ("aggregation-other-teacher", lambda w: ["distill", "-c", _cfg_file(w, "k31"), "--method", "dfa",
                                             "--aggregation", w.base / "agg_other_teacher.yaml"],
     ["made for teacher 'resnet56'"]),
    ("not-an-aggregation", lambda w: ["distill", "-c", _cfg_file(w, "k32"), "--method", "dfa",
                                      "--aggregation", w.base / "agg_not_aggregation.yaml"],
     ["not an aggregation file"]),
    ("derive-needs-search", lambda w: ["derive", "-c", _cfg_file(w, "k33"), "--mode", "prune",
                                       "-o", w.base / "results" / "agg.yaml"], ["needs --search"]),
    ("derive-unknown-mode", lambda w: ["derive", "-c", _cfg_file(w, "k34"), "--mode", "best",
                                       "-o", w.base / "results" / "agg.yaml"], ["'derive.mode'"]),
    ("search-missing-teacher-file", lambda w: ["search", "-c", _cfg_file(w, "k35", teacher__checkpoint=str(
        w.base / "missing.pt"))], ["checkpoint not found", "missing.pt"]),
    ("evaluate-truncated", lambda w: ["evaluate", "-c", _cfg_file(w, "k36"), "--checkpoint", w.base / "truncated.pt"],
     ["truncated or corrupt", "truncated.pt"]),
    ("evaluate-garbage", lambda w: ["evaluate", "-c", _cfg_file(w, "k37"), "--checkpoint", w.base / "garbage.pt"],
     ["truncated or corrupt"]),
    ("import-pickled-object", lambda w: ["import-teacher", w.base / "pickled.pth", "--arch", "resnet20",
                                         "--num-classes", "3", "--out", w.base / "results" / "t.pt"],
     ["pickled Python objects", "refused"]),
    ("import-wrong-architecture", lambda w: ["import-teacher", w.base / "community.pth", "--arch", "resnet8",
                                             "--num-classes", "3", "--out", w.base / "results" / "t.pt"],
     ["does not fit architecture 'resnet8'", "unexpected keys"]),
    # found by new users (issue: 41 of 105 unlisted bad inputs broke the one-line promise)
    ("config-not-utf8", lambda w: ["train", "-c", w.base / "latin1.yaml"], ["not UTF-8", "latin1.yaml", "line 2"]),
    ("config-duplicate-key", lambda w: ["train", "-c", w.base / "duplicate.yaml"], ["duplicate key 'lr'", "line 3"]),
    ("beta-betas-out-of-range", lambda w: ["search", "-c", _cfg_file(w, "k40", search__beta_betas=[0.5, 1.0])],
     ["'search.beta_betas'", "[0, 1)"]),
    ("method-option-wrong-type", lambda w: ["distill", "-c", _cfg_file(w, "k41", distill__options={"kd": {"weight": "heavy"}}),
                                            "--method", "kd"], ["distill.options.kd.weight", "a number", "heavy"]),
    ("method-option-out-of-range", lambda w: ["distill", "-c", _cfg_file(w, "k42", distill__options={"kd": {"temperature": 0}}),
                                              "--method", "kd"], ["distill.options.kd.temperature", "> 0"]),
    ("options-of-unused-method", lambda w: ["distill", "-c", _cfg_file(w, "k43", distill__options={"dkd": {"beta": -1}}),
                                            "--method", "kd"], ["distill.options.dkd.beta", ">= 0"]),
    ("timeout-inf", lambda w: ["train", "-c", _cfg_file(w, "k44", tracking__timeout_s=float("inf"))],
     ["'tracking.timeout_s'", "finite"]),
    ("lr-inf", lambda w: ["train", "-c", _cfg_file(w, "k45", recipe__lr=float("inf"))], ["'recipe.lr'", "finite"]),
    ("weight-decay-inf", lambda w: ["train", "-c", _cfg_file(w, "k46", recipe__weight_decay=float("inf"))],
     ["'recipe.weight_decay'", "finite"]),
    ("mean-nan", lambda w: ["train", "-c", _cfg_file(w, "k47", dataset__mean=[0.5, float("nan"), 0.5])],
     ["'dataset.mean[1]'", "finite"]),
    ("batch-larger-than-dataset", lambda w: ["train", "-c", _cfg_file(w, "k48")],
     ["'recipe.batch_size' is 16", "12 images"]),
    ("search-batch-larger-than-half", lambda w: ["search", "-c", _cfg_file(w, "k49", search__batch_size=7)],
     ["'search.batch_size' is 7", "half the training split"]),
    ("out-is-a-file", lambda w: ["evaluate", "-c", _cfg_file(w, "k50"), "--checkpoint", w.base / "teacher.pt",
                                 "-o", w.base], ["is a folder"]),
    ("run-folder-is-a-file", lambda w: ["derive", "-c", _cfg_file(w, "k51"), "--mode", "last",
                                        "-o", w.base / "a_file" / "agg.yaml"], ["a_file is a file, not a folder"]),
    ("checkpoint-num-classes-string", lambda w: ["evaluate", "-c", _cfg_file(w, "k52"),
                                                 "--checkpoint", w.base / "classes_str.pt"], ["'num_classes' is 'ten'"]),
    ("checkpoint-arch-int", lambda w: ["evaluate", "-c", _cfg_file(w, "k53"), "--checkpoint", w.base / "arch_int.pt"],
     ["'arch' is 7", "not a model"]),
    ("search-json-alpha-short", lambda w: ["derive", "-c", _cfg_file(w, "k54"), "--search", w.base / "short_alpha.json",
                                           "-o", w.base / "results" / "agg.yaml"], ["groups[0].alpha", "3 numbers"]),
    ("search-json-nan-alpha", lambda w: ["derive", "-c", _cfg_file(w, "k55"), "--search", w.base / "nan_alpha.json",
                                         "-o", w.base / "results" / "agg.yaml"], ["not valid JSON", "NaN"]),
    ("aggregation-nan-weight", lambda w: ["distill", "-c", _cfg_file(w, "k56"), "--method", "dfa",
                                          "--aggregation", w.base / "agg_nan_weight.yaml"], ["not a finite number"]),
    ("import-wrong-sha256", lambda w: ["import-teacher", w.base / "community.pth", "--arch", "resnet20",
                                       "--num-classes", "3", "--sha256", "0" * 64,
                                       "--out", w.base / "results" / "t.pt"], ["sha256", "expected 000"]),
    ("evaluate-without-metadata", lambda w: ["evaluate", "-c", _cfg_file(w, "k38"),
                                             "--checkpoint", w.base / "community.pth"], ["import-teacher"]),
    ("sync-missing-folder", lambda w: ["sync-mlflow", w.base / "results" / "none"], ["results folder not found"]),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_writes_nothing(world: World, argv, fragments, capsys):
    results = world.base / "results"
    assert not results.exists() or not any(results.iterdir())
    args = [str(a) for a in argv(world)]
    if args[0] in ("train", "search", "distill"):
        args += ["-o", str(results / "run")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dfakd {args[0]}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not results.exists() or not any(results.iterdir()), f"{args[0]} wrote into results/"


def test_at_least_thirty_cases():
    assert len(CASES) >= 30
