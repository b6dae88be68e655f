"""Job configuration: one YAML file per job, merged over the documented defaults below.

The defaults are the single source of truth for every key: a key that is not here is an error, a value of
the wrong type is an error, and every error names the dotted key. ``docs/config.md`` documents each key.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
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
        "name": "mnist5k",  # mnist5k | mnist5k-cluttered | cifar10 | cifar100 | cinic10 | imagefolder
        "root": "data/mnist5k",
        "download": False,  # torchvision download for CIFAR (needs internet)
        "num_classes": None,  # imagefolder only; others know theirs
        "mean": None,  # per-channel normalization; null = the dataset's standard values
        "std": None,
        "augment": "auto",  # auto | crop_flip | crop | resized_crop_flip | none
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
        "warmup_epochs": 0,  # [ours] epochs of weight steps only (CE + bridge, no beta step) first
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
        "st_distance": "normalized",  # eq. 11: normalized (unit vectors, scale-free) | mse (raw; ablation)
        "st_bn": False,  # a BatchNorm after the ST connector's 1x1 conv (fig. 3 has none; ablation)
        "regularizer": "none",  # R(beta): none | entropy (of alpha) | l2 (of beta)
        "regularizer_weight": 0.0,
        "record_every": 1,  # beta steps between rows of the alpha trajectory
    },
    "derive": {  # section 3
        "mode": "full",  # full (Algorithm 1: the softmax weights as searched) | prune | argmax | topk |
        # last | average | random
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
        "compile": False,  # torch.compile the step loss: false | true (= default) | default | reduce-overhead
        # (CUDA graphs) | max-autotune; the first step's time (compile included) is reported apart
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
        "parent_run_file": None,  # or under the (lazily created) parent run of this `tracking-init` file
        "tags": {},
        "retries": 3,  # retries of a failed tracking call (exponential backoff) before going offline
        "backoff_s": 1.0,  # first retry delay, doubled each retry
        "timeout_s": 10.0,  # per HTTP request to a tracking server
    },
}

#: keys that change how a job runs, never what it computes: a change of them retrains nothing (by hand, and
#: through the workflow, which keeps them out of the rule params that Snakemake compares)
RUN_ONLY_KEYS = (
    "dataset.download", "runtime.device", "runtime.threads", "runtime.log_every", "runtime.eval_batch_size",
    "runtime.compile", "runtime.deterministic", "runtime.channels_last", "runtime.finite_check_every",
)  # fmt: skip
#: sections that are run-only as a whole: where a job logs, not what it computes
RUN_ONLY_SECTIONS = ("tracking",)


def is_under(dotted: str, keys: Iterable[str]) -> bool:
    """Whether ``dotted`` is one of ``keys`` or lies below one of them."""
    return any(dotted == key or dotted.startswith(f"{key}.") for key in keys)


def is_run_only(dotted: str) -> bool:
    return is_under(dotted, RUN_ONLY_KEYS) or is_under(dotted, RUN_ONLY_SECTIONS)


def split_run_only(cfg: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """A (partial) config as (what decides a job's result, how the job runs), both nested like ``cfg``;
    merged, the two give ``cfg`` back."""
    decides: dict[str, Any] = {}
    runs: dict[str, Any] = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if is_run_only(dotted):
            runs[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and value and any(k.startswith(f"{dotted}.") for k in RUN_ONLY_KEYS):
            decides_below, runs_below = split_run_only(value, f"{dotted}.")
            if decides_below:
                decides[key] = decides_below
            if runs_below:
                runs[key] = runs_below
        else:
            decides[key] = copy.deepcopy(value)
    return decides, runs


# keys whose value is a free-form mapping (no schema below them)
_FREE_FORM = {"tracking.tags", "distill.options"}
# keys that are null by default and accept these types
_NULLABLE_TYPES: dict[str, tuple[type, ...]] = {
    "dataset.num_classes": (int,),
    "dataset.mean": (list,),
    "dataset.std": (list,),
    "tracking.uri": (str,),
    "tracking.parent_run_id": (str,),
    "tracking.parent_run_file": (str,),
    "teacher.arch": (str,),
    "teacher.checkpoint": (str,),
    "distill.aggregation": (str,),
}


# keys whose value may be of either type
_UNION_TYPES: dict[str, tuple[type, ...]] = {
    "runtime.channels_last": (bool, str),
    "runtime.compile": (bool, str),
}
#: the values of ``runtime.compile``: off, on (torch.compile's default mode) or a torch.compile mode
COMPILE_MODES = (False, True, "default", "reduce-overhead", "max-autotune")


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


#: numeric keys and their valid range: (low, low inclusive, high, high inclusive); None = unbounded
RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "seed": (0, True, None, False),
    "recipe.epochs": (1, True, None, False),
    "recipe.batch_size": (1, True, None, False),
    "recipe.lr": (0, False, None, False),
    "recipe.momentum": (0, True, 1, False),
    "recipe.weight_decay": (0, True, None, False),
    "recipe.gamma": (0, False, None, False),
    "recipe.warmup_epochs": (0, True, None, False),
    "search.epochs": (1, True, None, False),
    "search.warmup_epochs": (0, True, None, False),
    "search.batch_size": (1, True, None, False),
    "search.record_every": (1, True, None, False),
    "search.w_lr": (0, False, None, False),
    "search.w_lr_min": (0, True, None, False),
    "search.w_momentum": (0, True, 1, False),
    "search.w_weight_decay": (0, True, None, False),
    "search.beta_lr": (0, False, None, False),
    "search.beta_weight_decay": (0, True, None, False),
    "search.gamma_ts": (0, True, None, False),
    "search.gamma_st": (0, True, None, False),
    "search.regularizer_weight": (0, True, None, False),
    "derive.tau": (0, True, 1, False),
    "derive.k": (1, True, None, False),
    "distill.ce_weight": (0, True, None, False),
    "runtime.eval_batch_size": (1, True, None, False),
    "runtime.log_every": (1, True, None, False),
    "runtime.threads": (0, True, 1024, True),
    "runtime.finite_check_every": (0, True, None, False),
    "tracking.retries": (0, True, None, False),
    "tracking.backoff_s": (0, True, None, False),
    "tracking.timeout_s": (0, False, None, False),
}
#: string keys and their allowed values
CHOICES: dict[str, tuple[str, ...]] = {
    "recipe.schedule": ("multistep", "cosine"),
    "runtime.precision": ("auto", "fp32", "bf16"),
    "dataset.augment": ("auto", "crop_flip", "crop", "resized_crop_flip", "none"),
    "dataset.pad_mode": ("constant", "reflect"),
    "search.schedule": ("groupwise", "joint"),
    "search.regularizer": ("none", "entropy", "l2"),
    "search.st_distance": ("normalized", "mse"),
    "derive.mode": ("prune", "argmax", "topk", "full", "last", "average", "random"),
}


def in_range(value: float, bounds: tuple[float | None, bool, float | None, bool]) -> bool:
    low, low_in, high, high_in = bounds
    if low is not None and (value < low or (value == low and not low_in)):
        return False
    return high is None or value < high or (value == high and high_in)


def describe_range(bounds: tuple[float | None, bool, float | None, bool]) -> str:
    low, low_in, high, high_in = bounds
    if high is None:
        return f"{'>=' if low_in else '>'} {low:g}"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def _non_finite(node: Any, prefix: str = "") -> str | None:
    """The dotted key of the first NaN or infinite number anywhere in ``node`` (lists included)."""
    if isinstance(node, float) and not math.isfinite(node):
        return prefix or "(value)"
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        found = _non_finite(
            value, f"{prefix}[{key}]" if isinstance(node, list) else f"{prefix}{'.' if prefix else ''}{key}"
        )
        if found:
            return found
    return None


def validate(cfg: dict[str, Any]) -> None:
    """Value checks that types alone cannot express: every number finite and in range, every choice
    among its allowed values."""
    bad = _non_finite(cfg)
    _require(bad is None, str(bad), f"must be a finite number, got {get_loose(cfg, bad)!r}")
    for key, bounds in RANGES.items():
        value = get(cfg, key)
        _require(in_range(value, bounds), key, f"must be {describe_range(bounds)}, got {value!r}")
    for key, allowed in CHOICES.items():
        _one_of(cfg, key, allowed)
    recipe = cfg["recipe"]
    _require(
        all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in recipe["milestones"]),
        "recipe.milestones",
        f"must be a list of positive integer epochs, got {recipe['milestones']!r}",
    )
    _require(
        cfg["runtime"]["channels_last"] in (True, False, "auto"),
        "runtime.channels_last",
        f"must be true, false or auto; got {cfg['runtime']['channels_last']!r}",
    )
    compile_mode = cfg["runtime"]["compile"]
    _require(
        any(compile_mode is m or (isinstance(m, str) and compile_mode == m) for m in COMPILE_MODES),
        "runtime.compile",
        f"must be false, true, default, reduce-overhead or max-autotune; got {compile_mode!r}",
    )
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
                len(value) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
                f"dataset.{key}",
                f"must be a list of 3 numbers, got {value!r}",
            )
    if cfg["dataset"]["std"] is not None:
        _require(all(v > 0 for v in cfg["dataset"]["std"]), "dataset.std", "must be positive")
    num_classes = cfg["dataset"]["num_classes"]
    _require(
        num_classes is None or num_classes >= 2, "dataset.num_classes", f"must be >= 2, got {num_classes}"
    )
    betas = cfg["search"]["beta_betas"]
    _require(
        len(betas) == 2
        and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas),
        "search.beta_betas",
        f"must be a list of two numbers in [0, 1) (Adam's betas), got {betas!r}",
    )
    _require(
        cfg["search"]["w_lr_min"] <= cfg["search"]["w_lr"],
        "search.w_lr_min",
        f"must be <= search.w_lr ({cfg['search']['w_lr']}), got {cfg['search']['w_lr_min']}",
    )
    for key in ("results_dir", "dataset.root", "model.arch"):
        _require(bool(get(cfg, key)), key, "must not be empty")


def get_loose(cfg: dict[str, Any], dotted: str | None) -> Any:
    """The value at a dotted key that may index lists (``a.b[1]``); None if there is none."""
    node: Any = cfg
    for part in (dotted or "").replace("[", ".[").split("."):
        if not part:
            continue
        try:
            node = node[int(part[1:-1])] if part.startswith("[") else node[part]
        except (KeyError, IndexError, TypeError, ValueError):
            return None
    return node


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
