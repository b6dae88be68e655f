import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from dfakd import config as job_config_mod
from dfakd import models as zoo
from dfakd.errors import DfakdError
from dfakd.methods import METHODS, parse_method

SEARCHED_MODES = ("prune", "argmax", "topk", "full")
FIXED_MODES = ("last", "average", "random")

EXP = config["experiment"]
OUT = f"{config.get('results_dir', 'results')}/{EXP}"
PARENT_RUN_FILE = f"{OUT}/mlflow_parent_run.json"
SEEDS = config["seeds"]
SEARCH_SEEDS = config.get("search_seeds", [0])
# named overrides of `search` (e.g. the ablations of the search itself); a method picks one with
# `search_variant`, and its searches and aggregations live under "<variant>-s<seed>" beside the default's
SEARCH_VARIANTS = config.get("search_variants", {})


wildcard_constraints:
    dataset=r"[A-Za-z0-9_]+",
    teacher=r"[A-Za-z0-9_][A-Za-z0-9_.]*",
    student=r"[A-Za-z0-9_][A-Za-z0-9_.]*",
    method=r"[A-Za-z0-9_][A-Za-z0-9_.+-]*",
    mode=r"prune|argmax|topk|full|last|average|random",
    seed=r"[0-9]+",
    sseed=r"[0-9]+",
    tseed=r"[0-9]+",
    variant=r"([A-Za-z0-9_]+-)?",


def fail(message):
    raise WorkflowError(f"config error: {message}")


def teacher_def(teacher):
    return config["teachers"][teacher]


def teacher_dataset(teacher):
    return teacher_def(teacher)["dataset"]


def dataset_classes(dataset):
    d = config["datasets"][dataset]
    from dfakd.data import dataset_info

    known = dataset_info(d["name"]).num_classes
    return known if known is not None else d["num_classes"]


def pair_def(dataset, teacher, student):
    for pair in config["pairs"]:
        if (
            pair["teacher"] == teacher
            and pair["student"] == student
            and teacher_dataset(teacher) == dataset
        ):
            return pair
    fail(f"no pair {teacher} -> {student} on {dataset}")


def search_seed_for(seed):
    """Distillation seed s uses search seed search_seeds[s mod len(search_seeds)]."""
    return SEARCH_SEEDS[SEEDS.index(int(seed)) % len(SEARCH_SEEDS)]


def resources_for(kind):
    merged = {
        **config.get("resources", {}).get("default", {}),
        **config.get("resources", {}).get(kind, {}),
    }
    return {
        "threads": merged.get("threads", 1),
        "mem_mb": merged.get("mem_mb", 4000),
        "runtime": merged.get("runtime", 60),
        "gpu": merged.get("gpu", 0),
    }


def tracking_section():
    section = {"experiment": EXP, **config.get("tracking", {})}
    return section


# What does not change a job's result stays out of the params Snakemake compares, so that changing it
# reruns nothing: a job's run-only keys (its threads, device, progress output, MLflow tracking: dfakd's
# `RUN_ONLY_KEYS` and `RUN_ONLY_SECTIONS`) reach it in the param `run` (see `run_only`), its GPU count through
# {resources.gpu}, the local GPU pool through {resources.gpu_pool} and {resources.gpu_slots} (jobs per GPU),
# the MLflow store through the parent run file. Snakemake's `--resources gpu=N*K` caps how many GPU jobs run
# at once.
LOCAL_GPUS = config.get("local_gpus", 0)
LOCAL_GPU_SLOTS = config.get("local_gpu_slots", 1)


