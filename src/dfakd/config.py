"""Job configuration: one YAML file per job, merged over the documented defaults below.

The defaults are the single source of truth for every key: a key that is not here is an error, a value of
the wrong type is an error, and every error names the dotted key. ``docs/config.md`` documents each key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from dfakd.errors import DfakdError
from dfakd.files import parse_json, parse_yaml
from dfakd.files import read_yaml as read_yaml_file

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "results_dir": "results",
    "dataset": {
        "name": "mnist5k",  # mnist5k | cifar10 | cifar100 | cinic10 | imagefolder
        "root": "data/mnist5k",
        "download": False,  # torchvision download for CIFAR (needs internet)
        "num_classes": None,  # imagefolder only; others know theirs
        "mean": None,  # per-channel normalization; null = the dataset's standard values
        "std": None,
        "augment": "auto",  # auto | crop_flip | resized_crop_flip | none
        "pad_mode": "constant",  # crop_flip padding: constant (RepDistiller) | reflect (DFA authors)
    },
    "model": {"arch": "resnet20"},  # the model trained by `train`; the student of `search`/`distill`
    "teacher": {
        "arch": None,  # zoo name of the teacher
        "checkpoint": None,  # teacher weights in our layout (`dfakd train` best.pt or `dfakd import-teacher`)
    },
    "search": {  # stage 1 (METHOD.md section 2); DARTS defaults
        "schedule": "groupwise",  # groupwise (one group at a time, in order) | joint (all groups at once)
        "epochs": 10,  # epochs over the weight half per phase (groupwise: one phase per group)
        "batch_size": 64,
        "w_lr": 0.025,  # student + connectors: SGD, cosine to w_lr_min
        "w_lr_min": 0.001,
        "w_momentum": 0.9,
        "w_weight_decay": 3.0e-4,
        "beta_lr": 3.0e-4,  # architecture parameters: Adam
        "beta_betas": [0.5, 0.999],
        "beta_weight_decay": 1.0e-3,
        "gamma_ts": 1.0,  # bridge loss = gamma_ts * L_TS + gamma_st * L_ST
        "gamma_st": 1.0,
        "regularizer": "none",  # R(beta): none | entropy (of alpha) | l2 (of beta)
        "regularizer_weight": 0.0,
        "record_every": 1,  # beta steps between rows of the alpha trajectory
    },
    "derive": {  # section 3
        "mode": "prune",  # prune | argmax | topk | full | last | average | random
        "tau": 0.1,  # prune: keep layers with alpha >= tau, renormalize
        "k": 2,  # topk
    },
    "distill": {  # stage 2 (section 4)
        "method": "dfa",  # a method name or several joined by '+', e.g. dfa+kd; vanilla = CE only
        "ce_weight": 1.0,  # weight of the student's cross-entropy
        "aggregation": None,  # aggregation file for dfa (from `dfakd derive`)
        "options": {},  # per-method options, e.g. {kd: {temperature: 4}}; see docs/method.md
    },
    "recipe": {
        "epochs": 10,
        "batch_size": 64,
        "lr": 0.05,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 5.0e-4,
        "schedule": "multistep",  # multistep | cosine
        "milestones": [150, 180, 210],  # epochs, multistep only
        "gamma": 0.1,  # multistep lr factor
        "warmup_epochs": 0,  # linear warmup from lr/10, counted in epochs
    },
    "runtime": {
        "device": "auto",  # auto | cpu | cuda | cuda:N
        "precision": "auto",  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (autocast)
        "channels_last": "auto",  # auto (on for CUDA) | true | false
        "compile": False,  # torch.compile the student (and teacher); compile time is reported separately
        "eval_batch_size": 512,
        "log_every": 50,  # steps between one-line progress messages when not on a terminal
        "deterministic": False,  # torch.use_deterministic_algorithms
        "threads": 0,  # torch intra-op threads; 0 = torch's default
        "finite_check_every": 0,  # steps between reads of the losses' finiteness; 0 = auto (1 CPU, 50 CUDA)
    },
    "tracking": {
        "enabled": True,
        "uri": None,  # null: $MLFLOW_TRACKING_URI, else sqlite:///<results_dir>/mlflow.db
        "experiment": "dfakd",
        "parent_run_id": None,  # nest this job's run under a pipeline run
        "tags": {},
        "retries": 3,  # retries of a failed tracking call (exponential backoff) before going offline
        "backoff_s": 1.0,  # first retry delay, doubled each retry
        "timeout_s": 10.0,  # per HTTP request to a tracking server
    },
}

# keys whose value is a free-form mapping (no schema below them)
_FREE_FORM = {"tracking.tags", "distill.options"}
# keys that are null by default and accept these types
_NULLABLE_TYPES: dict[str, tuple[type, ...]] = {
    "dataset.num_classes": (int,),
    "dataset.mean": (list,),
    "dataset.std": (list,),
    "tracking.uri": (str,),
    "tracking.parent_run_id": (str,),
    "teacher.arch": (str,),
    "teacher.checkpoint": (str,),
    "distill.aggregation": (str,),
}


# keys whose value may be of either type
_UNION_TYPES: dict[str, tuple[type, ...]] = {"runtime.channels_last": (bool, str)}


def _type_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


def merge(base: dict[str, Any], override: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``, refusing unknown keys and wrong types."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            allowed = ", ".join(sorted(base)) or "(none)"
            raise DfakdError(f"unknown config key '{dotted}'; allowed here: {allowed}")
        default = base[key]
        if dotted in _FREE_FORM:
            if not isinstance(value, dict):
                raise DfakdError(f"config key '{dotted}' must be a mapping, got {value!r}")
            out[key] = {**default, **value}
        elif isinstance(default, dict):
            if not isinstance(value, dict):
                raise DfakdError(f"config key '{dotted}' must be a mapping, got {value!r}")
            out[key] = merge(default, value, f"{dotted}.")
        elif default is None:
            allowed_types = _NULLABLE_TYPES.get(dotted, (str, int, float, list))
            if value is not None and not isinstance(value, allowed_types):
                names = " or ".join(t.__name__ for t in allowed_types)
                raise DfakdError(f"config key '{dotted}' must be null or {names}, got {value!r}")
            out[key] = value
        elif dotted in _UNION_TYPES:
            if not isinstance(value, _UNION_TYPES[dotted]):
                names = " or ".join(t.__name__ for t in _UNION_TYPES[dotted])
                raise DfakdError(f"config key '{dotted}' must be {names}, got {value!r}")
            out[key] = value
        else:
            if not _type_ok(value, default):
                raise DfakdError(
                    f"config key '{dotted}' must be of type {type(default).__name__}, got {value!r}"
                )
            out[key] = float(value) if isinstance(default, float) else value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``a.b.c=value`` (value parsed as YAML) -> nested dict."""
    if "=" not in text:
        raise DfakdError(f"--set expects KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    value = parse_yaml(raw, f"--set {key}") if raw != "" else None
    nested: dict[str, Any] = {}
    cursor = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A job config file: UTF-8 YAML holding a mapping, no key twice (an empty file is an empty config)."""
    doc = read_yaml_file(path, "config file")
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise DfakdError(f"config file {path} must hold a mapping at top level, got {type(doc).__name__}")
    return doc


def load(
    paths: list[str | Path] | None = None,
    overrides: list[str] | None = None,
    json_configs: list[str] | None = None,
) -> dict[str, Any]:
    """Defaults <- each YAML file in order <- each JSON document <- each ``--set`` override; validated."""
    cfg = copy.deepcopy(DEFAULTS)
    for path in paths or []:
        cfg = merge(cfg, read_yaml(path))
    for text in json_configs or []:
        doc = parse_json(text, "--config-json")
        if not isinstance(doc, dict):
            raise DfakdError("--config-json must be a JSON object")
        cfg = merge(cfg, doc)
    for text in overrides or []:
        cfg = merge(cfg, parse_override(text))
    validate(cfg)
    return cfg


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise DfakdError(f"config key '{key}' {message}")


def _one_of(cfg: dict[str, Any], key: str, allowed: tuple[str, ...]) -> None:
    value = get(cfg, key)
    _require(value in allowed, key, f"must be one of {', '.join(allowed)}; got {value!r}")


def validate(cfg: dict[str, Any]) -> None:
    """Value checks that types alone cannot express."""
    recipe = cfg["recipe"]
    _require(recipe["epochs"] >= 1, "recipe.epochs", f"must be >= 1, got {recipe['epochs']}")
    _require(recipe["batch_size"] >= 1, "recipe.batch_size", f"must be >= 1, got {recipe['batch_size']}")
    _require(recipe["lr"] > 0, "recipe.lr", f"must be > 0, got {recipe['lr']}")
    _require(recipe["weight_decay"] >= 0, "recipe.weight_decay", "must be >= 0")
    _require(0 <= recipe["momentum"] < 1, "recipe.momentum", "must be in [0, 1)")
    _require(recipe["gamma"] > 0, "recipe.gamma", "must be > 0")
    _require(recipe["warmup_epochs"] >= 0, "recipe.warmup_epochs", "must be >= 0")
    _require(
        all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in recipe["milestones"]),
        "recipe.milestones",
        f"must be a list of positive integer epochs, got {recipe['milestones']!r}",
    )
    _one_of(cfg, "recipe.schedule", ("multistep", "cosine"))
    _require(cfg["runtime"]["eval_batch_size"] >= 1, "runtime.eval_batch_size", "must be >= 1")
    _require(cfg["runtime"]["log_every"] >= 1, "runtime.log_every", "must be >= 1")
    _require(cfg["runtime"]["threads"] >= 0, "runtime.threads", "must be >= 0 (0 = torch's default)")
    _one_of(cfg, "runtime.precision", ("auto", "fp32", "bf16"))
    _require(
        cfg["runtime"]["channels_last"] in (True, False, "auto"),
        "runtime.channels_last",
        f"must be true, false or auto; got {cfg['runtime']['channels_last']!r}",
    )
    _one_of(cfg, "dataset.augment", ("auto", "crop_flip", "resized_crop_flip", "none"))
    _one_of(cfg, "dataset.pad_mode", ("constant", "reflect"))
    device = cfg["runtime"]["device"]
    _require(
        device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()),
        "runtime.device",
        f"must be auto, cpu, cuda or cuda:N; got {device!r}",
    )
    for key in ("mean", "std"):
        value = cfg["dataset"][key]
        if value is not None:
            _require(
                len(value) == 3 and all(isinstance(v, (int, float)) for v in value),
                f"dataset.{key}",
                "must be a list of 3 numbers",
            )
    search = cfg["search"]
    _one_of(cfg, "search.schedule", ("groupwise", "joint"))
    _one_of(cfg, "search.regularizer", ("none", "entropy", "l2"))
    for key in ("epochs", "batch_size", "record_every"):
        _require(search[key] >= 1, f"search.{key}", f"must be >= 1, got {search[key]}")
    for key in ("w_lr", "beta_lr"):
        _require(search[key] > 0, f"search.{key}", f"must be > 0, got {search[key]}")
    _require(len(search["beta_betas"]) == 2, "search.beta_betas", "must be a list of two numbers")
    _one_of(cfg, "derive.mode", ("prune", "argmax", "topk", "full", "last", "average", "random"))
    _require(0 <= cfg["derive"]["tau"] < 1, "derive.tau", "must be in [0, 1)")
    _require(cfg["derive"]["k"] >= 1, "derive.k", "must be >= 1")
    _require(cfg["distill"]["ce_weight"] >= 0, "distill.ce_weight", "must be >= 0")
    _require(cfg["tracking"]["retries"] >= 0, "tracking.retries", "must be >= 0")
    _require(cfg["tracking"]["backoff_s"] >= 0, "tracking.backoff_s", "must be >= 0")
    _require(cfg["tracking"]["timeout_s"] > 0, "tracking.timeout_s", "must be > 0")
    if cfg["dataset"]["std"] is not None:
        _require(all(v > 0 for v in cfg["dataset"]["std"]), "dataset.std", "must be positive")


def get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{'recipe.lr': 0.05, ...}`` (lists become strings), for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = (
                value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
            )
    return flat


def dump(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
