"""The Snakemake workflow, driven by the real ``snakemake`` in a subprocess from the repository root.

- Every shipped config plans (dry run) exactly the jobs its grid implies, counted rule by rule from the
  config itself, without any data, checkpoint or earlier result present (``results_dir`` in tmp).
- A config given with ``--configfile`` is the whole config (nothing of the demo leaks into it), and
  config/README.md documents every key of the schema.
- Invalid configs (schema and ``check_config``) stop the dry run with a message naming the key.
- ``snakemake --lint`` and ``snakefmt --check`` are clean.
- The tiny demo DAG runs for real once (module fixture); then: its outputs, the HTML report, the MLflow
  runs nested under the pipeline's parent run, and what a dry run plans after a settings change (only
  the jobs whose job config changed, through Snakemake's params rerun trigger, and their dependents).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import cli_env, run_cli, write_imagefolder

REPO = Path(__file__).resolve().parents[1]
DEMO = "config/config.yaml"
TINY = "tests/data/tiny_workflow.yaml"
SHIPPED = [
    DEMO,
    "config/paper/cifar100.yaml",
    "config/paper/cinic10.yaml",
    "config/benchmarks/crd_cifar100.yaml",
    "config/experiments/ablation.yaml",
]
#: overlays on a shipped config: the slices of a study that ran (docs/experiments.md)
OVERLAYS = {
    f"config/experiments/ablation-slices/{name}.yaml": "config/experiments/ablation.yaml"
    for name in (
        "resnet-3-seeds",
        "stage2-gap",
        "variants-seed0",
        "wrn-cluttered",
        "resnet-seeds-3-4",
    )
}
SEARCHED_MODES = {"prune", "argmax", "topk", "full"}


# ------------------------------------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    env = cli_env()  # no ambient MLFLOW_* variables
    # the rules call `dfakd`: the venv's entry point must be on PATH even when pytest runs unactivated
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def snakemake(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", *map(str, args)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def output_of(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def job_stats(text: str) -> dict[str, int]:
    """The first "Job stats" table of a Snakemake run as {rule: count}; {} when nothing is to be done."""
    m = re.search(r"Job stats:\njob\s+count\n[- ]+\n(.*?)\ntotal\s+(\d+)\n", text, re.S)
    if m is None:
        assert "Nothing to be done" in text, text[-3000:]
        return {}
    counts = {name: int(n) for name, n in (line.split() for line in m.group(1).splitlines())}
    assert sum(counts.values()) == int(m.group(2))
    return counts


def planned_wildcards(text: str, rule: str) -> list[str]:
    """The wildcards line of every planned job of ``rule`` in a dry run's output."""
    blocks = re.findall(rf"^rule {rule}:\n(.*?)(?:\n\n|\Z)", text, re.S | re.M)
    return [m.group(1) for b in blocks if (m := re.search(r"wildcards: (.*)", b))]


def dry_run(*configfiles: str | Path, extra: tuple[str, ...] = ()) -> tuple[dict[str, int], str]:
    proc = snakemake("-n", "--configfile", *configfiles, *extra)
    text = output_of(proc)
    assert proc.returncode == 0, text[-4000:]
    return job_stats(text), text


