"""MLflow tracking: the one module that talks to MLflow.

Results files are the source of truth; MLflow is the view over them. Each job logs its *settings* (what
decided its result: ``settings.json``, the flat dict its checkpoint stores) as parameters, per-epoch
metrics with ``step``, tags (stage, dataset, model, seed, the config's method name, provenance: git
commit, dfakd version, command line) and its result files as artifacts. The live run of a job is tagged
``dfakd.current=true``; the run of a job's earlier, set-aside (``superseded/``) files ``false``, so that the
filter ``tags.dfakd.current = 'true'`` shows each job once.

The store is ``tracking.uri`` from the config, else ``$MLFLOW_TRACKING_URI``, else an
embedded SQLite file ``<results_dir>/mlflow.db`` (nothing to start).

Tracking never stops training. Every call is retried with exponential backoff (``tracking.retries``,
``tracking.backoff_s``, ``tracking.timeout_s`` per HTTP request); when the store stays unreachable (a
server down or slow, SQLite locked) the job goes on *offline*, and what it could not send is replayed
from its results files as soon as a later call gets through, at the latest when the job ends. What is
still unsent then is left for ``dfakd sync-mlflow RESULTS_DIR``, which (re)builds every job's run from
its results files, idempotently. A job's ``mlflow_run.json`` holds what a replay needs (store, run id,
name, tags).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import os
import shlex
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dfakd import __version__
from dfakd import config as config_mod
from dfakd.files import atomic_write_json, atomic_write_text

RUN_FILE = "mlflow_run.json"
PARENT_RUN_FILE = "mlflow_parent_run.json"  # a workflow's parent run, in its results folder
SETTINGS_FILE = "settings.json"  # the job's settings (what decided its result): the run's params
METRIC_FILES = ("metrics.csv", "search_metrics.csv")
ARTIFACTS = (
    "config.yaml", "settings.json", "aggregation.yaml", "metrics.csv", "result.json", "eval.json",
    "search_metrics.csv", "search.json", "alpha_trajectory.csv", "alphas.png", "alpha_trajectory.png",
)  # fmt: skip
RESULT_FILES = ("result.json", "search.json")
EVAL_FILE = "eval.json"
SUPERSEDED = "superseded"  # the folder where a retrained job's earlier run is set aside
CURRENT_TAG = "dfakd.current"  # "true" on a job's live run, "false" on the runs of its superseded files
ARTIFACT_DIR = "mlartifacts"  # beside a default SQLite store
# The experiment kind MLflow's UI uses to choose its classic ML view over the GenAI one. The 3.17 UI reads
# no tag for that (its feature flag takes the view from the URL, else from the browser's remembered GenAI /
# Model training switch), so the address of the runs table carries the view too:
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
RUNS_VIEW = "workflowType=machine_learning"
_MAX_PARAM_LEN = 6000
_MAX_TAG_LEN = 5000


def default_uri(results_dir: str | Path) -> str:
    """The embedded SQLite store of a results folder."""
    return f"sqlite:///{Path(results_dir).resolve() / 'mlflow.db'}"


def resolve_uri(uri: str | None, results_dir: str | Path) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return default_uri(results_dir)


def _git(args: list[str], where: Path) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str, bool] | None:
    """(commit, dirty) of the git checkout that holds this package's source; None when there is none (no
    git, an installed wheel, a package folder that git ignores). Computed once per process."""
    here = Path(__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], here)
    if not commit or _git(["check-ignore", "-q", str(here)], here) is not None:
        return None
    status = _git(["status", "--porcelain", "--untracked-files=no"], here)
    return commit, bool(status)


def provenance_tags() -> dict[str, str]:
    """What made a run: the dfakd version, the command line, the git commit (and a dirty tree)."""
    tags = {
        "dfakd.version": __version__,
        "dfakd.command": shlex.join(sys.argv)[:_MAX_TAG_LEN],
        "mlflow.source.name": (sys.argv[0] or "dfakd")[:_MAX_TAG_LEN],
        "mlflow.source.type": "LOCAL",
    }
    state = git_state()
    if state is not None:
        commit, dirty = state
        tags |= {"dfakd.git_commit": commit, "mlflow.source.git.commit": commit}
        tags["dfakd.git_dirty"] = str(dirty).lower()
    return tags


def runs_url(experiment_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The address of an experiment's runs table in the MLflow UI served at ``ui``."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?{RUNS_VIEW}"


def experiment_note(name: str) -> str:
    return (
        f"dfakd experiment `{name}`. The runs table: click *Model training* (top left) or open "
        f"`#/experiments/<id>/runs?{RUNS_VIEW}`. One run per job (tag `stage`: train, search, distill; "
        "`pipeline` for the parent run of a workflow invocation, which holds its config, summary and "
        "plots). Results files are the source of truth, these runs the view. Filter "
        "`tags.dfakd.current = 'true'` to see each job once (a retrained job's earlier run is `false`), "
        "and `tags.method = 'NAME'` for the students of one configured method (`method_type` is its "
        "kind, e.g. `dfa`)."
    )


def tracking_uri(cfg: dict[str, Any]) -> str:
    return resolve_uri(cfg["tracking"]["uri"], cfg["results_dir"])


def _prepare_client_env(timeout_s: float) -> None:
    """Our own retries decide; MLflow's HTTP client would otherwise retry for minutes per call."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(1, timeout_s))))
    for name in ("alembic", "mlflow", "mlflow.store", "mlflow.tracking", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def with_retries(fn: Callable[[], Any], attempts: int, backoff_s: float) -> Any:
    """Call ``fn`` up to ``attempts`` times, sleeping ``backoff_s * 2**i`` between tries."""
    for i in range(attempts):
        try:
            return fn()
        except Exception:
            if i == attempts - 1:
                raise
            time.sleep(backoff_s * 2**i)
    return None


def ensure_experiment(uri: str, name: str, results_dir: str | Path) -> str:
    """Create the experiment (and, for SQLite, the store) if needed, with its kind and description tags;
    return its id. A default store of a results folder that was copied or moved is relocated first."""
    client = client_for(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        artifact_location = None
        if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
            artifact_location = (Path(results_dir).resolve() / ARTIFACT_DIR).as_uri()
        tags = {EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1], "mlflow.note.content": experiment_note(name)}
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags=tags)
        except Exception:  # another job created it between our lookup and create
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if uri == default_uri(results_dir):
        relocate_store(results_dir)
    if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:  # made by an older dfakd
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    if "mlflow.note.content" not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, "mlflow.note.content", experiment_note(name))
    return exp.experiment_id


