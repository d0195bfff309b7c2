#!/usr/bin/env bash
# The main job (`make all` runs setup first): render params.yaml from configs/, run the DVC pipeline
# (prepare -> train -> export -> evaluate -> archive; stages whose inputs did not change come from
# DVC's cache), then serve: start TorchServe (or reuse the running one), register the model's
# version beside the versions already there, make it the default, and predict through the REST API.
#
#   scripts/main.sh                          # default training config
#   scripts/main.sh experiment=accurate      # extra arguments are Hydra overrides for configs/
#
# Run it again with nothing changed and it goes straight to serving. Change a config and only the
# stages that depend on it rerun; the new model gets a new version (a hash of its weights and
# metadata), and the previous one stays registered: `python -m scripts.serve set-default OLD` rolls back.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[[ -x $PY ]] || { echo "error: $PY missing; run \`make setup\` first" >&2; exit 1; }
export PATH="$PWD/.venv/bin:$PATH"  # dvc.yaml's `python` is the venv's
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning}"  # torch.jit's deprecation notices

step() { printf '\n\033[1;34m== [%s] %s\033[0m\n' "$1" "$2"; }

step 1/6 "params: configs/ -> params.yaml"
$PY -m training.params "$@"

step 2/6 "pipeline: dvc repro (prepare -> train -> export -> evaluate -> archive)"
t0=$SECONDS
dvc repro
# The archive's version: the default int8 variant serves as the export's version plus "-int8".
mar=model_store/fashion_mnist.mar
version=$($PY -c 'import sys, pathlib, monitoring.rules as r; print(r.load_meta(pathlib.Path(sys.argv[1]))["version"])' "$mar")
echo "pipeline done in $((SECONDS - t0)) s: fashion_mnist $version (reports/metrics.json, dvc metrics show)"

step 3/6 "rules: this model's Prometheus drift rules"
# The drift rules hold this model's training reference and the version it is served as (docs/monitoring.md).
$PY -m monitoring.rules --meta "$mar" --gke deploy/overlays/gke/rules.yaml

step 4/6 "serve: TorchServe on 127.0.0.1 (token auth on)"
if $PY -m scripts.serve status >/dev/null 2>&1; then
  echo "reusing the running server: its registered versions stay available for rollback"
else
  $PY -m scripts.serve stop >/dev/null 2>&1 || true  # an unhealthy server left from an earlier run
  $PY -m scripts.serve start --model-store model_store
fi

step 5/6 "deploy: register $version through the management API (if new) and make it the default"
$PY -m scripts.serve deploy "$mar"

step 6/6 "predict: ten real test images through the inference REST API"
$PY -m scripts.serve predict data/samples --top-k 1 --truth-from-name

cat <<'MSG'

TorchServe is still running. Next:
  .venv/bin/python -m scripts.serve predict path/to/image.png     # top-k table (token read for you)
  .venv/bin/python -m scripts.serve status                        # health, models, versions, workers
  .venv/bin/python -m scripts.serve set-default VERSION           # roll back to an earlier version
  KEY=$(python3 -c 'import json; print(json.load(open(".serve/default/key_file.json"))["inference"]["key"])')
  curl -H "Authorization: Bearer $KEY" -T data/samples/test00000_Ankle-boot.png \
       http://127.0.0.1:8080/predictions/fashion_mnist
  .venv/bin/python -m scripts.serve stop                          # waits until the JVM has exited
Metrics (Prometheus text, no token): http://127.0.0.1:8082/metrics  (model metrics: fashion_*)
  make monitor                    # Prometheus :9090 + Alertmanager :9093 with the drift rules
  tail .serve/default/logs/predictions.log                        # one JSON line per prediction
  Grafana: import monitoring/grafana/fashion-mnist.json; docs/monitoring.md explains it all
Docs: docs/serving.md (endpoints, batching, figures), reports/ (evaluation), docs/training.md,
      docs/pipeline.md (DVC: experiments, metrics, remotes).
MSG