def merge(base: dict, over: dict) -> dict:
    """Snakemake's update_config: dicts merge recursively, everything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if nested else value
    return out


def load(path: str | Path) -> dict[str, Any]:
    return yaml.safe_load((REPO / path).read_text())


def write_yaml(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def expected_jobs(cfg: dict[str, Any]) -> dict[str, int]:
    """Jobs per rule that the grid of ``cfg`` implies, from nothing on disk. Counted independently of
    workflow/rules/common.smk: one teacher per teacher id that a pair names (trained or imported), one
    search per (pair, search seed) that a searched aggregation needs, one derivation per distinct
    aggregation file, one distillation and one evaluation per (pair, method, seed)."""
    out = f"{cfg.get('results_dir', 'results')}/{cfg['experiment']}"
    teachers, methods, seeds = cfg["teachers"], cfg["methods"], cfg["seeds"]
    search_seeds = cfg.get("search_seeds", [0])

    def search_seed(seed: int) -> int:
        return search_seeds[seeds.index(seed) % len(search_seeds)]

    students, aggregations, searches = [], set(), set()
    for pair in cfg["pairs"]:
        t, s = pair["teacher"], pair["student"]
        ds = teachers[t]["dataset"]
        names = pair.get("methods", list(methods))
        for name in names:
            m = methods[name]
            for seed in seeds:
                students.append((ds, t, s, name, seed))
                if m.get("aggregation_file"):  # made by this workflow only if it lies under its derive/
                    pattern = rf"{re.escape(out)}/aggregations/(\w+)/([\w.]+)/([\w.]+)/(\w+)-s(\d+)\.yaml"
                    hit = re.fullmatch(pattern, m["aggregation_file"])
                    if hit:
                        a_ds, a_t, a_s, mode, a_seed = hit.groups()
                        aggregations.add((a_ds, a_t, a_s, "", mode, int(a_seed)))
                elif m.get("aggregation"):
                    mode = m["aggregation"]
                    searched = mode in SEARCHED_MODES
                    variant = m.get("search_variant", "") if searched else ""
                    aggregations.add((ds, t, s, variant, mode, search_seed(seed) if searched else seed))
        for variant in {methods[n].get("search_variant", "") for n in names
                        if methods[n].get("aggregation") in SEARCHED_MODES}:  # fmt: skip
            searches |= {(ds, t, s, variant, search_seed(seed)) for seed in seeds}
    searches |= {(ds, t, s, v, seed) for ds, t, s, v, mode, seed in aggregations if mode in SEARCHED_MODES}

    used = {p["teacher"] for p in cfg["pairs"]}
    imported = {t for t in used if teachers[t].get("checkpoint")}
    counts = {
        "prepare_data": len({teachers[t]["dataset"] for t in used}),  # every teacher is evaluated on its data
        "train_teacher": len(used - imported),
        "import_teacher": len(imported),
        "evaluate_teacher": len(used),
        "search": len(searches),
        "derive": len(aggregations),
        "distill": len(students),
        "evaluate_student": len(students),
        "summary": 1,
        "plots": 1,
        "all": 1,
    }
    return {rule: n for rule, n in counts.items() if n}


# ------------------------------------------------------------------------------ shipped configs plan


def _demo(tmp_path: Path) -> tuple[list[Path], dict]:
    over = write_yaml(tmp_path / "over.yaml", {"results_dir": str(tmp_path / "results")})
    return [REPO / DEMO, over], merge(load(DEMO), load(over))


def _paper(name: str) -> Callable[[Path], tuple[list[Path], dict]]:
    def make(tmp_path: Path) -> tuple[list[Path], dict]:
        cfg = load(name)
        cfg["results_dir"] = str(tmp_path / "results")
        for m in cfg["methods"].values():  # DFA-T files made by this workflow live under results_dir
            if m.get("aggregation_file", "").startswith("results/"):
                m["aggregation_file"] = f"{tmp_path}/results/{m['aggregation_file'][len('results/') :]}"
        return [write_yaml(tmp_path / Path(name).name, cfg)], cfg

    return make


def _overlaid(overlay: str) -> Callable[[Path], tuple[list[Path], dict]]:
    """A shipped config with one of its overlays merged over it, as `--configfile BASE OVERLAY` does."""

    def make(tmp_path: Path) -> tuple[list[Path], dict]:
        files, cfg = _paper(OVERLAYS[overlay])(tmp_path)
        cfg = merge(cfg, load(overlay))
        return [write_yaml(files[0], cfg)], cfg

    return make


def _crd_imported(tmp_path: Path) -> tuple[list[Path], dict]:
    """The CRD benchmark with its commented `checkpoint:` in use for one teacher (a placeholder file: a
    dry run only needs it to exist)."""
    files, cfg = _paper("config/benchmarks/crd_cifar100.yaml")(tmp_path)
    ckpt = tmp_path / "teachers/crd/resnet32x4_vanilla/ckpt_epoch_240.pth"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"placeholder")
    cfg["teachers"]["resnet32x4"]["checkpoint"] = str(ckpt)
    return [write_yaml(files[0], cfg)], cfg


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_demo, id="demo"),
        pytest.param(_paper("config/paper/cifar100.yaml"), id="paper-cifar100"),
        pytest.param(_paper("config/paper/cinic10.yaml"), id="paper-cinic10"),
        pytest.param(_paper("config/benchmarks/crd_cifar100.yaml"), id="crd-cifar100"),
        pytest.param(_crd_imported, id="crd-cifar100-imported-teacher"),
        pytest.param(_paper("config/experiments/ablation.yaml"), id="ablation"),
        *(pytest.param(_overlaid(o), id=Path(o).stem) for o in OVERLAYS),
    ],
)
def test_dry_run_plans_the_grid(make: Callable, tmp_path: Path) -> None:
    files, cfg = make(tmp_path)
    counts, text = dry_run(*files)
    assert counts == expected_jobs(cfg)
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


def test_shipped_configs_are_covered() -> None:
    """Every workflow config under config/ (one with `pairs:`; the others are `dfakd` job configs) is
    planned by test_dry_run_plans_the_grid."""
    found = [p for p in (REPO / "config").rglob("*.yaml") if "pairs" in (yaml.safe_load(p.read_text()) or {})]
    assert sorted(str(p.relative_to(REPO)) for p in found) == sorted([*SHIPPED, *OVERLAYS])


def test_a_workflow_that_imports_another_checkouts_dfakd_says_so(tmp_path: Path) -> None:
    """A second clone run with the first clone's editable install would run the first clone's code: the
    plan warns, naming both; the repository's own workflow does not."""
    import dfakd

    imported = Path(dfakd.__file__).resolve().parent
    own = REPO / "src" / "dfakd"
    if imported != own.resolve():
        pytest.skip(f"the tests import dfakd from {imported}, not from this checkout")
    assert "another checkout" not in dry_run("config/config.yaml")[1]
    clone = tmp_path / "clone"
    (clone / "src" / "dfakd").mkdir(parents=True)
    for folder in ("workflow", "config"):
        shutil.copytree(REPO / folder, clone / folder)
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--quiet"],
        cwd=clone, env=_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, output_of(proc)[-3000:]
    warning = [line for line in proc.stderr.splitlines() if "another checkout" in line]
    assert warning == [
        f"dfakd workflow: warning: this workflow is {clone} but imports dfakd from {imported}, another "
        f"checkout: its jobs run that code; run `pip install -e {clone}` or set PYTHONPATH={clone / 'src'} "
        "to run this checkout's"
    ]


def test_search_variants_are_searches_of_their_own(tmp_path: Path) -> None:
    """The ablation's search variants: one search per (pair, variant, search seed), each with its
    overrides of `search`, and its DFA students read the aggregation derived from it."""
    files, cfg = _paper("config/experiments/ablation.yaml")(tmp_path)
    _, text = dry_run(*files)
    searches = planned_wildcards(text, "search")
    variants = set(cfg["search_variants"])
    assert variants == {"mse_st", "joint", "warmup", "long", "ts_heavy", "st_heavy"}
    per_pair = len(cfg["search_seeds"]) * (1 + len(variants))  # the default search and each variant
    assert len(searches) == len(cfg["pairs"]) * per_pair
    assert sum("variant=mse_st-," in w for w in searches) == len(cfg["pairs"]) * len(cfg["search_seeds"])
    blocks = re.findall(r"^rule search:\n(.*?)(?:\n\n|\Z)", text, re.S | re.M)
    mse = [b for b in blocks if "/mse_st-s0/" in b]
    assert mse and all('"st_distance": "mse"' in b for b in mse)
    assert all('"schedule": "joint"' in b for b in blocks if "/joint-s1/" in b)
    assert all('"warmup_epochs": 4' in b for b in blocks if "/warmup-s2/" in b)
    assert all('"gamma_st": 0.25' in b and '"gamma_ts"' not in b for b in blocks if "/ts_heavy-s0/" in b)
    default = [b for b in blocks if re.search(r"/resnet8/s0/search.json", b)]
    assert default and not any('"st_distance"' in b for b in default)


