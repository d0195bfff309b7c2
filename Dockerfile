# Serving image: TorchServe 0.12 with CPU-only torch on Debian bookworm. Non-root, logs on stdout,
# a clean exit 0 on SIGTERM. docs/deploy.md has both ways to build it and both ways to ship the .mar:
#
#   scripts/build_image.sh                                 # no registry in reach: local base + wheelhouse
#   docker build -t fashion-mnist-serve .                  # with internet: Docker Hub base, PyPI wheels
#   docker build --target runtime -t fashion-mnist-serve . # without the .mar: mount model_store at run
#
# The default (last) target bakes in model_store/fashion_mnist.mar (python -m archive.build).

FROM debian:bookworm-slim AS system
# Java runs TorchServe's frontend and python3 its workers. nginx-light is the pod's authenticating
# proxy (same image, other command; deploy/base/deployment.yaml) and tini the PID 1 that forwards
# signals and reaps worker processes. Debian revisions are not pinned: the security archive drops
# superseded ones, so a pin would break the build at the next update. The JRE's postinst links its
# man page into man1, which slim images leave out.
# hadolint ignore=DL3008
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless python3 nginx-light tini \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

# Its own stage from the bare base, so a change of the packages above does not rebuild the venv.
FROM debian:bookworm-slim AS venv
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
# WHEELS=index (default) installs from the indexes; WHEELS=local only from build/wheelhouse, which
# scripts/build_image.sh fills on the host. The [d] glob lets this COPY succeed without build/
# (a clean clone): both the legacy builder and BuildKit accept a wildcard that matches nothing.
ARG WHEELS=index
COPY docker/install_venv.sh docker/requirements.txt docker/requirements-train.txt buil[d]/wheelhouse /tmp/wheels/
# torch alone first, in a layer of its own: these instructions are the same in Dockerfile and
# Dockerfile.train, so the image built second finds that layer (most of its size) cached.
RUN /tmp/wheels/install_venv.sh "$WHEELS" /tmp/wheels/requirements.txt torch
# hadolint ignore=DL3059
RUN /tmp/wheels/install_venv.sh "$WHEELS" /tmp/wheels/requirements.txt

FROM system AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/model-server \
    TMPDIR=/tmp \
    TEMP=/tmp \
    TS_CONFIG_FILE=/opt/fashion-serve/config.properties
# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/model-server \
        --shell /usr/sbin/nologin model-server \
    && mkdir /opt/fashion-serve /opt/fashion-serve/model-store
COPY --from=venv /opt/venv /opt/venv
COPY docker/config.properties docker/log4j2.xml docker/serve.sh docker/proxy.sh docker/supervise.sh \
    docker/healthcheck.py docker/drain.py configs/serving/metrics.yaml /opt/fashion-serve/
# The one properties reader, alone: healthcheck.py and drain.py import serving.properties from here.
COPY serving/properties.py /opt/fashion-serve/serving/
USER 10001:10001
# Writable at run time (tmpfs or emptyDir when the root filesystem is read-only): HOME holds
# TorchServe's key_file.json, /tmp its PID file and the unpacked archive.
WORKDIR /home/model-server
EXPOSE 8080 8081 8082 7070 7071
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "/opt/fashion-serve/healthcheck.py"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["/opt/fashion-serve/serve.sh"]

FROM runtime AS serve
# scripts/build_image.sh --mar PATH stages another archive under build/image/ and names it here.
ARG MAR=model_store/fashion_mnist.mar
COPY ${MAR} /opt/fashion-serve/model-store/fashion_mnist.mar
