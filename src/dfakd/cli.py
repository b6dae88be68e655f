"""The ``dfakd`` command line. Every pipeline step is a verb here, so that it also runs by hand."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from dfakd import __version__
from dfakd.errors import DfakdError

#: set to 1 to see the traceback of an unexpected error instead of its one-line summary
DEBUG_ENV = "DFAKD_DEBUG"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        metavar="YAML",
        help="job config file(s), merged in order over the defaults (repeatable)",
    )
    p.add_argument(
        "--config-json",
        action="append",
        default=[],
        metavar="JSON",
        help="a job config as a JSON object, merged after the YAML files (used by the workflow)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override one key, e.g. --set recipe.epochs=5 (value parsed as YAML; repeatable)",
    )
    p.add_argument(
        "--parent-run-file",
        metavar="JSON",
        help="nest the MLflow run under the run in this file (from `dfakd tracking-init`), in its store",
    )


def _add_retrain_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--retrain",
        action="store_true",
        help="train afresh even if the run folder holds a finished run (set aside under superseded/)",
    )


def _load_cfg(args: argparse.Namespace) -> dict:
    from dfakd import config
    from dfakd.files import read_json

    cfg = config.load(args.config, args.overrides, json_configs=args.config_json)
    if args.parent_run_file and Path(args.parent_run_file).is_file():
        # the pipeline's parent run names the store every job of the invocation logs to
        parent = read_json(args.parent_run_file, "parent run file")
        # the parent run is created by the first job that trains (none: offline, the job runs on its own)
        cfg["tracking"]["parent_run_file"] = str(args.parent_run_file)
        cfg["tracking"]["uri"] = cfg["tracking"]["uri"] or parent.get("uri")
    return cfg


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from dfakd.data.prepare import prepare

    prepare(args.dataset, args.root, download=args.download, force=args.force)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dfakd import jobs

    result = jobs.train(_load_cfg(args), args.out, args.retrain)
    print(json.dumps({k: result[k] for k in ("arch", "best_acc1", "last_acc1", "best_epoch")}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dfakd import jobs

    result = jobs.evaluate_checkpoint(_load_cfg(args), args.checkpoint, args.out)
    print(
        f"{result['arch']} on {result['dataset']} test: top-1 {result['top1']:.2f}%, "
        f"top-5 {result['top5']:.2f}%, loss {result['loss']:.4f} ({result['n']} images)"
    )
    return 0


def cmd_import_teacher(args: argparse.Namespace) -> int:
    from dfakd import jobs

    info = jobs.import_teacher(args.checkpoint, args.arch, args.num_classes, args.out, args.sha256)
    print(f"imported {info['arch']} ({info['parameters']:,} parameters) -> {info['out']}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from dfakd.jobs import search

    result = search(_load_cfg(args), args.out, args.retrain)
    for g in result["groups"]:
        print(
            f"{g['spatial']}px: "
            + ", ".join(f"{n}={a:.3f}" for n, a in zip(g["layers"], g["alpha"], strict=True))
        )
    return 0


def cmd_derive(args: argparse.Namespace) -> int:
    from dfakd.jobs import derive

    if args.mode:
        args.overrides.append(f"derive.mode={args.mode}")
    agg = derive(_load_cfg(args), args.search, args.out)
    for g in agg.groups:
        print(f"{g.spatial}px: " + ", ".join(f"{n}={w:.3f}" for n, w in g.layers.items()))
    print(f"wrote {args.out} ({agg.mode})")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from dfakd.jobs import distill

    if args.method:
        args.overrides.append(f"distill.method={args.method}")
    if args.aggregation:
        args.overrides.append(f"distill.aggregation={args.aggregation}")
    if args.teacher:
        args.overrides.append(f"teacher.checkpoint={args.teacher}")
    result = distill(_load_cfg(args), args.out, args.retrain)
    print(json.dumps({k: result[k] for k in ("arch", "method", "best_acc1", "last_acc1", "best_epoch")}))
    return 0


def _teacher_map(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        key, _, path = item.partition("=")
        if not path:
            raise DfakdError(f"--teacher expects DATASET/TEACHER=RESULT_JSON, got {item!r}")
        out[key] = Path(path)
    return out


def cmd_summarize(args: argparse.Namespace) -> int:
    from dfakd import summary

    published = json.loads(args.published_json) if args.published_json else {}
    rows = summary.summarize(
        [Path(p) for p in args.students],
        _teacher_map(args.teacher),
        published,
        Path(args.csv),
        Path(args.md),
        args.title,
        Path(args.html) if args.html else None,
        args.note,
    )
    wrote = ", ".join(str(p) for p in (args.csv, args.md, args.html) if p)
    print(f"wrote {wrote} ({len(rows)} rows)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from dfakd import summary

    rows = summary.collect([Path(p) for p in args.students], _teacher_map(args.teacher))
    summary.plot_accuracy(rows, Path(args.accuracy))
    summary.plot_learning_curves([Path(p) for p in args.students], Path(args.curves))
    print(f"wrote {args.accuracy} and {args.curves}")
    return 0


def cmd_tracking_init(args: argparse.Namespace) -> int:
    from dfakd import tracking

    tags = dict(_key_values(args.tag, "--tag"))
    info = tracking.start_pipeline_run(
        args.uri, args.experiment, args.results_dir, args.run_file, args.name, tags
    )
    if info.get("offline"):
        print(
            f"dfakd tracking-init: warning: MLflow at {info['uri']} unreachable ({info['error']}); the jobs "
            f"train offline, `dfakd sync-mlflow {shlex.quote(args.results_dir)}` sends their runs later",
            file=sys.stderr,
        )
        return 0
    print(
        f"MLflow experiment {args.experiment} in {info['uri']}; the first job that trains opens the "
        "parent run of this invocation"
    )
    return 0


def _key_values(items: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DfakdError(f"{flag} expects KEY=VALUE, got {item!r}")
        out.append((key, value))
    return out


def cmd_tracking_finish(args: argparse.Namespace) -> int:
    from dfakd import tracking

    artifacts = [(p, None) for p in args.artifact] + [(p, "plots") for p in args.plot]
    problem = tracking.finish_pipeline_run(args.run_file, args.status, artifacts)
    if problem:
        print(f"dfakd tracking-finish: warning: parent run not closed: {problem}", file=sys.stderr)
    return 0


def cmd_sync_mlflow(args: argparse.Namespace) -> int:
    from dfakd import tracking

    if not Path(args.results_dir).is_dir():
        raise DfakdError(f"results folder not found: {args.results_dir}")
    synced = tracking.sync_results(args.results_dir, args.uri)
    failed = [(d, r) for d, r in synced if isinstance(r, Exception)]
    for run_dir, outcome in synced:
        print(
            f"{run_dir}: " + (f"FAILED ({outcome})" if isinstance(outcome, Exception) else f"run {outcome}")
        )
    print(f"synced {len(synced) - len(failed)} of {len(synced)} job folder(s) under {args.results_dir}")
    return 2 if failed else 0


def cmd_relocate_mlflow(args: argparse.Namespace) -> int:
    from dfakd import tracking

    if not Path(args.results_dir).is_dir():
        raise DfakdError(f"results folder not found: {args.results_dir}")
    experiments, files = tracking.relocate(args.results_dir)
    print(
        f"{args.results_dir}: {experiments} experiment(s) of mlflow.db and {files} run file(s) now point "
        "into this folder" + (" (nothing to change)" if not experiments and not files else "")
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from dfakd import models

    for name in models.available():
        if args.groups:
            net = models.build(name, args.num_classes)
            groups = "; ".join(
                f"{g.spatial}px x{g.channels}: {', '.join(g.names)}" for g in net.describe_groups(32)
            )
            print(f"{name}: {groups}")
        else:
            print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfakd",
        description="Differentiable Feature Aggregation search for Knowledge Distillation (DFA, ECCV 2020).",
    )
    parser.add_argument("--version", action="version", version=f"dfakd {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    p = sub.add_parser("prepare-data", help="write a demo dataset, check/download CIFAR, check ImageFolder")
    p.add_argument(
        "dataset", choices=["mnist5k", "mnist5k-cluttered", "cifar10", "cifar100", "cinic10", "imagefolder"]
    )
    p.add_argument("--root", required=True, help="dataset folder")
    p.add_argument("--download", action="store_true", help="download CIFAR with torchvision (needs internet)")
    p.add_argument("--force", action="store_true", help="rewrite a demo dataset even if complete")
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("train", help="train a model with cross-entropy (teacher, vanilla student)")
    _add_config_args(p)
    p.add_argument("-o", "--out", required=True, help="run folder (resumes from its checkpoint.pt)")
    _add_retrain_arg(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="top-1/top-5/loss of a saved model on the test split")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="a best.pt / last.pt / imported teacher file")
    p.add_argument("-o", "--out", help="write the metrics as JSON here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("import-teacher", help="load a community checkpoint ({'model': state_dict}) strictly")
    p.add_argument(
        "checkpoint", help="the .pth file, e.g. RepDistiller's resnet32x4_vanilla/ckpt_epoch_240.pth"
    )
    p.add_argument("--arch", required=True, help="zoo name, e.g. resnet32x4")
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--out", required=True, help="where to write the teacher in our layout")
    p.add_argument("--sha256", help="refuse the file unless its sha256 matches")
    p.set_defaults(func=cmd_import_teacher)

    p = sub.add_parser("search", help="stage 1: differentiable aggregation search with the bridge loss")
    _add_config_args(p)
    p.add_argument("-o", "--out", required=True, help="run folder (search.json, alpha trajectory, plots)")
    _add_retrain_arg(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("derive", help="search result -> discrete aggregation file (or a fixed baseline)")
    _add_config_args(p)
    p.add_argument("--search", help="search.json from `dfakd search` (not needed for last/average/random)")
    p.add_argument("--mode", help="prune | argmax | topk | full | last | average | random (derive.mode)")
    p.add_argument("-o", "--out", required=True, help="aggregation YAML to write")
    p.set_defaults(func=cmd_derive)

    p = sub.add_parser("distill", help="stage 2: train a student with CE + distillation method(s)")
    _add_config_args(p)
    p.add_argument("--method", help="dfa, ofd, kd, fitnet, at, dkd, vanilla, or a sum like dfa+kd")
    p.add_argument("--aggregation", help="aggregation file for dfa (distill.aggregation)")
    p.add_argument("--teacher", help="teacher checkpoint (teacher.checkpoint)")
    p.add_argument("-o", "--out", required=True, help="run folder (resumes from its checkpoint.pt)")
    _add_retrain_arg(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("summarize", help="summary.csv / summary.md over students' result.json files")
    p.add_argument(
        "students", nargs="+", help=".../students/<dataset>/<teacher>/<student>/<method>/s<seed>/result.json"
    )
    p.add_argument(
        "--teacher",
        action="append",
        default=[],
        metavar="DATASET/TEACHER=JSON",
        help="teacher result.json (trained) or evaluation JSON (imported)",
    )
    p.add_argument("--published-json", help="published reference numbers per 'dataset/teacher/student'")
    p.add_argument("--title", default="dfakd summary")
    p.add_argument("--csv", required=True)
    p.add_argument("--md", required=True)
    p.add_argument("--html", help="also the summary as an HTML page (shown inline in a Snakemake report)")
    p.add_argument("--note", action="append", default=[], help="a line above the HTML tables (repeatable)")
    p.set_defaults(func=cmd_summarize)

    p = sub.add_parser("plot", help="accuracy per pair and method, and learning curves")
    p.add_argument("students", nargs="+", help="students' result.json files (metrics.csv beside them)")
    p.add_argument("--teacher", action="append", default=[], metavar="DATASET/TEACHER=JSON")
    p.add_argument("--accuracy", required=True, help="PNG: accuracy per pair and method")
    p.add_argument("--curves", required=True, help="PNG: learning curves")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("tracking-init", help="create the MLflow store/experiment and a pipeline parent run")
    p.add_argument("--experiment", required=True)
    p.add_argument("--results-dir", required=True, help="where a default SQLite store lives")
    p.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI, else SQLite in --results-dir)")
    p.add_argument("--run-file", required=True, help="JSON file receiving the parent run id")
    p.add_argument("--name", default="pipeline", help="parent run name")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="a parent run tag")
    p.set_defaults(func=cmd_tracking_init)

    p = sub.add_parser("tracking-finish", help="log the pipeline's files to its parent run and close it")
    p.add_argument("--run-file", required=True)
    p.add_argument("--status", default="FINISHED", choices=["FINISHED", "FAILED", "KILLED"])
    p.add_argument("--artifact", action="append", default=[], metavar="PATH", help="a file to log (repeated)")
    p.add_argument("--plot", action="append", default=[], metavar="PATH", help="a figure to log under plots/")
    p.set_defaults(func=cmd_tracking_finish)

    p = sub.add_parser(
        "relocate-mlflow", help="after copying or moving a results folder: its default store's artifacts here"
    )
    p.add_argument("results_dir", help="the copied or moved <results_dir>/<experiment> (holding mlflow.db)")
    p.set_defaults(func=cmd_relocate_mlflow)

    p = sub.add_parser("sync-mlflow", help="(re)build the MLflow runs of every job from its results files")
    p.add_argument("results_dir", help="a results folder (searched recursively for jobs' mlflow_run.json)")
    p.add_argument("--uri", help="send to this tracking URI instead of the one each job used")
    p.set_defaults(func=cmd_sync_mlflow)

    p = sub.add_parser("models", help="list the model zoo")
    p.add_argument("--groups", action="store_true", help="also show layer groups and candidate names")
    p.add_argument("--num-classes", type=int, default=100)
    p.set_defaults(func=cmd_models)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb in ("train", "search", "distill", "evaluate"):
        from dfakd import gpu_pool

        gpu_pool.claim()
    from dfakd.training.preemption import EXIT_CODE, Preempted

    try:
        return int(args.func(args) or 0)
    except Preempted as exc:
        print(f"dfakd {args.verb}: stopped: {exc}", file=sys.stderr)
        return EXIT_CODE
    except DfakdError as exc:
        print(f"dfakd {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dfakd {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last resort: one line, unless the debug switch asks for the traceback
        if os.environ.get(DEBUG_ENV):
            raise
        text = " ".join(str(exc).split()) or "(no message)"
        print(
            f"dfakd {args.verb}: error: unexpected {type(exc).__name__}: {text[:500]} "
            f"(set {DEBUG_ENV}=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