def test_paper_dfa_t_reads_the_cifar100_search(tmp_path: Path) -> None:
    """DFA-T on CINIC-10 distills with the aggregation derived from the CIFAR-100 search of the same
    architectures, which this workflow plans before it."""
    files, _ = _paper("config/paper/cinic10.yaml")(tmp_path)
    _, text = dry_run(*files, extra=("--printshellcmds",))
    dfa_t = [line for line in text.splitlines() if "dfakd distill" in line and "/dfa_t_" in line]
    assert len(dfa_t) == 9
    assert all("--aggregation " in line and "/aggregations/cifar100/" in line for line in dfa_t)
    assert all('"name": "cinic10"' in line for line in dfa_t)
    assert {w for w in planned_wildcards(text, "search") if "dataset=cifar100" in w} == {
        f"dataset=cifar100, teacher={t}, student={s}, variant=, sseed=0"  # the default search
        for t, s in [
            ("shufflev2_2.0_c100", "ShuffleV2_1.0"),
            ("shufflev2_2.0_c100", "ShuffleV2_0.5"),
            ("shufflev2_1.0_c100", "ShuffleV2_0.5"),
        ]
    }


def test_configfile_replaces_the_demo_config(tmp_path: Path) -> None:
    """A config given with --configfile is the whole config: nothing of the demo (its mnist5k dataset,
    its methods, its search settings) may leak into it."""
    cfg = load("config/paper/cifar100.yaml")
    cfg.update(experiment="only-ce", results_dir=str(tmp_path / "results"))
    cfg["methods"] = {"ce": {"method": "vanilla"}}
    for pair in cfg["pairs"]:
        pair.pop("methods")
    counts, text = dry_run(write_yaml(tmp_path / "c.yaml", cfg), extra=("--printshellcmds",))
    assert counts == expected_jobs(cfg)  # 3 pairs x 1 method x 3 seeds, no search
    assert {re.search(r"method=(\S+?),", w).group(1) for w in planned_wildcards(text, "distill")} == {"ce"}
    assert "mnist5k" not in text


def schema_keys(node: dict, root: dict) -> set[str]:
    """Every property name of the workflow schema, nested ones included ($ref resolved)."""
    if "$ref" in node:
        node = root["$defs"][node["$ref"].split("/")[-1]]
    keys = set(node.get("properties", {}))
    children = [*node.get("properties", {}).values(), node.get("items")]
    if isinstance(node.get("additionalProperties"), dict):
        children.append(node["additionalProperties"])
    for child in children:
        if isinstance(child, dict):
            keys |= schema_keys(child, root)
    return keys


def test_config_readme_documents_every_schema_key() -> None:
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    readme = (REPO / "config/README.md").read_text()
    keys = schema_keys(schema, schema)
    assert {"experiment", "pad_mode", "warmup_epochs", "sha256", "aggregation_file", "gpu"} <= keys
    assert sorted(k for k in keys if f"`{k}`" not in readme) == []


# -------------------------------------------------------------------------------- invalid configs


def _valid(tmp_path: Path) -> dict[str, Any]:
    """A complete, valid config (names unlike the demo's, so that nothing merges into them)."""
    return {
        "experiment": "bad",
        "results_dir": str(tmp_path / "results"),
        "datasets": {"c100": {"name": "cifar100", "root": str(tmp_path / "cifar")}},
        "recipes": {"r": {"epochs": 2, "batch_size": 32, "lr": 0.05}},
        "teachers": {"t20": {"arch": "resnet20", "dataset": "c100", "recipe": "r"}},
        "pairs": [{"teacher": "t20", "student": "resnet8", "recipe": "r"}],
        "methods": {"ce": {"method": "vanilla"}, "dfa_p": {"method": "dfa", "aggregation": "prune"}},
        "seeds": [0],
        "search_seeds": [0],
    }


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def mutate(cfg: dict) -> None:
        *parents, last = path.split(".")
        node = cfg
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value

    return mutate


BAD_CONFIGS = [
    ("unknown-top-level-key", _set("epochs_total", 3), r"'epochs_total' was unexpected"),
    ("seeds-wrong-type", _set("seeds", "a"), r"'a' is not of type 'array'.*\['seeds'\]"),
    ("unknown-recipe-key", _set("recipes.r.epochz", 3), r"'epochz' was unexpected.*\['recipes'\]\['r'\]"),
    ("negative-epochs", _set("recipes.r.epochs", -1), r"minimum.*\['recipes'\]\['r'\]\['epochs'\]"),
    ("unknown-dataset-name", _set("datasets.c100.name", "imagenet"), r"\['datasets'\]\['c100'\]\['name'\]"),
    ("undefined-teacher", _set("pairs.0.teacher", "t56"), r"pairs\[0\]\.teacher: unknown teacher 't56'"),
    ("unknown-method-of-pair", _set("pairs.0.methods", ["ce", "xx"]), r"pairs\[0\]\.methods: unknown method"),
    ("unknown-method-kind", _set("methods.ce.method", "vanila"), r"methods\.ce\.method"),
    ("unknown-student-arch", _set("pairs.0.student", "resnet9"), r"pairs\[0\]\.student: unknown model"),
    ("unknown-teacher-arch", _set("teachers.t20.arch", "wrn_9_9x"), r"teachers\.t20\.arch: unknown model"),
    ("teacher-unknown-dataset", _set("teachers.t20.dataset", "c10"), r"teachers\.t20\.dataset: unknown"),
    ("dfa-without-aggregation", _set("methods.dfa_p", {"method": "dfa"}), r"methods\.dfa_p: dfa needs"),
    ("unknown-search-key", _set("search", {"epochz": 1}), r"search\.epochz"),
    ("negative-search-epochs", _set("search", {"epochs": -1}), r"search\.epochs"),
    ("unknown-method-option", _set("methods.ce", {"method": "kd", "options": {"kd": {"temprature": 2}}}),
     r"methods\.ce\.options\.kd: unknown option\(s\) temprature"),
    ("teacher-id-traversal", _set("teachers", {"..": {"arch": "resnet20", "dataset": "c100", "recipe": "r"}}),
     r"does not match"),
]  # fmt: skip