def job_config(dataset, model, recipe=None, seed=0, extra=None):
    """The job config (merged by `dfakd` over its defaults) of one job (rule instance); its rule passes it
    as two params, what decides the result (`decides`) and how the job runs (`run_only`).
    """
    cfg = json.loads(json.dumps(config.get("job", {})))
    cfg["seed"] = int(seed)
    cfg["results_dir"] = OUT
    cfg["dataset"] = {**cfg.get("dataset", {}), **config["datasets"][dataset]}
    cfg["model"] = {"arch": model}
    if recipe is not None:
        cfg["recipe"] = {**cfg.get("recipe", {}), **config["recipes"][recipe]}
    cfg["tracking"] = {**cfg.get("tracking", {}), **tracking_section()}
    cfg["tracking"].pop("uri", None)  # MLFLOW_TRACKING_URI, above
    for key, value in (extra or {}).items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def as_json(cfg):
    return json.dumps(cfg, sort_keys=True)


def decides(job):
    """The param `job` of a rule: the part of the job config (``job(wildcards)``) that decides the result.
    Snakemake's params rerun trigger compares it: a change of it reruns the job."""
    return lambda wildcards: as_json(job_config_mod.split_run_only(job(wildcards))[0])


def run_only(job):
    """The param `run` of a rule: the part of the job config that changes how the job runs, with the job's
    thread count. Computed from the job's threads, it counts as a derived param, which Snakemake's params
    rerun trigger does not compare (it compares params not derived from input, output, threads or
    resources): a change of it reruns nothing, as `dfakd` by hand retrains nothing."""

    def run(wildcards, threads):
        cfg = job_config_mod.split_run_only(job(wildcards))[1]
        cfg["runtime"] = {**cfg.get("runtime", {}), "threads": threads}
        return as_json(cfg)

    return run


def teacher_job(teacher):
    t = teacher_def(teacher)
    return job_config(t["dataset"], t["arch"], t["recipe"], t.get("seed", 0))


def variant_prefix(method):
    """The path prefix of a method's search variant: "" for the default search, "<name>-" else."""
    name = config["methods"][method].get("search_variant")
    return f"{name}-" if name else ""


def search_job(dataset, teacher, student, sseed, variant=""):
    t = teacher_def(teacher)
    extra = {
        "teacher": {"arch": t["arch"]},
        "search": {**config.get("search", {}), **SEARCH_VARIANTS.get(variant[:-1], {})},
        "derive": config.get("derive", {}),
    }
    pair_def(dataset, teacher, student)  # the pair must exist
    # no recipe: the search trains with search.* alone, so a student recipe change does not rerun it
    return job_config(dataset, student, None, sseed, extra)


def derive_job(dataset, teacher, student, sseed, mode):
    """Searched modes: derive.* over search.json (an input: a new search reruns them). Fixed modes: the
    teacher's architecture and the seed (for `random`) alone."""
    extra = {"teacher": {"arch": teacher_def(teacher)["arch"]}}
    if mode in SEARCHED_MODES:
        extra["derive"] = config.get("derive", {})
    return job_config(dataset, student, None, sseed, extra)


def student_job(dataset, teacher, student, method, seed):
    m = config["methods"][method]
    distill = {
        "method": m["method"],
        "ce_weight": m.get("ce_weight", 1.0),
        "options": m.get("options", {}),
    }
    extra = {"teacher": {"arch": teacher_def(teacher)["arch"]}, "distill": distill}
    recipe = m.get("recipe", pair_def(dataset, teacher, student)["recipe"])
    cfg = job_config(dataset, student, recipe, seed, extra)
    # the MLflow tag `method` is the config's method name (dfa_average), `method_type` its kind (dfa);
    # tracking.* is operational: not in the job's settings, so it retrains nothing
    cfg["tracking"]["tags"] = {**cfg["tracking"].get("tags", {}), "method": method}
    return cfg


# the job config of a job of each rule (job_of_<rule>), from its wildcards


def job_of_train_teacher(w):
    return teacher_job(w.teacher)


def job_of_evaluate_teacher(w):
    return job_config(w.dataset, teacher_def(w.teacher)["arch"])


def job_of_search(w):
    return search_job(w.dataset, w.teacher, w.student, w.sseed, w.variant)


def job_of_derive(w):
    return derive_job(w.dataset, w.teacher, w.student, w.sseed, w.mode)


def job_of_distill(w):
    return student_job(w.dataset, w.teacher, w.student, w.method, w.seed)


