#!/usr/bin/env bash
# The main job (`make all` runs setup first): data -> train -> export -> evaluate -> archive ->
# start TorchServe -> register through the management API -> predict through the REST API.
#
#   scripts/main.sh                          # default training config
#   scripts/main.sh experiment=accurate      # extra arguments go to `python -m training.train`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[[ -x $PY ]] || { echo "error: $PY missing; run \`make setup\` first" >&2; exit 1; }
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning}"  # torch.jit's deprecation notices

step() { printf '\n\033[1;34m== [%s] %s\033[0m\n' "$1" "$2"; }

step 1/8 "data: verify Fashion-MNIST, split, write data/processed/"
$PY -m training.data --samples data/samples --count 10

step 2/8 "train: Lightning + Hydra, run dir under outputs/train/"
$PY -m training.train "$@"

step 3/8 "export: TorchScript + model_meta.json -> artifacts/model/, and its Prometheus rules"
$PY -m training.export --run outputs/train/latest --out artifacts/model
# The drift rules hold this model's training reference (docs/monitoring.md).
$PY -m monitoring.rules --meta artifacts/model/model_meta.json --gke deploy/overlays/gke/rules.yaml

step 4/8 "evaluate: the exported model on the 10,000 test images -> reports/"
$PY -m training.evaluate --model-dir artifacts/model --out reports

step 5/8 "archive: model_store/fashion_mnist.mar"
$PY -m archive.build --export-dir artifacts/model --store model_store

step 6/8 "serve: TorchServe on 127.0.0.1 (token auth on)"
$PY -m scripts.serve stop >/dev/null 2>&1 || true  # a server left from an earlier run
$PY -m scripts.serve start --model-store model_store

step 7/8 "register: POST /models through the management API"
$PY -m scripts.serve register fashion_mnist.mar

step 8/8 "predict: ten real test images through the inference REST API"
$PY -m scripts.serve predict data/samples --top-k 1 --truth-from-name

cat <<'MSG'

TorchServe is still running. Next:
  .venv/bin/python -m scripts.serve predict path/to/image.png     # top-k table (token read for you)
  .venv/bin/python -m scripts.serve status                        # health, models, workers
  KEY=$(python3 -c 'import json; print(json.load(open(".serve/default/key_file.json"))["inference"]["key"])')
  curl -H "Authorization: Bearer $KEY" -T data/samples/test00000_Ankle-boot.png \
       http://127.0.0.1:8080/predictions/fashion_mnist
  .venv/bin/python -m scripts.serve stop                          # waits until the JVM has exited
Metrics (Prometheus text, no token): http://127.0.0.1:8082/metrics  (model metrics: fashion_*)
  make monitor                    # Prometheus :9090 + Alertmanager :9093 with the drift rules
  tail .serve/default/logs/predictions.log                        # one JSON line per prediction
  Grafana: import monitoring/grafana/fashion-mnist.json; docs/monitoring.md explains it all
Docs: docs/serving.md (endpoints, batching, figures), reports/ (evaluation), docs/training.md.
MSG