def test_valid_base_config_plans(tmp_path: Path) -> None:
    cfg = _valid(tmp_path)
    counts, _ = dry_run(write_yaml(tmp_path / "valid.yaml", cfg))
    assert counts == expected_jobs(cfg)


@pytest.mark.parametrize(("mutate", "message"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_invalid_config_stops_the_dry_run(mutate: Callable, message: str, tmp_path: Path) -> None:
    cfg = _valid(tmp_path)
    mutate(cfg)
    proc = snakemake("-n", "--configfile", write_yaml(tmp_path / "bad.yaml", cfg))
    text = output_of(proc)
    assert proc.returncode != 0
    assert re.search(message, text, re.S), text[-3000:]
    assert "Job stats" not in text


def test_every_path_in_a_shell_command_is_one_argument(tmp_path: Path) -> None:
    """With spaces in results_dir, in a dataset root and in an imported teacher's path, every rule's shell
    command (as Snakemake plans it) splits into words that keep each path whole."""
    spaced = tmp_path / "with space"
    cfg = _valid(tmp_path)
    cfg["results_dir"] = str(spaced / "results")
    cfg["datasets"]["c100"]["root"] = str(spaced / "cifar")
    ckpt = spaced / "teacher.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"placeholder")
    imported = {"arch": "resnet32x4", "dataset": "c100", "checkpoint": str(ckpt), "sha256": "a" * 64}
    cfg["teachers"]["t32"] = imported
    cfg["pairs"].append({"teacher": "t32", "student": "resnet8x4", "recipe": "r"})
    _, text = dry_run(write_yaml(tmp_path / "spaced.yaml", cfg), extra=("--printshellcmds",))
    commands = [c for c in re.findall(r"^Shell command: (.*)$", text, re.M) if c != "None"]  # rule all: None
    verbs = {re.search(r"\bdfakd ([a-z-]+)", c).group(1) for c in commands}
    assert verbs == {"prepare-data", "train", "import-teacher", "evaluate", "search", "derive", "distill"} | {
        "summarize",
        "plot",
    }
    for command in commands:
        words = shlex.split(command)
        assert not [w for w in words if w.startswith("space/") or w.endswith("/with")], command
        assert any("with space/" in w for w in words), command


# ----------------------------------------------------------------------------------- style checks


def test_snakemake_lint_is_clean() -> None:
    proc = snakemake("--lint")
    text = output_of(proc)
    assert proc.returncode == 0, text[-3000:]
    assert "Congratulations" in text, text[-3000:]


def test_snakefmt_check() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", "workflow/"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- the tiny DAG, for real


class TinyRun:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.overlay = write_yaml(
            root / "overlay.yaml",
            {
                "results_dir": str(root / "results"),
                "datasets": {"mnist5k": {"name": "mnist5k", "root": str(root / "mnist5k")}},
            },
        )
        self.configfiles = [REPO / DEMO, REPO / TINY, self.overlay]
        self.cfg = merge(merge(load(DEMO), load(TINY)), load(self.overlay))
        self.out = root / "results" / self.cfg["experiment"]

    def student_dirs(self) -> list[Path]:
        dirs = []
        for pair in self.cfg["pairs"]:
            ds = self.cfg["teachers"][pair["teacher"]]["dataset"]
            for method in pair.get("methods", list(self.cfg["methods"])):
                for seed in self.cfg["seeds"]:
                    pair_dir = self.out / "students" / ds / pair["teacher"] / pair["student"]
                    dirs.append(pair_dir / method / f"s{seed}")
        return dirs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    run = TinyRun(tmp_path_factory.mktemp("tiny_workflow"))
    proc = snakemake("--cores", "2", "--configfile", *run.configfiles, timeout=900)
    (run.root / "snakemake.log").write_text(output_of(proc))
    assert proc.returncode == 0, output_of(proc)[-6000:]
    return run


@pytest.mark.slow
def test_tiny_run_outputs(tiny_run: TinyRun) -> None:
    out = tiny_run.out
    for name in ("summary.csv", "summary.md", "plots/accuracy.png", "plots/learning_curves.png"):
        assert (out / name).stat().st_size > 0, name
    students = tiny_run.student_dirs()
    assert len(students) == 4  # vanilla, kd, ofd, dfa x seed 0
    for d in students:
        result = json.loads((d / "result.json").read_text())
        evaluation = json.loads((d / "eval.json").read_text())
        assert 0 <= result["best_acc1"] <= 100 and 0 <= evaluation["top1"] <= 100
    searches = list((out / "search").glob("*/*/*/s*"))
    assert len(searches) == 1
    for name in ("search.json", "alpha_trajectory.csv", "alphas.png", "alpha_trajectory.png"):
        assert (searches[0] / name).stat().st_size > 0, name
    md = (out / "summary.md").read_text()
    assert all(f"| {m} |" in md for m in tiny_run.cfg["methods"])


@pytest.mark.slow
def test_tiny_run_report(tiny_run: TinyRun) -> None:
    report = tiny_run.root / "report.html"
    proc = snakemake("--report", report, "--configfile", *tiny_run.configfiles)
    assert proc.returncode == 0, output_of(proc)[-3000:]
    html = report.read_text(errors="replace")
    assert html.lstrip().lower().startswith("<!doctype html")
    for name in ("accuracy.png", "learning_curves.png", "summary.md", "summary.html", "alphas.png"):
        assert name in html, name
    assert "mlflow.db" in html and "tiny_workflow.yaml" in html  # the front page names store and config
    page = (tiny_run.out / "summary.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and all(
        f"<td>{m}</td>" in page for m in tiny_run.cfg["methods"]
    )


def _tiny_store(tiny_run: TinyRun) -> tuple[Any, Any, dict[str, Any]]:
    from mlflow.tracking import MlflowClient

    parent = json.loads((tiny_run.out / "mlflow_parent_run.json").read_text())
    client = MlflowClient(tracking_uri=parent["uri"])
    return client, client.get_experiment_by_name(tiny_run.cfg["experiment"]), parent


@pytest.mark.slow
def test_tiny_run_mlflow_runs_nested_under_the_pipeline_run(tiny_run: TinyRun) -> None:
    client, exp, parent = _tiny_store(tiny_run)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parent_run = client.get_run(parent["run_id"])
    assert parent_run.info.status == "FINISHED"
    assert not (tiny_run.out / "mlflow_parent_run.json.lock").exists()  # removed when the run closed
    assert [r.info.run_id for r in runs if r.data.tags.get("stage") == "pipeline"] == [parent["run_id"]]
    children = [r for r in runs if r.info.run_id != parent["run_id"]]
    by_stage: dict[str, list] = {}
    for r in children:
        assert r.data.tags.get("mlflow.parentRunId") == parent["run_id"], r.info.run_name
        assert r.info.status == "FINISHED", r.info.run_name
        assert r.data.tags["dfakd.current"] == "true" and r.data.tags["dfakd.version"], r.info.run_name
        by_stage.setdefault(r.data.tags["stage"], []).append(r)
    stages = ("train", "search", "distill")  # one run per job of train_teacher, search, distill
    assert {k: len(by_stage.get(k, [])) for k in stages} == {"train": 1, "search": 1, "distill": 4}
    seen = set()
    for r in by_stage["distill"]:
        tags = r.data.tags
        assert tags["dataset"] == "mnist5k" and tags["pair"] == "resnet20-resnet8" and tags["seed"] == "0"
        assert tags["method_type"] == tiny_run.cfg["methods"][tags["method"]]["method"]
        assert r.info.run_name == f"{tags['method']}-mnist5k-resnet20-resnet8-s0"
        seen.add(tags["method"])
    assert seen == set(tiny_run.cfg["methods"])


@pytest.mark.slow
def test_tiny_run_mlflow_is_a_comparison_view(tiny_run: TinyRun) -> None:
    """What a researcher filters and reads: one group per configured method name, params that decided
    each run, the note that tells how to reach the runs table, the parent run's files."""
    client, exp, parent = _tiny_store(tiny_run)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # 3.17's UI: the URL decides
    assert "workflowType=machine_learning" in exp.tags["mlflow.note.content"]
    ids = [exp.experiment_id]
    for name in tiny_run.cfg["methods"]:
        selected = client.search_runs(ids, filter_string=f"tags.method = '{name}'")
        assert len(selected) == len(tiny_run.cfg["seeds"]), name
        assert {r.data.tags["stage"] for r in selected} == {"distill"}, name
    (search,) = client.search_runs(ids, filter_string="tags.stage = 'search'")
    assert "method" not in search.data.tags
    assert search.data.params["search.beta_lr"] == "0.05" and "derive.tau" in search.data.params
    assert not [k for k in search.data.params if k.startswith(("distill.", "recipe.", "tracking."))]
    (teacher,) = client.search_runs(ids, filter_string="tags.stage = 'train'")
    assert not [k for k in teacher.data.params if k.startswith(("distill.", "search.", "teacher."))]
    for r in client.search_runs(ids, filter_string="tags.stage = 'distill'"):
        params = r.data.params
        assert not [k for k in params if k.startswith(("search.", "derive.", "tracking."))], r.info.run_name
        assert "teacher.sha256" in params and "distill.method" in params, r.info.run_name
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"settings.json", "result.json", "eval.json"} <= artifacts, r.info.run_name
        assert "eval_top1" in r.data.metrics
        if r.data.tags["method"] == "dfa":
            assert "aggregation.yaml" in artifacts
            assert any(k.startswith("distill.aggregation.g") for k in params), params  # the weights used
            assert any(k.startswith("distill.options.dfa.") for k in params), params  # resolved options
    parent_files = {a.path for a in client.list_artifacts(parent["run_id"])}
    assert {"config.yaml", "summary.md", "summary.csv", "summary.html", "plots"} <= parent_files
    plots = {a.path for a in client.list_artifacts(parent["run_id"], "plots")}
    assert plots == {"plots/accuracy.png", "plots/learning_curves.png"}
    config_dump = yaml.safe_load(
        Path(
            client.download_artifacts(parent["run_id"], "config.yaml", str(tiny_run.root / "dl"))
        ).read_text()
    )
    assert config_dump["experiment"] == "tiny" and "_report" not in config_dump
    tags = client.get_run(parent["run_id"]).data.tags
    assert "tiny_workflow.yaml" in tags["dfakd.configfiles"]


@pytest.mark.slow
def test_an_invocation_that_trains_nothing_adds_no_parent_run(tiny_run: TinyRun) -> None:
    client, exp, _ = _tiny_store(tiny_run)
    before = len(client.search_runs([exp.experiment_id], max_results=1000))
    proc = snakemake("--cores", "1", "--configfile", *tiny_run.configfiles, "--forcerun", "summary")
    assert proc.returncode == 0, output_of(proc)[-3000:]
    assert "summary" in job_stats(output_of(proc))
    assert len(client.search_runs([exp.experiment_id], max_results=1000)) == before


@pytest.mark.slow
def test_tiny_run_is_up_to_date(tiny_run: TinyRun) -> None:
    counts, _ = dry_run(*tiny_run.configfiles)
    assert counts == {}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "expected", "distilled"),
    [
        pytest.param(  # a student setting: only that student, its evaluation and what summarizes it
            {"methods": {"kd": {"options": {"kd": {"temperature": 2}}}}},
            {"distill": 1, "evaluate_student": 1, "summary": 1, "plots": 1, "all": 1},
            {"kd"},
            id="kd-temperature",
        ),
        pytest.param(  # a search setting: the search, its derivation and the DFA student only
            {"search": {"beta_lr": 0.01}},
            {"search": 1, "derive": 1, "distill": 1, "evaluate_student": 1}
            | {"summary": 1, "plots": 1, "all": 1},
            {"dfa"},
            id="search-beta-lr",
        ),
    ],
)
def test_a_changed_setting_reruns_only_what_depends_on_it(
    tiny_run: TinyRun, tmp_path: Path, change: dict, expected: dict, distilled: set
) -> None:
    counts, text = dry_run(*tiny_run.configfiles, write_yaml(tmp_path / "change.yaml", change))
    assert counts == expected
    assert {re.search(r"method=(\S+?),", w).group(1) for w in planned_wildcards(text, "distill")} == distilled
    assert "params" in text.lower()  # the reason: Snakemake's params-change rerun trigger