def job_of_evaluate_student(w):
    return job_config(w.dataset, w.student)


# ---- paths ----------------------------------------------------------------------------------------


def teacher_dir(teacher):
    t = teacher_def(teacher)
    if t.get("checkpoint"):
        return f"{OUT}/teachers/{t['dataset']}/{teacher}/imported"
    return f"{OUT}/teachers/{t['dataset']}/{teacher}/s{t.get('seed', 0)}"


def teacher_checkpoint(wildcards):
    return f"{teacher_dir(wildcards.teacher)}/best.pt"


def aggregation_input(wildcards):
    m = config["methods"][wildcards.method]
    if m.get("aggregation_file"):
        return m["aggregation_file"]
    mode = m.get("aggregation")
    if mode is None:
        return []
    sseed = (
        search_seed_for(wildcards.seed) if mode in SEARCHED_MODES else wildcards.seed
    )
    variant = variant_prefix(wildcards.method) if mode in SEARCHED_MODES else ""
    return f"{OUT}/aggregations/{wildcards.dataset}/{wildcards.teacher}/{wildcards.student}/{variant}{mode}-s{sseed}.yaml"


def derive_search_input(wildcards):
    if wildcards.mode in FIXED_MODES:
        return []
    return f"{OUT}/search/{wildcards.dataset}/{wildcards.teacher}/{wildcards.student}/{wildcards.variant}s{wildcards.sseed}/search.json"


def student_dirs():
    for pair in config["pairs"]:
        dataset = teacher_dataset(pair["teacher"])
        for method in pair.get("methods", list(config["methods"])):
            for seed in SEEDS:
                yield f"{OUT}/students/{dataset}/{pair['teacher']}/{pair['student']}/{method}/s{seed}"


def student_results():
    return [f"{d}/result.json" for d in student_dirs()]


def student_evaluations():
    return [f"{d}/eval.json" for d in student_dirs()]


def teacher_evaluations():
    return {
        f"{teacher_dataset(p['teacher'])}/{p['teacher']}": f"{teacher_dir(p['teacher'])}/eval.json"
        for p in config["pairs"]
    }


def search_outputs():
    outs = []
    for pair in config["pairs"]:
        dataset = teacher_dataset(pair["teacher"])
        methods = pair.get("methods", list(config["methods"]))
        variants = {
            variant_prefix(m)
            for m in methods
            if config["methods"][m].get("aggregation") in SEARCHED_MODES
        }
        for variant in sorted(variants):
            for sseed in sorted({search_seed_for(s) for s in SEEDS}):
                outs.append(
                    f"{OUT}/search/{dataset}/{pair['teacher']}/{pair['student']}/{variant}s{sseed}/search.json"
                )
    return outs


def final_outputs():
    return [
        f"{OUT}/summary.csv",
        f"{OUT}/summary.md",
        f"{OUT}/summary.html",
        f"{OUT}/plots/accuracy.png",
        f"{OUT}/plots/learning_curves.png",
        *search_outputs(),
    ]


def option(flag, value):
    """``[flag, value]`` (nothing when value is empty): argv words that a rule's shell command gives as
    ``{params.x:q}``, which quotes each word, so that a path with a space stays one argument.
    """
    return [flag, str(value)] if value else []


def teacher_options():
    return [
        word
        for key, path in teacher_evaluations().items()
        for word in option("--teacher", f"{key}={path}")
    ]


def published_json():
    refs = {}
    for pair in config["pairs"]:
        if pair.get("published"):
            refs[
                f"{teacher_dataset(pair['teacher'])}/{pair['teacher']}/{pair['student']}"
            ] = pair["published"]
    return json.dumps(refs, sort_keys=True)


# ---- checks beyond the schema, before any job starts --------------------------------------------


