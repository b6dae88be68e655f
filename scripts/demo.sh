#!/usr/bin/env bash
# Set up (once) and run the offline demo end to end: the Snakemake workflow on config/config.yaml
# (mnist5k data -> resnet20 teacher -> evaluation -> DFA search -> derived aggregation -> resnet8
# students with vanilla, KD, OFD and DFA over 2 seeds -> summary, plots), then the HTML report.
# Extra arguments go to snakemake (e.g. --cores 4, or -n for a dry run).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
source scripts/recover_lock.sh
OUT=results/demo

recover_stale_lock  # after a kill -9 of an earlier run; its killed jobs then resume (--rerun-incomplete)
snakemake --cores all "$@"
snakemake --report "$OUT/report.html"

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
teacher = json.loads((out / "teachers/mnist5k/resnet20/s0/eval.json").read_text())
print(f"\nteacher resnet20 test top-1: {teacher['top1']:.2f}% ({teacher['n']} test images)")
print((out / "summary.md").read_text())
parent = json.loads((out / "mlflow_parent_run.json").read_text())
run = parent.get("run_id") or "none (no job trained in this invocation)"
print(f"MLflow: pipeline run {run} (every job's run is nested under it) in {parent['uri']}")
print(f"open the UI with: mlflow ui --backend-store-uri {parent['uri']}")
if parent.get("experiment_id"):
    from dfakd.tracking import runs_url
    print(f"the runs table: {runs_url(parent['experiment_id'])}")
print(f"summary: {out / 'summary.md'}, plots: {out / 'plots'}, report: {out / 'report.html'}")
PY