#: how jobs run, not what they compute: dfakd's run-only keys (config.RUN_ONLY_KEYS, tracking), set where a
#: user sets them (job:, datasets.<d>.download, tracking:), and the resources
RUN_ONLY_CHANGE = {
    "job": {
        "runtime": {
            "device": "cpu", "log_every": 3, "channels_last": False, "eval_batch_size": 100,
            "compile": False, "deterministic": True, "finite_check_every": 2,
        },
        "tracking": {"retries": 1, "tags": {"who": "tester"}},
    },
    "datasets": {"mnist5k": {"download": True}},
    "tracking": {"enabled": False},
    "resources": {"default": {"threads": 2}},
}  # fmt: skip


@pytest.mark.slow
def test_a_run_only_change_reruns_nothing(tiny_run: TinyRun, tmp_path: Path) -> None:
    """They reach the jobs in `params.run`, which Snakemake's params trigger does not compare: nothing is
    planned, as `dfakd` by hand would retrain nothing (what a rerun job receives: the next test)."""
    counts, text = dry_run(*tiny_run.configfiles, write_yaml(tmp_path / "run_only.yaml", RUN_ONLY_CHANGE))
    assert counts == {}, text[-3000:]
    assert "Nothing to be done" in text


def _first_row(path: Path) -> dict[str, str]:
    import csv

    with open(path) as f:
        return next(csv.DictReader(f))