# ---- a results folder that was copied or moved ------------------------------------------------------


def relocate_store(results_dir: str | Path) -> int:
    """Point the default SQLite store of ``results_dir`` (``mlflow.db``) at this folder's artifacts: MLflow
    keeps absolute artifact locations, which a copied or moved folder would still share with the original.
    Rewrites the experiments' artifact location and their runs' artifact URIs where they name another
    folder's ``mlartifacts``; returns how many experiments it changed (0: nothing to do)."""
    results_dir = Path(results_dir).resolve()
    db = results_dir / "mlflow.db"
    if not db.is_file():
        return 0
    here = (results_dir / ARTIFACT_DIR).as_uri()
    changed = 0
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as con, con:
        rows = con.execute("SELECT experiment_id, artifact_location FROM experiments").fetchall()
        for exp_id, location in rows:
            if not location or location == here or not location.startswith("file://"):
                continue
            if not location.rstrip("/").endswith(f"/{ARTIFACT_DIR}"):
                continue  # a location the user chose, not ours
            old = location.rstrip("/")
            con.execute(
                "UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (here, exp_id)
            )
            con.execute(
                "UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                "WHERE experiment_id = ? AND substr(artifact_uri, 1, ?) = ?",
                (here, len(old) + 1, exp_id, len(old), old),
            )
            changed += 1
    if changed:
        _forget_artifact_repos()
    return changed


def _forget_artifact_repos() -> None:
    """MLflow caches a run's artifact store per run id in the process: after a relocation the same run id
    has its artifacts elsewhere."""
    with contextlib.suppress(Exception):
        from mlflow.tracking._tracking_service import utils

        utils._artifact_repos_cache.clear()


def _live_dir(run_dir: Path) -> Path:
    """The job folder of a run folder: itself, or for ``<job>/superseded/<stamp>`` the job's folder."""
    return run_dir.parent.parent if run_dir.parent.name == SUPERSEDED else run_dir