def check_config():
    for tid, t in config["teachers"].items():
        if t["dataset"] not in config["datasets"]:
            fail(f"teachers.{tid}.dataset: unknown dataset {t['dataset']!r}")
        if not t.get("checkpoint") and t.get("recipe") not in config.get("recipes", {}):
            fail(
                f"teachers.{tid}.recipe: unknown recipe {t.get('recipe')!r} (a trained teacher needs one)"
            )
        if not zoo.is_available(t["arch"]):
            fail(f"teachers.{tid}.arch: unknown model {t['arch']!r}")
    for i, pair in enumerate(config["pairs"]):
        where = f"pairs[{i}]"
        if pair["teacher"] not in config["teachers"]:
            fail(
                f"{where}.teacher: unknown teacher {pair['teacher']!r}; defined: {', '.join(config['teachers'])}"
            )
        if not zoo.is_available(pair["student"]):
            fail(f"{where}.student: unknown model {pair['student']!r}")
        if pair["recipe"] not in config.get("recipes", {}):
            fail(f"{where}.recipe: unknown recipe {pair['recipe']!r}")
        for m in pair.get("methods", []):
            if m not in config["methods"]:
                fail(
                    f"{where}.methods: unknown method {m!r}; defined: {', '.join(config['methods'])}"
                )
    for name, m in config["methods"].items():
        try:
            kinds = parse_method(m["method"])
        except DfakdError as exc:
            fail(f"methods.{name}.method: {exc}")
        for mname, opts in (m.get("options") or {}).items():
            if mname not in METHODS:
                fail(f"methods.{name}.options: options for unknown method {mname!r}")
            try:
                METHODS[mname].resolve_options(opts)
            except DfakdError as exc:
                fail(f"methods.{name}.options.{mname}: {exc}")
        if "dfa" in kinds and not (m.get("aggregation") or m.get("aggregation_file")):
            fail(
                f"methods.{name}: dfa needs 'aggregation' (a derive mode) or 'aggregation_file'"
            )
        if m.get("recipe") and m["recipe"] not in config.get("recipes", {}):
            fail(f"methods.{name}.recipe: unknown recipe {m['recipe']!r}")
        variant = m.get("search_variant")
        if variant is not None:
            if variant not in SEARCH_VARIANTS:
                defined = ", ".join(SEARCH_VARIANTS) or "none"
                fail(
                    f"methods.{name}.search_variant: unknown search variant {variant!r}; defined: {defined}"
                )
            if m.get("aggregation") not in SEARCHED_MODES:
                fail(
                    f"methods.{name}.search_variant: only a dfa method with a searched aggregation "
                    f"({', '.join(SEARCHED_MODES)}) uses a search"
                )
    # every job config must load in dfakd (unknown recipe/search/job keys, bad values)
    jobs = [
        teacher_job(t) for t, d in config["teachers"].items() if not d.get("checkpoint")
    ]
    for pair in config["pairs"]:
        dataset = teacher_dataset(pair["teacher"])
        for variant in ["", *(f"{v}-" for v in SEARCH_VARIANTS)]:
            jobs.append(
                search_job(
                    dataset, pair["teacher"], pair["student"], SEARCH_SEEDS[0], variant
                )
            )
        for method in pair.get("methods", list(config["methods"])):
            jobs.append(
                student_job(dataset, pair["teacher"], pair["student"], method, SEEDS[0])
            )
    for cfg in jobs:
        try:
            job_config_mod.load(json_configs=[json.dumps(cfg)])
        except DfakdError as exc:
            fail(str(exc))


check_config()


# ---- datasets fetched by hand: named at plan time, refused before any job of a real run starts -----


def missing_datasets():
    from dfakd.data.datasets import missing_manual_dataset

    used = {teacher_dataset(p["teacher"]) for p in config["pairs"]}
    found = (missing_manual_dataset(config["datasets"][d]) for d in sorted(used))
    return [f"datasets.{d}: {m}" for d, m in zip(sorted(used), found) if m]


