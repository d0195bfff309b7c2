"""TorchServe entry point for the Fashion-MNIST classifier: a thin BaseHandler subclass.

The archive copies this file to the .mar root and ships the whole `handler/` package next to it,
so `from handler.… import …` resolves the same way in the worker (model dir on sys.path) as in the
repository. The work is done by plain functions: handler.payload (request -> image bytes, k),
handler.preprocess (bytes -> tensor), handler.postprocess (probabilities -> JSON). Build and check
an archive that contains it with:

    python -m archive.build          # model_store/fashion_mnist.mar, self-checked in-process

TorchServe's model loader takes the single class defined in this module as the handler, so this
module defines exactly one class and no module-level `handle` function.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

from handler.meta import ModelMeta
from handler.monitor import Monitor, MonitorSpec, enabled
from handler.payload import parse_request
from handler.postprocess import encode_prediction, prediction_body, probabilities
from handler.preprocess import InputError, normalize, to_pixels
from handler.variants import load_model

logger = logging.getLogger(__name__)

THREADS_ENV = "FASHION_TORCH_THREADS"
DEFAULT_THREADS = 1  # per worker, when THREADS_ENV is unset (configure_threads says why)


def configure_threads() -> int:
    """Give this worker process FASHION_TORCH_THREADS (default 1) torch threads; returns the count.

    TorchServe gets its parallelism from worker processes (minWorkers..maxWorkers) and batching.
    Left alone, torch in every worker starts one thread per core, so W workers on C cores run
    W*C busy threads that fight over the cores and add latency. One thread per worker makes the
    worker count the one knob; raise the variable only for a single worker on a many-core host.
    """
    raw = os.environ.get(THREADS_ENV, str(DEFAULT_THREADS))
    try:
        threads = int(raw)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"{THREADS_ENV} must be a whole number >= 1, got {raw!r}")
    torch.set_num_threads(threads)
    # One forward at a time per worker, so no inter-op parallelism. Torch allows setting this once
    # per process; a second initialize in the same process (tests) keeps the first setting.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return threads


class FashionMNISTHandler(BaseHandler):
    """Every request in a batch gets its own answer: 200 with top-k predictions, or 400/413.

    Whatever one request holds, it cannot fail its batch-mates: an input the parsing and decoding
    code did not foresee is answered 400 `unprocessable_input` on its own, and logged with its
    traceback so the gap can be closed.
    """

    def initialize(self, context: Any) -> None:
        threads = configure_threads()
        model_dir = Path(context.system_properties["model_dir"])
        meta = ModelMeta.load(model_dir)
        self.classes, self.spec = meta.classes, meta.preprocess
        self.model_name, self.version = meta.name, meta.version
        # The manifest's file name comes from the archive: an absolute path or "../" in it would load
        # a model from elsewhere on the host instead of the one the archive step checked.
        model_file = (model_dir / context.manifest["model"]["serializedFile"]).resolve()
        if not model_file.is_relative_to(model_dir.resolve()):
            raise RuntimeError(
                f"the archive's serializedFile resolves to {model_file}, outside the archive; "
                "build archives with `python -m archive.build`"
            )
        # The variant archive.build chose (handler/variants.py) decides how the file is loaded.
        self.model = load_model(model_file, meta.variant)
        # Fail the load, not every request, if the model does not fit the metadata. Two calls also
        # let TorchScript's profiling executor finish optimising before the first client arrives.
        with torch.inference_mode():
            for _ in range(2):
                out = self.model(torch.zeros(1, *self.spec.input_shape))
        if tuple(out.shape) != (1, len(self.classes)):
            raise RuntimeError(
                f"model output shape {tuple(out.shape)} does not match {len(self.classes)} classes; "
                "re-export the model with `python -m training.export`"
            )
        self.monitor = None
        if enabled():
            self.monitor = Monitor(
                self.model_name, self.version, self.classes, MonitorSpec.from_stats(meta.reference_stats)
            )
            self.monitor.started(context.metrics)
        self.initialized = True
        logger.info(
            "loaded %s %s (variant %s, %d classes, %d torch threads)",
            self.model_name,
            self.version,
            meta.variant,
            len(self.classes),
            threads,
        )

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[dict[str, Any] | bytes]:
        """Answer a TorchServe batch, one status per request: JSON bytes for a prediction, a dict
        (TorchServe encodes it) for a refusal.

        Replaces BaseHandler.handle because its preprocess/inference/postprocess chain has no place
        for a per-request failure: any exception there turns the whole batch into a 503.
        """
        start = time.perf_counter()
        self.context = context
        answers: list[dict[str, Any] | bytes] = [{} for _ in data]
        pixels, positions, ks = [], [], []
        for idx, row in enumerate(data):
            context.set_response_content_type(idx, "application/json")
            try:
                request = parse_request(row, context.get_all_request_header(idx), len(self.classes))
                pixels.append(to_pixels(request.image, self.spec))
            except InputError as err:
                _log_rejection(context.get_request_id(idx), err)
                answers[idx] = self._refuse(context, idx, err)
                continue
            except Exception:
                answers[idx] = self._refuse(context, idx, _unforeseen(context.get_request_id(idx)))
                continue
            positions.append(idx)
            ks.append(request.top_k)
        if pixels:
            # One normalize for the batch (the per-image tensor operations cost more than the arithmetic).
            batch = normalize(torch.from_numpy(np.stack(pixels)), self.spec)
            with torch.inference_mode():
                probs = probabilities(self.model(batch))
            if self.monitor:
                ids = [context.get_request_id(idx) for idx in positions]
                self.monitor.observe(batch, probs, ids, self.spec)
            for idx, k, row_probs in zip(positions, ks, probs, strict=True):
                body = prediction_body(row_probs, self.classes, k, self.model_name, self.version)
                answers[idx] = encode_prediction(body)
        context.metrics.add_time("HandlerTime", round((time.perf_counter() - start) * 1000, 2), None, "ms")
        return answers

    def _refuse(self, context: Any, idx: int, err: InputError) -> dict[str, str]:
        """This request's own 4xx: its status, its JSON body, and a count in the rejection metrics."""
        context.set_response_status(err.status, HTTPStatus(err.status).phrase, idx)
        if self.monitor:
            self.monitor.rejected(err.status, err.error)
        return err.to_json()


def _log_rejection(request_id: str, err: InputError) -> None:
    # Bad input is the client's problem: one WARNING line, no traceback, and the rest of the
    # batch is answered normally.
    logger.warning(
        "request %s rejected: %d %s: %s", request_id, err.status, err.error, " ".join(err.detail.split())
    )


def _unforeseen(request_id: str) -> InputError:
    """An input the code did not foresee: still this request's own 400, but logged once with its
    traceback (an ERROR), because it marks a gap in handler.payload/preprocess to close."""
    logger.exception("request %s: unforeseen failure while reading its input", request_id)
    return InputError(
        "unprocessable_input",
        f"the server could not read this input (request id {request_id}); check it against the "
        "API in docs/serving.md, and report it if it is a valid image",
    )
