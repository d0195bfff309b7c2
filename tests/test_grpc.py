"""gRPC inference and management against a real TorchServe, with a real gRPC client.

    python -m pytest tests/test_grpc.py -q

The client's stubs are generated at test time by grpcio-tools from the project's own minimal protos
(serving/proto/), so the test sees what a user who follows docs/serving.md sees. The server runs the
local config (token authorization on, keys sent as `authorization: Bearer <key>` metadata) with the
random-weights archive batching 8 requests (conftest's `served`, the server test_hostile uses too),
and answers are checked against the export offline.
"""

from __future__ import annotations

import base64
import importlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_tools import protoc

from serving import MODEL_NAME
from serving.images import encode as png_bytes
from serving.server import HOST, read_record
from tests.conftest import BATCH_SIZE, Served

PROTO_DIR = Path(__file__).resolve().parent.parent / "serving" / "proto"
GOOD = [
    png_bytes(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)) for seed in range(8)
]
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ModuleType]]:
    """inference_pb2(_grpc) and management_pb2(_grpc), generated now from serving/proto/."""
    out = tmp_path_factory.mktemp("grpc_stubs")
    protos = sorted(str(path) for path in PROTO_DIR.glob("*.proto"))
    well_known = Path(protoc.__file__).parent / "_proto"  # google/protobuf/empty.proto
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}"]
    assert protoc.main([*args, *protos]) == 0, f"protoc failed on {protos}"
    names = ["inference_pb2", "inference_pb2_grpc", "management_pb2", "management_pb2_grpc"]
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(out))  # the generated *_pb2_grpc modules import their *_pb2 by name
        yield {name: importlib.import_module(name) for name in names}


@pytest.fixture(scope="module")
def channels(served: Served) -> Iterator[dict[str, grpc.Channel]]:
    ports = read_record(served.instance).ports
    opened = {
        api: grpc.insecure_channel(f"{HOST}:{ports[f'grpc_{api}']}") for api in ("inference", "management")
    }
    yield opened
    for channel in opened.values():
        channel.close()


@pytest.fixture(scope="module")
def inference(stubs: dict[str, ModuleType], channels: dict[str, grpc.Channel]) -> Any:
    return stubs["inference_pb2_grpc"].InferenceAPIsServiceStub(channels["inference"])


def bearer(key: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def predict(
    stubs: dict[str, ModuleType], inference: Any, served: Served, inputs: dict[str, bytes]
) -> grpc.Future:
    request = stubs["inference_pb2"].PredictionsRequest(model_name=MODEL_NAME, input=inputs)
    return inference.Predictions.future(
        request, metadata=bearer(served.client.key("inference")), timeout=TIMEOUT
    )


def predict_alone(
    stubs: dict[str, ModuleType], inference: Any, served: Served, inputs: dict[str, bytes]
) -> dict[str, Any]:
    """The answer to `inputs`, sent with good images that fill its batch: the server waits up to
    BATCH_DELAY_MS (4 s) for a batch to fill, so a lone request would wait that long."""
    future = predict(stubs, inference, served, inputs)
    fillers = [predict(stubs, inference, served, {"data": image}) for image in GOOD[: BATCH_SIZE - 1]]
    for filler in fillers:
        assert "predictions" in json.loads(filler.result().prediction)
    return json.loads(future.result().prediction)


def like_offline(answer: dict[str, Any], probabilities: torch.Tensor, k: int = 5) -> bool:
    """Top-k of the export's probabilities, in order, within float noise of the frozen model."""
    predictions = answer.get("predictions", [])
    expected = torch.argsort(probabilities, descending=True)[:k].tolist()
    return [p["index"] for p in predictions] == expected and all(
        abs(p["probability"] - float(probabilities[p["index"]])) < 1e-4 for p in predictions
    )


@pytest.mark.serving
def test_ping_answers_healthy_with_the_inference_key(stubs, inference, served: Served) -> None:
    reply = inference.Ping(
        stubs["inference_pb2"].google_dot_protobuf_dot_empty__pb2.Empty(),
        metadata=bearer(served.client.key("inference")),
        timeout=TIMEOUT,
    )
    assert json.loads(reply.health)["status"] == "Healthy"


@pytest.mark.serving
@pytest.mark.parametrize("metadata", [[], [("authorization", "Bearer wrong")], "management"])
def test_calls_without_the_right_key_are_refused(stubs, inference, served: Served, metadata) -> None:
    if metadata == "management":
        metadata = bearer(served.client.key("management"))  # the other API's key
    request = stubs["inference_pb2"].PredictionsRequest(model_name=MODEL_NAME, input={"data": GOOD[0]})
    with pytest.raises(grpc.RpcError) as refused:
        inference.Predictions(request, metadata=metadata, timeout=TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "Token Authorization failed" in refused.value.details()


@pytest.mark.serving
@pytest.mark.parametrize(
    ("inputs", "k"),
    [
        ({"data": GOOD[1]}, 5),
        ({"data": GOOD[1], "topk": b"3"}, 3),
        ({"data": json.dumps({"data": base64.b64encode(GOOD[1]).decode(), "topk": 2}).encode()}, 2),
        ({"file": GOOD[1], "k": b"10"}, 10),
    ],
    ids=["raw-image", "topk", "json-base64", "file-field-and-k"],
)
def test_predictions_answer_like_rest(
    stubs, inference, served: Served, offline: Callable[[bytes], torch.Tensor], inputs, k
) -> None:
    answer = predict_alone(stubs, inference, served, inputs)
    assert like_offline(answer, offline(GOOD[1]), k), answer


@pytest.mark.serving
def test_a_bad_image_beside_good_ones_gets_its_own_error_with_status_ok(
    stubs, inference, served: Served, offline: Callable[[bytes], torch.Tensor]
) -> None:
    # Eight concurrent calls fill one batch (batch_size 8): the bad one must not fail the others.
    bodies: list[dict[str, bytes]] = [{"data": image} for image in GOOD[: BATCH_SIZE - 1]]
    bodies.insert(3, {"data": b"not an image at all"})
    futures = [predict(stubs, inference, served, inputs) for inputs in bodies]
    answers = [json.loads(future.result().prediction) for future in futures]  # all status OK
    bad = answers.pop(3)
    assert bad["error"] == "unsupported_image" and bad["detail"], bad
    assert [like_offline(answer, offline(image)) for answer, image in zip(answers, GOOD, strict=False)] == [
        True
    ] * (BATCH_SIZE - 1)


@pytest.mark.serving
def test_a_request_without_an_image_names_the_input_key(stubs, inference, served: Served) -> None:
    answer = predict_alone(stubs, inference, served, {"picture": GOOD[0]})
    assert answer["error"] == "empty_body" and 'input["data"]' in answer["detail"], answer


@pytest.mark.serving
@pytest.mark.parametrize("key", [None, "inference"])
def test_register_model_is_refused_without_the_management_key(
    stubs, channels: dict[str, grpc.Channel], served: Served, key: str | None
) -> None:
    management = stubs["management_pb2_grpc"].ManagementAPIsServiceStub(channels["management"])
    request = stubs["management_pb2"].RegisterModelRequest(
        url=f"{MODEL_NAME}.mar", model_name="intruder", initial_workers=1, synchronous=True
    )
    metadata = [] if key is None else bearer(served.client.key(key))
    with pytest.raises(grpc.RpcError) as refused:
        management.RegisterModel(request, metadata=metadata, timeout=TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert [model["modelName"] for model in served.client.models()] == [MODEL_NAME]
