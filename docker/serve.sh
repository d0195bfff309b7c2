#!/bin/sh
# Main process of the serving container (under tini): TorchServe in the foreground, logs on stdout.
#
#     docker run --rm -p 127.0.0.1:8080:8080 fashion-mnist-serve     # the image's CMD runs this
#
# TorchServe reads TS_CONFIG_FILE (the image's docker/config.properties; the Kubernetes pod points
# it at its ConfigMap). SIGTERM or SIGINT first drains TorchServe (docker/drain.py: requests it has
# accepted get their answers, later ones are refused at once), then stops it with its own
# `torchserve --stop`, which waits for the JVM to exit, and then this script exits 0. If TorchServe
# ends by itself, the script exits 1 so that a restart policy sees a failure; a missing archive
# exits 2 before anything starts.
set -eu

config=${TS_CONFIG_FILE:?TS_CONFIG_FILE must name TorchServe config.properties}
store=$(sed -n 's/^model_store=//p' "$config")
for entry in $(sed -n 's/^load_models=//p' "$config" | tr ',' ' '); do
    if [ ! -r "$store/${entry#*=}" ]; then
        echo "serve.sh: $store/${entry#*=} not found, or not readable by uid $(id -u). Bake it into the" \
            "image (docker build, default target, after 'python -m archive.build') or mount a readable" \
            "store: docker run -v \"\$PWD/model_store:$store:ro\" ..." >&2
        exit 2
    fi
done

# TorchServe writes key_file.json into its working directory: the image's WORKDIR, writable.
# Drain first (docker/drain.py: cut off new requests, answer the accepted ones, scale to zero
# workers); whatever it reports, TorchServe is stopped after it.
# shellcheck source=docker/supervise.sh
. "$(dirname "$0")/supervise.sh"
supervise 'python3 /opt/fashion-serve/drain.py || true; torchserve --stop --foreground' \
    torchserve --foreground --ncs --ts-config "$config" --log-config /opt/fashion-serve/log4j2.xml
if [ -n "$stopped" ]; then
    echo "serve.sh: TorchServe stopped" >&2
    exit 0
fi
echo "serve.sh: TorchServe exited by itself (status $status); the reason is in the log above" >&2
exit 1