@pytest.mark.slow
def test_a_rerun_trains_with_the_changed_values(tiny_run: TinyRun, tmp_path: Path) -> None:
    """Not the plan: what the rerun jobs trained. A method option and a recipe value of the KD student and
    a search value change; then --forcerun of the unchanged vanilla student. Every rerun job trains
    afresh with the new value, its earlier run set aside under superseded/. (Runs after every other test
    of the tiny run: it changes the tiny run's results.)"""
    change = {
        "recipes": {"kd_recipe": {"epochs": 1, "batch_size": 128, "lr": 0.02, "schedule": "cosine"}},
        "methods": {"kd": {"recipe": "kd_recipe", "options": {"kd": {"weight": 0.5}}}},
        "search": {"beta_lr": 0.01},
        "job": {"runtime": {"log_every": 3}},  # run-only: reruns nothing, but what reruns runs with it
    }
    configfiles = [*tiny_run.configfiles, write_yaml(tmp_path / "change.yaml", change)]
    proc = snakemake("--cores", "2", "--configfile", *configfiles, timeout=900)
    assert proc.returncode == 0, output_of(proc)[-6000:]
    students = {d.parent.name: d for d in tiny_run.student_dirs()}
    kd = students["kd"]
    assert float(_first_row(kd / "metrics.csv")["lr"]) == 0.02
    assert yaml.safe_load((kd / "config.yaml").read_text())["distill"]["options"] == {"kd": {"weight": 0.5}}
    (old_kd,) = (kd / "superseded").iterdir()
    assert float(_first_row(old_kd / "metrics.csv")["lr"]) == 0.05
    logs = tiny_run.out / "logs"
    kd_log = next((logs / "distill").rglob("kd/s0.log")).read_text()
    assert "settings changed since" in kd_log and "distill.options.kd.weight 0.9 -> 0.5" in kd_log

    (search_dir,) = (tiny_run.out / "search").glob("*/*/*/s0")
    search_log = next((logs / "search").rglob("s0.log")).read_text()
    assert "search.beta_lr 0.05 -> 0.01" in search_log and "resuming" not in search_log
    (old_search,) = (search_dir / "superseded").iterdir()
    alpha_key = next(k for k in _first_row(search_dir / "search_metrics.csv") if k.startswith("alpha."))
    assert (
        _first_row(search_dir / "search_metrics.csv")[alpha_key]
        != _first_row(old_search / "search_metrics.csv")[alpha_key]
    )
    assert (students["dfa"] / "superseded").is_dir()  # a new aggregation: the DFA student retrained
    assert not (students["vanilla"] / "superseded").exists() and not (students["ofd"] / "superseded").exists()
    for run_dir in (kd, search_dir, students["dfa"]):  # params.run reached the jobs that reran
        runtime = yaml.safe_load((run_dir / "config.yaml").read_text())["runtime"]
        assert runtime["log_every"] == 3 and runtime["threads"] >= 1, run_dir
    assert yaml.safe_load((students["ofd"] / "config.yaml").read_text())["runtime"]["log_every"] == 50

    vanilla_result = students["vanilla"] / "result.json"
    forced = snakemake(
        "--cores", "2", "--configfile", *configfiles, "--forcerun", vanilla_result, timeout=900
    )
    assert forced.returncode == 0, output_of(forced)[-6000:]
    vanilla_log = next((logs / "distill").rglob("vanilla/s0.log")).read_text()
    assert "finished run whose outputs are gone" in vanilla_log and "epoch 1/1" in vanilla_log
    assert len(list((students["vanilla"] / "superseded").iterdir())) == 1

    # MLflow shows each job once under tags.dfakd.current = 'true'; the set-aside runs are 'false'
    client, exp, _ = _tiny_store(tiny_run)
    current = "tags.dfakd.current = 'true'"
    for name in tiny_run.cfg["methods"]:
        selected = client.search_runs(
            [exp.experiment_id], filter_string=f"{current} and tags.method = '{name}'"
        )
        assert len(selected) == 1, name
        assert (
            selected[0].info.run_id == json.loads((students[name] / "mlflow_run.json").read_text())["run_id"]
        )
    old_run = json.loads((old_kd / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(old_run).data.tags["dfakd.current"] == "false"
    assert client.get_run(old_run).data.params["distill.options.kd.weight"] == "0.9"


# --------------------------------- a user's own data, a space in results_dir, MLflow down, kill -9


RECOVER = ["bash", "scripts/recover_lock.sh"]  # what scripts/demo.sh runs first


def free_port() -> int:
    """A port that nothing listens on (bound once by the OS, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnDataRun:
    """A small DAG on a user's own data, run for real once: an `imagefolder` dataset (3 classes of 32x32
    PNGs; a teacher, a search, vanilla and DFA students), ``results_dir`` with a space, MLflow down
    (``MLFLOW_TRACKING_URI`` at a closed port). The first ``snakemake`` is killed (SIGKILL, with its jobs)
    while the teacher trains; then README's recovery: ``scripts/recover_lock.sh`` (what demo.sh runs first)
    and a plain rerun. A later test adds a `cinic10` dataset (its 10 classes, a few images each)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.results = root / "with space" / "results"
        write_imagefolder(root / "imgs", n_classes=3, n_train=16, n_test=6)
        self.cfg = {
            "experiment": "own",
            "results_dir": str(self.results),
            "datasets": {
                "imgs": {"name": "imagefolder", "root": str(root / "imgs")},
            },
            "recipes": {
                "teacher": {"epochs": 4, "batch_size": 16, "lr": 0.05},
                "student": {"epochs": 1, "batch_size": 16, "lr": 0.05},
            },
            "teachers": {
                "t20": {"arch": "resnet20", "dataset": "imgs", "recipe": "teacher"},
            },
            "pairs": [{"teacher": "t20", "student": "resnet8", "recipe": "student"}],
            "methods": {"vanilla": {"method": "vanilla"}, "dfa": {"method": "dfa", "aggregation": "prune"}},
            "seeds": [0],
            "search": {"epochs": 1, "batch_size": 16},
            "job": {
                "runtime": {"device": "cpu", "eval_batch_size": 64, "log_every": 1},
                "tracking": {"retries": 0, "backoff_s": 0},
            },
        }
        self.configfile = write_yaml(root / "own.yaml", self.cfg)
        self.out = self.results / "own"
        self.env = {**_env(), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
        self.teacher_dir = self.out / "teachers/imgs/t20/s0"

    def snakemake(self, *args: str, overlay: Path | None = None, env: dict | None = None) -> Any:
        files = [self.configfile] + ([overlay] if overlay else [])
        return subprocess.run(
            [sys.executable, "-m", "snakemake", *map(str, args), "--configfile", *files],
            cwd=REPO, env=env or self.env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip


@pytest.fixture(scope="module")
def own_run(tmp_path_factory: pytest.TempPathFactory) -> OwnDataRun:
    run = OwnDataRun(tmp_path_factory.mktemp("own_data"))
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", str(run.configfile)]
    first = subprocess.Popen(
        cmd, cwd=REPO, env=run.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not (run.teacher_dir / "checkpoint.pt").is_file():  # the teacher's first epoch is done
        assert first.poll() is None, first.stdout.read().decode()[-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)  # snakemake and its jobs, as a crashed machine
    first.wait()
    run.first_output = first.stdout.read().decode()
    run.killed_mid_job = not (run.teacher_dir / "result.json").exists()
    run.locked = run.snakemake("--cores", "2")  # the lock outlived its snakemake
    run.recovery = subprocess.run(RECOVER, cwd=REPO, env=run.env, capture_output=True, text=True, timeout=120)
    run.rerun = run.snakemake("--cores", "2")
    (run.root / "snakemake.log").write_text(run.first_output + output_of(run.locked) + output_of(run.rerun))
    assert run.rerun.returncode == 0, output_of(run.rerun)[-6000:]
    return run


@pytest.mark.slow
def test_own_data_with_mlflow_down_and_a_space_runs_to_its_summary(own_run: OwnDataRun) -> None:
    out = own_run.out
    md = (out / "summary.md").read_text()
    assert all(f"| {m} |" in md for m in own_run.cfg["methods"])
    assert len(list((out / "students/imgs").glob("*/*/*/s0/eval.json"))) == 2
    assert json.loads((own_run.teacher_dir / "eval.json").read_text())["n"] == 18  # 3 classes x 6
    # MLflow down: the pipeline started with one warning line, no parent run, every job trained offline
    text = output_of(own_run.rerun)
    assert len(re.findall(r"warning: MLflow at http://127\.0\.0\.1:\d+ unreachable", text)) == 1, text[-3000:]
    assert "Traceback" not in text
    parent = json.loads((out / "mlflow_parent_run.json").read_text())
    assert parent["run_id"] is None and parent["offline"] is True
    for run_file in out.rglob("mlflow_run.json"):
        info = json.loads(run_file.read_text())
        assert info["run_id"] is None and "mlflow.parentRunId" not in info["tags"], run_file
    # every path was one argument: nothing was written beside results/ or into the repository
    assert sorted(os.listdir(own_run.root)) == ["imgs", "own.yaml", "snakemake.log", "with space"]
    assert os.listdir(own_run.root / "with space") == ["results"]
    assert not any((REPO / name).exists() for name in ("space", "with"))


@pytest.mark.slow
def test_after_kill_9_the_documented_recovery_resumes_the_killed_job(own_run: OwnDataRun) -> None:
    assert own_run.killed_mid_job, own_run.first_output[-3000:]
    assert own_run.locked.returncode != 0 and "Directory cannot be locked" in output_of(own_run.locked)
    assert own_run.recovery.returncode == 0, output_of(own_run.recovery)
    assert "stale Snakemake lock" in own_run.recovery.stdout
    log = (own_run.out / "logs/train_teacher/imgs/t20/s0.log").read_text()
    assert re.search(r"resuming from .*checkpoint\.pt after epoch [1-3] of 4 epochs", log), log[-2000:]
    result = json.loads((own_run.teacher_dir / "result.json").read_text())
    assert result["epochs"] == 4


@pytest.mark.slow
def test_recover_lock_leaves_a_live_run_alone(tmp_path: Path) -> None:
    """A lock held by a running snakemake in this directory is not removed: the run here is held in its
    onstart hook by an MLflow server that accepts connections and never answers."""
    locks = REPO / ".snakemake" / "locks"
    if locks.is_dir() and any(locks.iterdir()):
        pytest.skip("a snakemake run holds a lock in the repository")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        env = {**_env(), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{silent.getsockname()[1]}"}
        env["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "120"
        cfg = _valid(tmp_path)
        cfg["datasets"]["c100"]["download"] = True  # else the run stops at once: a dataset to fetch by hand
        configfile = write_yaml(tmp_path / "v.yaml", cfg)
        holder = subprocess.Popen(
            [sys.executable, "-m", "snakemake", "--cores", "1", "--configfile", configfile],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not (locks.is_dir() and any(locks.iterdir())):
                assert holder.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            proc = subprocess.run(RECOVER, cwd=REPO, env=_env(), capture_output=True, text=True)
            assert proc.returncode == 0 and "not unlocking" in proc.stderr, output_of(proc)
            assert any(locks.iterdir())
        finally:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait()
    proc = subprocess.run(RECOVER, cwd=REPO, env=_env(), capture_output=True, text=True)
    assert "stale Snakemake lock" in proc.stdout, output_of(proc)  # now that it is gone
    assert not (locks.is_dir() and any(locks.iterdir()))


@pytest.mark.slow
def test_cinic10_and_a_corrupt_mlflow_db_then_sync_mlflow(own_run: OwnDataRun, tmp_path: Path) -> None:
    """The experiment grows by a `cinic10` pair while the default store (no MLFLOW_TRACKING_URI) is a
    garbage mlflow.db; then `dfakd sync-mlflow` sends every job's run to a working store."""
    from mlflow.tracking import MlflowClient

    (own_run.out / "mlflow.db").write_bytes(os.urandom(4096))
    write_imagefolder(tmp_path / "cinic", n_classes=10, n_train=2, n_test=1, seed=1)
    pairs = [*own_run.cfg["pairs"], {"teacher": "t8", "student": "resnet8", "recipe": "student"}]
    pairs[1]["methods"] = ["vanilla"]
    grown = {
        "datasets": {"cin": {"name": "cinic10", "root": str(tmp_path / "cinic")}},
        "teachers": {"t8": {"arch": "resnet8", "dataset": "cin", "recipe": "student"}},
        "pairs": pairs,
    }
    proc = own_run.snakemake("--cores", "2", overlay=write_yaml(tmp_path / "grown.yaml", grown), env=_env())
    text = output_of(proc)
    assert proc.returncode == 0, text[-4000:]
    rules = ("prepare_data", "train_teacher", "evaluate_teacher", "distill", "evaluate_student")
    assert job_stats(text) == dict.fromkeys((*rules, "summary", "plots", "all"), 1)  # the new pair's jobs
    assert len(re.findall(r"warning: MLflow at sqlite:.* unreachable", text)) == 1, text[-3000:]
    assert "Traceback" not in text and "warning: parent run" not in text
    assert json.loads((own_run.out / "mlflow_parent_run.json").read_text())["run_id"] is None
    cin = own_run.out / "students/cin/t8/resnet8/vanilla/s0"
    assert json.loads((cin / "mlflow_run.json").read_text())["uri"].startswith("sqlite:")
    assert json.loads((own_run.out / "teachers/cin/t8/s0/eval.json").read_text())["n"] == 10  # 10 classes x 1
    assert "| vanilla |" in (own_run.out / "summary.md").read_text()
    # later, to a working store: every job's run, with its metrics, FINISHED
    store = f"sqlite:///{tmp_path / 'later.db'}"
    synced = run_cli("sync-mlflow", own_run.results, "--uri", store, cwd=tmp_path, timeout=300)
    assert synced.returncode == 0, output_of(synced)[-3000:]
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("own").experiment_id], max_results=100)
    stages = sorted(r.data.tags["stage"] for r in runs)
    assert stages == ["distill"] * 3 + ["search"] + ["train"] * 2
    assert all(r.info.status == "FINISHED" and r.data.metrics for r in runs)


def test_method_options_are_checked_when_the_workflow_is_planned(tmp_path: Path) -> None:
    cfg = _valid(tmp_path)
    cfg["methods"] = {"kd": {"method": "kd", "options": {"kd": {"weight": "heavy"}}}}
    proc = snakemake("-n", "--configfile", write_yaml(tmp_path / "bad.yaml", cfg))
    text = output_of(proc)
    assert proc.returncode != 0
    assert "methods.kd.options.kd" in text, text[-3000:]
    assert "Job stats" not in text


def test_a_dataset_fetched_by_hand_is_named_at_plan_time(tmp_path: Path) -> None:
    """CINIC-10 (and CIFAR without download: true) must be fetched by hand: a dry run names the archive,
    where to get it and the folder to unpack it into; a real run stops before any job, writing nothing."""
    cfg = _valid(tmp_path)
    cfg["datasets"] = {"cin": {"name": "cinic10", "root": str(tmp_path / "cinic")}}
    cfg["teachers"]["t20"]["dataset"] = "cin"
    configfile = write_yaml(tmp_path / "cin.yaml", cfg)
    planned = snakemake("-n", "--configfile", configfile)
    text = output_of(planned)
    assert planned.returncode == 0, text[-3000:]
    assert (
        "CINIC-10.tar.gz" in text and "https://datashare.ed.ac.uk" in text and str(tmp_path / "cinic") in text
    )
    real = snakemake("--cores", "1", "--configfile", configfile)
    text = output_of(real)
    assert real.returncode != 0 and "CINIC-10.tar.gz" in text and "unpack it into" in text, text[-3000:]
    assert not (tmp_path / "results").exists()