def locate(info: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """A run file's info as seen from where ``run_dir`` is now: when its results folder was copied or
    moved and the run went to that folder's default store, the store (and folder) of the copy."""
    rel = info.get("run_dir")
    old_results = info.get("results_dir")
    if not rel or not old_results or info.get("uri") != default_uri(old_results):
        return info
    live = _live_dir(Path(run_dir)).resolve()
    parts = Path(rel).parts
    if live.parts[-len(parts) :] != parts:
        return info
    new_results = Path(*live.parts[: -len(parts)]) if len(parts) < len(live.parts) else live
    if new_results == Path(old_results):
        return info
    _forget_artifact_repos()
    return {**info, "results_dir": str(new_results), "uri": default_uri(new_results)}


def relocate(results_dir: str | Path) -> tuple[int, int]:
    """``dfakd relocate-mlflow``: make a copied or moved results folder's default store and run files its
    own; returns (experiments changed, run files changed). Idempotent."""
    results_dir = Path(results_dir)
    experiments = relocate_store(results_dir)
    files = 0
    for path in sorted(results_dir.rglob(RUN_FILE)):
        info = json.loads(path.read_text())
        moved = locate(info, path.parent)
        if moved != info:
            _write_run_file(path.parent, moved)
            files += 1
    # the workflow's parent-run file names its store too (a default store: the folder's own mlflow.db)
    parent = results_dir / PARENT_RUN_FILE
    if parent.is_file():
        info = json.loads(parent.read_text())
        uri, here = info.get("uri"), default_uri(results_dir)
        default_elsewhere = str(uri).startswith("sqlite:///") and str(uri).endswith("/mlflow.db")
        if default_elsewhere and uri != here:
            atomic_write_text(parent, json.dumps({**info, "uri": here}) + "\n")
            files += 1
    return experiments, files


def result_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The final figures of a ``result.json`` that are logged as metrics (at step = epochs)."""
    return {
        k: float(v)
        for k, v in result.items()
        if k.endswith(("acc1", "acc5", "_loss")) and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _read_metric_rows(path: Path) -> list[tuple[int, dict[str, float]]]:
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(row.pop("epoch"))
            rows.append((step, {k: float(v) for k, v in row.items() if v not in ("", None)}))
    return rows


def sync_run_dir(run_dir: str | Path, uri: str | None = None, terminate: bool = True) -> str:
    """Make the MLflow run of one job folder match its results files; returns the run id.

    Creates the run if the store lacks it, sets the run file's tags, logs the parameters (the job's
    settings, ``settings.json``), every metric step (``metrics.csv`` / ``search_metrics.csv``,
    ``result.json``'s final figures, ``eval.json``'s as ``eval_*``) that the run does not have yet, the
    result files as artifacts, and, with ``terminate``, FINISHED when the job finished. Running it twice
    changes nothing the second time.
    """
    from mlflow.entities import Metric, Param, RunTag

    from dfakd.errors import DfakdError

    run_dir = Path(run_dir)
    stored = json.loads((run_dir / RUN_FILE).read_text())
    lacking = {"uri", "experiment", "results_dir", "run_name", "tags"} - set(stored)
    if lacking:
        raise DfakdError(
            f"{run_dir / RUN_FILE} lacks {', '.join(sorted(lacking))} (written by an older dfakd)"
        )
    info = locate(stored, run_dir)
    if info != stored:
        _write_run_file(run_dir, info)
    uri = uri or info["uri"]
    _prepare_client_env(10)
    client = client_for(uri)
    exp_id = ensure_experiment(uri, info["experiment"], info["results_dir"])
    run_id = info.get("run_id") if info.get("uri") == uri else None
    if run_id:
        try:
            client.get_run(run_id)
        except Exception:
            run_id = None
    if run_id is None:
        run_id = client.create_run(exp_id, tags=info["tags"], run_name=info["run_name"]).info.run_id
        _write_run_file(run_dir, {**info, "uri": uri, "run_id": run_id, "experiment_id": exp_id})
    run = client.get_run(run_id)
    tags = [RunTag(k, str(v)[:_MAX_TAG_LEN]) for k, v in info["tags"].items() if run.data.tags.get(k) != v]
    if tags:
        client.log_batch(run_id, tags=tags)
    settings = run_settings(run_dir)
    params = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in settings.items() if k not in run.data.params]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])

    wanted: list[tuple[int, dict[str, float]]] = []
    for name in METRIC_FILES:
        if (run_dir / name).is_file():
            wanted += _read_metric_rows(run_dir / name)
    result_path = next((run_dir / n for n in RESULT_FILES if (run_dir / n).is_file()), None)
    if result_path is not None and result_path.name == "result.json":
        result = json.loads(result_path.read_text())
        wanted.append((int(result.get("epochs", 0)), result_metrics(result)))
        if (run_dir / EVAL_FILE).is_file():
            evaluation = json.loads((run_dir / EVAL_FILE).read_text())
            figures = {f"eval_{k}": v for k, v in evaluation.items() if k in ("top1", "top5", "loss")}
            wanted.append((int(result.get("epochs", 0)), figures))
    logged: dict[str, set[int]] = {}
    missing = []
    now = int(time.time() * 1000)
    for step, values in wanted:
        for key, value in values.items():
            if key not in logged:
                logged[key] = {m.step for m in client.get_metric_history(run_id, key)}
            if step not in logged[key]:
                missing.append(Metric(key, value, now, step))
                logged[key].add(step)
    for i in range(0, len(missing), 500):
        client.log_batch(run_id, metrics=missing[i : i + 500])
    if terminate and result_path is not None:
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                client.log_artifact(run_id, str(run_dir / name))
        client.set_terminated(run_id, status="FINISHED")
    return run_id


def run_settings(run_dir: str | Path) -> dict[str, Any]:
    """The params of a job's run: its ``settings.json`` (the settings its checkpoint stores); a folder of
    an older dfakd, without one, falls back to its flattened ``config.yaml`` less the operational
    ``tracking`` section."""
    import yaml

    run_dir = Path(run_dir)
    if (run_dir / SETTINGS_FILE).is_file():
        return json.loads((run_dir / SETTINGS_FILE).read_text())
    if (run_dir / "config.yaml").is_file():
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        cfg.pop("tracking", None)
        return config_mod.flatten(cfg)
    return {}


def mark_superseded(run_dir: str | Path, uri: str | None = None) -> bool:
    """Tag the MLflow run of a set-aside (``superseded/``) folder ``dfakd.current=false`` (its run file
    says so too); False when it has no run in the store. Raises when the store is unreachable."""
    run_dir = Path(run_dir)
    info = json.loads((run_dir / RUN_FILE).read_text())
    if info.get("tags", {}).get(CURRENT_TAG) != "false":
        info = {**info, "tags": {**info.get("tags", {}), CURRENT_TAG: "false"}}
        _write_run_file(run_dir, info)
    info = locate(info, run_dir)
    if not info.get("run_id") or (uri and uri != info.get("uri")):
        return False
    _prepare_client_env(10)
    client_for(info["uri"]).set_tag(info["run_id"], CURRENT_TAG, "false")
    return True


def sync_results(results_dir: str | Path, uri: str | None = None) -> list[tuple[Path, str | Exception]]:
    """``dfakd sync-mlflow``: sync every job folder under ``results_dir``; (folder, run id or error). The
    runs of set-aside (superseded) folders are not rebuilt, only tagged ``dfakd.current=false``."""
    relocate(results_dir)
    out: list[tuple[Path, str | Exception]] = []
    for path in sorted(Path(results_dir).rglob(RUN_FILE)):
        if SUPERSEDED in path.relative_to(results_dir).parts:
            with contextlib.suppress(Exception):  # best-effort: an earlier run of a retrained job
                mark_superseded(path.parent, uri)
            continue
        try:
            out.append((path.parent, sync_run_dir(path.parent, uri)))
        except Exception as exc:  # one unreachable or stale folder must not stop the others
            out.append((path.parent, exc))
    return out


def log_evaluation(eval_path: str | Path) -> str | None:
    """Send an evaluation written into a job's folder (``dfakd evaluate -o <job>/eval.json``) to that job's
    run: its figures as ``eval_*`` metrics and the file as an artifact. Best-effort: returns why it could
    not (no run file, store unreachable), never raises."""
    run_dir = Path(eval_path).parent
    if Path(eval_path).name != EVAL_FILE or not (run_dir / RUN_FILE).is_file():
        return "no MLflow run file beside it"
    try:
        sync_run_dir(run_dir)
    except Exception as exc:
        return f"MLflow unreachable ({exc.__class__.__name__})"
    return None


def _write_run_file(run_dir: Path, info: dict[str, Any]) -> None:
    atomic_write_json(run_dir / RUN_FILE, info)


class Tracker:
    """One MLflow run for one job. With ``tracking.enabled: false`` every call is a no-op."""

    def __init__(self, cfg: dict[str, Any], run_dir: Path, run_name: str, tags: dict[str, str]) -> None:
        tcfg = cfg["tracking"]
        self.enabled = bool(tcfg["enabled"])
        self.run_dir = Path(run_dir)
        self.run_id: str | None = None
        self.uri = tracking_uri(cfg) if self.enabled else None
        self.online = False
        if not self.enabled:
            return
        _prepare_client_env(tcfg["timeout_s"])
        self.attempts, self.backoff_s = tcfg["retries"] + 1, tcfg["backoff_s"]
        results_dir = Path(cfg["results_dir"]).resolve()
        all_tags = {**{k: str(v) for k, v in tcfg["tags"].items()}, **tags, **provenance_tags()}
        all_tags[CURRENT_TAG] = "true"
        with contextlib.suppress(ValueError):  # a run folder outside the results folder: no such tag
            all_tags["dfakd.run_dir"] = str(self.run_dir.resolve().relative_to(results_dir))
        parent = tcfg["parent_run_id"] or (
            pipeline_parent(tcfg["parent_run_file"]) if tcfg["parent_run_file"] else None
        )
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run_file = self.run_dir / RUN_FILE
        saved = locate(json.loads(run_file.read_text()), self.run_dir) if run_file.is_file() else {}
        self.info = {
            "uri": self.uri,
            "experiment": tcfg["experiment"],
            "results_dir": str(results_dir),
            "run_name": run_name,
            "tags": all_tags,
            "run_id": saved.get("run_id") if saved.get("uri") == self.uri else None,
        }
        if "dfakd.run_dir" in all_tags:
            self.info["run_dir"] = all_tags["dfakd.run_dir"]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _write_run_file(self.run_dir, self.info)
        self._reconnect(attempts=self.attempts)
        if self.online:
            self._call("mark the run RUNNING", lambda c: c.update_run(self.run_id, status="RUNNING"))

    def mark_superseded(self, set_aside: Path) -> None:
        """The run of a job's earlier files, just set aside in ``set_aside``, is no longer current (left
        to ``dfakd sync-mlflow`` when the store is unreachable now)."""
        if not self.enabled or not (set_aside / RUN_FILE).is_file():
            return
        try:
            with_retries(lambda: mark_superseded(set_aside), self.attempts, self.backoff_s)
        except Exception as exc:
            self._warn(f"could not tag the earlier run superseded ({exc.__class__.__name__})")

    def _reconnect(self, attempts: int) -> bool:
        """(Re)build the run from the results files written so far; on success the tracker is online."""
        try:
            self.run_id = with_retries(
                lambda: sync_run_dir(self.run_dir, self.uri, terminate=False), attempts, self.backoff_s
            )
            self.online = True
        except Exception as exc:
            self._warn(
                f"MLflow at {self.uri} unreachable ({exc.__class__.__name__}); training goes on offline"
            )
            self.online = False
        return self.online

    def _warn(self, message: str) -> None:
        print(f"dfakd: warning: {message}", file=sys.stderr, flush=True)

    def _call(self, what: str, fn: Callable[[Any], Any]) -> None:
        if not self.enabled:
            return
        if not self.online and not self._reconnect(attempts=1):
            return
        try:
            with_retries(lambda: fn(client_for(self.uri)), self.attempts, self.backoff_s)
        except Exception as exc:
            self._warn(f"could not {what} ({exc.__class__.__name__}); kept in the results files for replay")
            self.online = False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._call(f"log metrics of step {step}", lambda c: c.log_batch(self.run_id, metrics=batch))

    def finish(self, status: str = "FINISHED") -> None:
        """Replay what is missing, log the result files, and close the run."""
        if not self.enabled:
            return
        if status == "FINISHED":
            try:
                self.run_id = with_retries(
                    lambda: sync_run_dir(self.run_dir, self.uri), self.attempts, self.backoff_s
                )
                self.online = True
                return
            except Exception as exc:
                self.online = False
                self._warn(
                    f"MLflow still unreachable at the end ({exc.__class__.__name__}); run "
                    f"`dfakd sync-mlflow {shlex.quote(str(self.run_dir))}` once it is back"
                )
                return
        self._call(f"mark the run {status}", lambda c: c.set_terminated(self.run_id, status=status))

    def abort(self, exc: BaseException) -> None:
        """Close the run of a job that stopped early: KILLED if interrupted (SIGTERM, Ctrl-C), else FAILED."""
        from dfakd.training.preemption import Preempted

        self.finish("KILLED" if isinstance(exc, (Preempted, KeyboardInterrupt)) else "FAILED")

    def describe(self) -> str:
        if not self.enabled:
            return "tracking disabled"
        state = "" if self.online else " (offline: run `dfakd sync-mlflow` to send what is missing)"
        return f"MLflow run {self.run_id} in {self.uri}{state}"


def _parent_lock(run_file: Path) -> Path:
    return run_file.with_name(run_file.name + ".lock")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (a lock file beside the parent run file) across processes."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def start_pipeline_run(
    uri: str | None,
    experiment: str,
    results_dir: str | Path,
    run_file: str | Path,
    name: str,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Create the store and experiment (once, before parallel jobs start) and write ``run_file`` for the
    jobs of one pipeline invocation. The parent run itself is created lazily, by the first job that trains
    (:func:`pipeline_parent`), so that an invocation that trains nothing adds no empty parent run.

    Tracking never stops a pipeline: when the store is unreachable or broken, ``run_file`` says so
    (``run_id`` null, ``offline`` true, the error), the jobs train offline with no parent run, and
    ``dfakd sync-mlflow`` replays them later. A run file left by an earlier invocation is replaced either way.
    """

    _prepare_client_env(10)
    uri = resolve_uri(uri, results_dir)
    Path(results_dir).mkdir(parents=True, exist_ok=True)
    try:
        exp_id = ensure_experiment(uri, experiment, results_dir)
        info: dict[str, Any] = {
            "uri": uri, "run_id": None, "experiment_id": exp_id, "name": name,
            "tags": {"stage": "pipeline", **provenance_tags(), **(tags or {})},
        }  # fmt: skip
    except Exception as exc:
        info = {"uri": uri, "run_id": None, "offline": True, "error": exc.__class__.__name__}
    atomic_write_text(run_file, json.dumps(info) + "\n")
    return info


