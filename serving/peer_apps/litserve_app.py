"""The LitServe peer of `make bench-peers`: the exported model.pt behind LitServe's four-method API.
It runs from the peer venv (serving/peers.py starts it there, one server per configuration):

    .venv-peers/bin/python serving/peer_apps/litserve_app.py --model-dir artifacts/model --port 8000 \
        --workers 1 --max-batch-size 8 --batch-timeout-ms 5

POST /predict takes the PNG as a multipart/form-data file in the field "request" (LitServe reads a
form or JSON, not a raw body) and answers the top-5 classes with their probabilities. Torch takes
its thread count from OMP_NUM_THREADS, which the benchmark sets (serving.peers.Setup.peer_torch_threads).
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotation at runtime,
# and only the class Request itself (not the string "Request") makes it parse the form.
import argparse
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
import torch
from fastapi import Request
from PIL import Image

TOP_K = 5
FIELD = "request"  # the form field that carries the image


class Model:
    """model.pt with the input size, normalisation and class names of its model_meta.json."""

    def __init__(self, model_dir: Path) -> None:
        meta = json.loads((model_dir / "model_meta.json").read_text(encoding="utf-8"))
        self.spec = meta["preprocess"]
        self.classes: list[str] = meta["classes"]
        self.module = torch.jit.load(str(model_dir / "model.pt"), map_location="cpu").eval()

    def decode(self, data: bytes) -> torch.Tensor:
        """Image bytes -> a normalised (1, H, W) float tensor."""
        size = (self.spec["width"], self.spec["height"])
        image = Image.open(io.BytesIO(data)).convert("L").resize(size, Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        return ((pixels - self.spec["mean"]) / self.spec["std"]).unsqueeze(0)

    def top_k(self, batch: torch.Tensor) -> list[list[dict[str, Any]]]:
        """(N, 1, H, W) -> for each image, its TOP_K classes, most likely first."""
        with torch.inference_mode():
            probs = torch.softmax(self.module(batch), dim=-1)
        values, indices = probs.topk(TOP_K)
        return [
            [{"label": self.classes[i], "index": i, "probability": p} for p, i in zip(ps, ids, strict=True)]
            for ps, ids in zip(values.tolist(), indices.tolist(), strict=True)
        ]


class FashionAPI(ls.LitAPI):
    """LitServe's four methods around Model. At module level: LitServe spawns its workers, which
    unpickle the API by importing this module."""

    def __init__(self, model_dir: Path, **batching: Any) -> None:
        super().__init__(**batching)
        self.model_dir = model_dir

    def setup(self, device: str) -> None:
        self.model = Model(self.model_dir)

    def decode_request(self, request: Request) -> torch.Tensor:
        # LitServe hands over the parsed form: field name -> value (an upload for a file).
        return self.model.decode(request[FIELD].file.read())

    def predict(self, x: torch.Tensor) -> Any:
        if x.dim() == 3:  # batching off: one (1, H, W) image
            return self.model.top_k(x.unsqueeze(0))[0]
        return self.model.top_k(x)  # a stacked (N, 1, H, W) batch: one answer per image

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output: list[dict[str, Any]]) -> dict[str, Any]:
        return {"predictions": output}


def serve(model_dir: Path, port: int, workers: int, max_batch_size: int, batch_timeout_s: float) -> None:
    api = FashionAPI(model_dir, max_batch_size=max_batch_size, batch_timeout=batch_timeout_s)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=workers)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="model.pt + model_meta.json")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="inference worker processes")
    parser.add_argument("--max-batch-size", type=int, default=1)
    parser.add_argument("--batch-timeout-ms", type=float, default=0.0, help="wait for a batch to fill")
    args = parser.parse_args(argv)
    if not (args.model_dir / "model.pt").is_file():
        print(f"error: {args.model_dir}/model.pt not found: pass the export directory", file=sys.stderr)
        return 2
    serve(args.model_dir, args.port, args.workers, args.max_batch_size, args.batch_timeout_ms / 1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
