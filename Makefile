# Every target explains itself: `make help`.
.DEFAULT_GOAL := help
SHELL := /bin/bash
PY := .venv/bin/python
RUN ?= outputs/train/latest
EXPORT ?= artifacts/model
TRAIN_ARGS ?=
PEERS_VENV := .venv-peers
PEERS_ARGS ?=
# Empty: archive.build's default variant (archive/variants.py DEFAULT_VARIANT); e.g. make archive VARIANT=fp32
VARIANT ?=

.PHONY: help setup setup-dev all repro tune data train export evaluate archive serve stop lint test \
	test-fast image image-train bench-training bench-loading bench-precision bench-variants bench-serving \
	bench-container bench-container-load bench-monitoring bench-peers sweep-serving soak clean rules monitor robustness \
	drift-report profile-training profile-serving

help:  ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-16s\033[0m %s\n", $$1, $$2}'

setup:  ## venv + requirements, Java 17, Fashion-MNIST Debian package (idempotent)
	scripts/setup.sh

setup-dev:  ## setup plus the real servers the tests use (nginx, prometheus, wrk, docker), the git hook
	scripts/setup.sh --dev

all: setup  ## THE MAIN JOB: setup, then data -> train -> export -> evaluate -> archive -> serve -> predict
	scripts/main.sh

repro:  ## the DVC pipeline only: params.yaml from configs/, then the stages whose inputs changed
	$(PY) -m training.params $(TRAIN_ARGS)
	PATH="$(CURDIR)/.venv/bin:$$PATH" .venv/bin/dvc repro

tune:  ## Optuna study (resumable, SQLite under outputs/); best trial -> configs/experiment/tuned.yaml
	$(PY) -m training.tune

data:  ## verify Fashion-MNIST and write data/processed/ (+ manifest)
	$(PY) -m training.data

train: data  ## train with the default config (override: make train TRAIN_ARGS="experiment=accurate")
	$(PY) -m training.train $(TRAIN_ARGS)

export:  ## TorchScript + model_meta.json from $(RUN) into $(EXPORT), with parity checks
	$(PY) -m training.export --run $(RUN) --out $(EXPORT)

evaluate:  ## test-set report and confusion matrix into reports/
	$(PY) -m training.evaluate --model-dir $(EXPORT) --out reports

archive:  ## model_store/fashion_mnist.mar from $(EXPORT) (VARIANT=name to choose), self-checked before it is published
	$(PY) -m archive.build --export-dir $(EXPORT) --store model_store $(if $(VARIANT),--variant $(VARIANT))

serve:  ## start TorchServe (127.0.0.1) and register the archive through the management API
	$(PY) -m scripts.serve start --model-store model_store
	$(PY) -m scripts.serve register

rules:  ## regenerate the Prometheus rules (local + GKE overlay) from the archive, model_store/fashion_mnist.mar
	$(PY) -m monitoring.rules --meta model_store/fashion_mnist.mar --gke deploy/overlays/gke/rules.yaml

monitor:  ## Prometheus :9090 + Alertmanager :9093 against the running local server (Ctrl-C stops)
	$(PY) -m monitoring.stack

stop:  ## stop TorchServe and wait until the JVM has exited
	$(PY) -m scripts.serve stop

image:  ## serving image (builds the base image and wheelhouse locally when missing)
	scripts/build_image.sh

image-train:  ## training image
	scripts/build_image.sh --train

# pre-commit's cache lives in the checkout, so lint works wherever HOME is not writable.
lint: export PRE_COMMIT_HOME ?= $(CURDIR)/.cache/pre-commit
lint:  ## every pre-commit hook over the whole tree (ruff, shellcheck, hadolint, manifests, workflows...)
	$(PY) -m pre_commit run --all-files --show-diff-on-failure

# make test's suite runs in two phases (docs/ci.md#the-test-suite-in-two-phases). Most tests wait on JVMs,
# containers and Prometheus, so they run on $(TEST_WORKERS) pytest-xdist workers (tests/conftest.py keeps
# each module on one worker, and the modules with Docker tests together); then the `solo` tests, whose
# timing or rates a shared machine would move, run alone. Coverage is combined: the floor and coverage.xml are those of both.
TEST_WORKERS ?= 3
COV := --cov=model --cov=training

# Each phase gets a short base temp dir of its own (removed when it passes): xdist adds popen-gwN/ to
# pytest's default one, and a server's state dir under that would pass the 80 characters TorchServe's
# unix sockets allow. The trained, exported and archived fixtures are built once for both phases, in
# TEST_SHARED (tests/conftest.py:build_once), which a new run clears and a passing run removes. Setup
# builds the images the container tests use while the venv installs (scripts/setup.sh --images), so
# their builds in the CPU-bound parallel phase find every layer but the archive's cached.
TEST_SHARED := $(CURDIR)/build/test-shared
test:  ## THE TEST COMMAND: setup (with the test images), lint, then the whole suite with coverage (parallel, then solo)
	scripts/setup.sh --dev --images
	$(MAKE) --no-print-directory lint
	rm -rf $(TEST_SHARED)
	tmp=$$(mktemp -d /tmp/fm.XXXXXX) && FASHION_TEST_SHARED=$(TEST_SHARED) $(PY) -m pytest -m "not solo" \
		-n $(TEST_WORKERS) --dist loadscope --durations=25 --basetemp $$tmp $(COV) --cov-report= && rm -rf $$tmp
	tmp=$$(mktemp -d /tmp/fm.XXXXXX) && FASHION_TEST_SHARED=$(TEST_SHARED) $(PY) -m pytest -m solo \
		--durations=25 --basetemp $$tmp $(COV) --cov-append --cov-report=term-missing --cov-report=xml \
		--cov-fail-under=85 && rm -rf $$tmp $(TEST_SHARED)

test-fast:  ## unit tests only (no JVM, no docker), for quick iteration
	$(PY) -m pytest -m "not serving and not container"

bench-training:  ## measure default + accurate training; writes docs/training.md
	$(PY) -m scripts.bench_training

bench-loading:  ## DataLoader images/s for 0, 1 and 2 workers; writes docs/training.md
	$(PY) -m scripts.bench_loading

bench-precision:  ## fp32 against bf16-mixed training speed and accuracy; writes its section of docs/training.md
	$(PY) -m scripts.bench_precision

bench-variants:  ## latency, accuracy and load time of each model variant of $(EXPORT); writes docs/serving.md
	$(PY) -m scripts.bench_variants --export-dir $(EXPORT)

bench-serving:  ## cold start, latency and throughput of the archive; writes docs/serving.md
	$(PY) -m scripts.bench_serving

# The peers' own venv, never the serving image: requirements-peers.txt with the project's torch pins.
$(PEERS_VENV)/.installed: requirements-peers.txt requirements.txt
	python3 -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q -r requirements-peers.txt -c requirements.txt
	touch $@

bench-peers: $(PEERS_VENV)/.installed  ## this server vs stock TorchServe, LitServe, in-process (after make all); docs/serving.md
	$(PY) -m scripts.bench_peers $(PEERS_ARGS)

sweep-serving:  ## workers x batch x delay x threads at 1-64 clients, about 12 min; writes docs/serving.md
	$(PY) -m scripts.sweep_serving

bench-container:  ## image size and container cold start; writes docs/deploy.md
	$(PY) -m scripts.bench_container

bench-container-load:  ## req/s, p99, CPU per CPU limit -> pod CPU and HPA target (after make image); docs/deploy.md
	$(PY) -m scripts.bench_container_load

bench-monitoring:  ## throughput with model monitoring on vs off, and the drift calibration; docs/monitoring.md
	$(PY) -m scripts.bench_monitoring
	$(PY) -m monitoring.calibrate --model-dir $(EXPORT)

robustness:  ## accuracy and drift PSI under fixed shifts; reports/robustness.*, docs/monitoring.md
	$(PY) -m monitoring.robustness --model-dir $(EXPORT)

drift-report:  ## HTML drift report of the local prediction log (LOG=FILE to change); reports/
	$(PY) -m monitoring.drift_report --log $(or $(LOG),.serve/default/logs/predictions.log) --meta model_store/fashion_mnist.mar

profile-training:  ## torch.profiler over 30 training steps (TRAIN_ARGS overrides); reports/profile/
	$(PY) -m training.profile $(TRAIN_ARGS)

profile-serving:  ## handler stages + torch.profiler, then py-spy flame graph of a loaded worker; reports/profile/
	$(PY) -m serving.profile handler --model-dir $(EXPORT)
	$(PY) -m serving.profile live --model-store model_store

soak:  ## drive the server at ~80% of capacity for 5 minutes; writes docs/reliability.md
	$(PY) -m scripts.soak

clean:  ## remove generated outputs (keeps .venv and data/)
	rm -rf outputs artifacts model_store reports logs .serve .monitor build .pytest_cache .coverage coverage.xml