def pipeline_parent(run_file: str | Path) -> str | None:
    """The parent run id of the invocation that wrote ``run_file``, created now if no job has yet (under a
    lock: one parent for parallel jobs). None when there is none (offline, or the store unreachable now)."""
    run_file = Path(run_file)
    if not run_file.is_file():
        return None
    try:
        with _locked(_parent_lock(run_file)):
            info = json.loads(run_file.read_text())
            if info.get("run_id") or info.get("offline") or not info.get("experiment_id"):
                return info.get("run_id")
            run = client_for(info["uri"]).create_run(
                info["experiment_id"], run_name=info.get("name"), tags=info.get("tags", {"stage": "pipeline"})
            )
            atomic_write_text(run_file, json.dumps({**info, "run_id": run.info.run_id}) + "\n")
            return run.info.run_id
    except Exception:
        return None


def finish_pipeline_run(
    run_file: str | Path, status: str, artifacts: list[tuple[str | Path, str | None]] | None = None
) -> str | None:
    """Log ``artifacts`` ((file, folder in the run); missing files skipped) to the parent run and close it;
    returns why it could not (never raises for an unreachable store). Nothing to do when there is none (no
    job trained, or the store was unreachable when the pipeline started, which it said then)."""
    _prepare_client_env(10)
    # every job of the invocation has ended: the lock that kept them to one parent is not needed any more
    _parent_lock(Path(run_file)).unlink(missing_ok=True)
    info = json.loads(Path(run_file).read_text())
    if not info.get("run_id"):
        return None
    try:
        client = client_for(info["uri"])
        for path, folder in artifacts or []:
            if Path(path).is_file():
                client.log_artifact(info["run_id"], str(path), folder)
        client.set_terminated(info["run_id"], status=status)
    except Exception as exc:
        return f"MLflow at {info['uri']} unreachable ({exc.__class__.__name__})"
    return None
