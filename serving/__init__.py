"""The serving side as a library; `scripts/serve.py`, `scripts/soak.py` and the benchmarks are its
command lines, and the tests import it directly.

    server     start, stop and find a local TorchServe instance; its keys
    client     a typed REST client (`Client.predict` -> `Prediction`, or `RequestFailed`)
    tsconfig   the one source of TorchServe's config.properties for every target
    properties the one reader of those files (shipped alone in the image, for docker/*.py)
    loadgen    closed- and open-loop load, request samples, memory traces
    wrk        keep-alive load from wrk as a typed result (the benchmarks' load generator)
    peers      the peer benchmark: stock TorchServe, LitServe, the in-process limit (peer_apps/)
    sweep      the settings sweep: workers, batching, threads under 1-64 clients
    images     image bodies for tests and benchmarks
    docblock   measured figures written between markers in docs/*.md
    container  the serving image run as GKE runs it
    container_memory  its memory under load against the pod's limit
    waiting    `wait_for`, the one way to poll for a condition
"""

# Default paths come from the repository root, as for every stage's command line (training.cli),
# never from the working directory.
from handler import MODEL_NAME
from training.cli import REPO_ROOT as REPO

__all__ = ["MODEL_NAME", "REPO"]