def other_checkout():
    """The warning when the dfakd this workflow imports (its jobs run in the same environment) is another
    source checkout's (a second clone's editable install): its jobs run that code."""
    repo = Path(workflow.basedir).parent
    own = repo / "src" / "dfakd"
    imported = Path(job_config_mod.__file__).resolve().parent
    if not own.is_dir() or imported == own.resolve():
        return None
    if not (imported.parents[1] / "workflow" / "Snakefile").is_file():
        return None  # an installed package, not another checkout
    return (
        f"this workflow is {repo} but imports dfakd from {imported}, another checkout: its jobs run that "
        f"code; run `pip install -e {repo}` or set PYTHONPATH={repo / 'src'} to run this checkout's"
    )


OTHER_CHECKOUT = other_checkout()
if OTHER_CHECKOUT:
    print(f"dfakd workflow: warning: {OTHER_CHECKOUT}", file=sys.stderr)


MISSING_DATASETS = missing_datasets()
for _message in MISSING_DATASETS:
    print(f"dfakd workflow: note: {_message}", file=sys.stderr)


def check_datasets_present():
    """Called first by onstart (a real run, never a dry run): stop before any job when a dataset that
    must be fetched by hand is missing."""
    if MISSING_DATASETS:
        fail("; ".join(MISSING_DATASETS))


def mlflow_location():
    """Where this invocation's MLflow runs go: tracking.uri, $MLFLOW_TRACKING_URI, else the results
    folder's SQLite store."""
    return (
        config.get("tracking", {}).get("uri")
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{Path(OUT).resolve()}/mlflow.db"
    )


# what the report's front page (report/workflow.rst, which sees the config alone) names; after validation
config["_report"] = {
    "configfiles": [str(f) for f in workflow.configfiles],
    "mlflow": mlflow_location(),
    "results": str(Path(OUT).resolve()),
}


# ---- MLflow: one parent run per pipeline invocation ------------------------------------------------


# Tracking never stops the pipeline: `dfakd tracking-init` writes a parent run file that says "offline"
# when the store is unreachable or broken (the jobs then train offline, `dfakd sync-mlflow` replays them);
# should it fail otherwise, the hook drops a stale parent run file and warns in one line. The hooks never raise.


def _tracking_cli(verb, *args):
    cmd = [sys.executable, "-m", "dfakd", verb, *args]
    try:
        return subprocess.run(cmd, check=False).returncode
    except OSError as exc:
        return str(exc)


def start_pipeline_run():
    tracking = config.get("tracking", {})
    if not tracking.get("enabled", True):
        return
    args = ["--experiment", EXP, "--results-dir", OUT, "--run-file", PARENT_RUN_FILE]
    args += ["--name", f"pipeline {EXP}"]
    configfiles = " ".join(str(f) for f in workflow.configfiles)
    args += ["--tag", f"dfakd.configfiles={configfiles}"]
    if tracking.get("uri"):
        args += ["--uri", tracking["uri"]]
    outcome = _tracking_cli("tracking-init", *args)
    if outcome != 0:
        Path(PARENT_RUN_FILE).unlink(missing_ok=True)
        print(
            f"dfakd workflow: warning: no MLflow parent run (dfakd tracking-init: {outcome}); "
            f"the jobs track on their own or offline (`dfakd sync-mlflow {shlex.quote(OUT)}` replays them)",
            file=sys.stderr,
        )


def finish_pipeline_run(status):
    """Close the parent run (if a job opened one) with the invocation's config, summary and plots."""
    if not (
        config.get("tracking", {}).get("enabled", True)
        and Path(PARENT_RUN_FILE).is_file()
    ):
        return
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "config.yaml"
        own = {k: v for k, v in config.items() if k != "_report"}
        dump.write_text(yaml.safe_dump(json.loads(json.dumps(own)), sort_keys=False))
        args = [
            "--run-file",
            PARENT_RUN_FILE,
            "--status",
            status,
            "--artifact",
            str(dump),
        ]
        for name in ("summary.md", "summary.csv", "summary.html"):
            args += ["--artifact", f"{OUT}/{name}"]
        for name in ("accuracy.png", "learning_curves.png"):
            args += ["--plot", f"{OUT}/plots/{name}"]
        _tracking_cli("tracking-finish", *args)
