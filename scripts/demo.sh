#!/usr/bin/env bash
# Set up (once) and run the offline demo end to end on the CPU: demo data -> teacher -> evaluation ->
# DFA search -> derived aggregation -> DFA distillation, beside the vanilla/KD/OFD students.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
CFG=config/demo.yaml
OUT=results/demo

dfakd prepare-data mnist5k --root data/mnist5k
dfakd train -c "$CFG" --set model.arch=resnet20 -o "$OUT/teacher"
dfakd evaluate -c "$CFG" --checkpoint "$OUT/teacher/best.pt" -o "$OUT/teacher/test_metrics.json"
dfakd search -c "$CFG" -o "$OUT/search"
dfakd derive -c "$CFG" --search "$OUT/search/search.json" -o "$OUT/aggregation.yaml"
for method in vanilla kd ofd dfa; do
  dfakd distill -c "$CFG" --method "$method" -o "$OUT/student-$method"
done

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
teacher = json.loads((out / "teacher/test_metrics.json").read_text())
print(f"\nteacher resnet20 test top-1: {teacher['top1']:.2f}%")
print("student resnet8 (test top-1, best / last epoch):")
for m in ("vanilla", "kd", "ofd", "dfa"):
    r = json.loads((out / f"student-{m}/result.json").read_text())
    print(f"  {m:8s} {r['best_acc1']:6.2f}% / {r['last_acc1']:6.2f}%")
run = json.loads((out / "teacher/mlflow_run.json").read_text())
print(f"MLflow: teacher run {run['run_id']} in {run['uri']}")
print(f"open the UI with: mlflow ui --backend-store-uri {run['uri']}")
PY
