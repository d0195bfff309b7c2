"""Turn one TorchServe request into image bytes and a top-k: every payload format the API accepts.

Pure functions; the handler calls `parse_request` once per request of a batch:

    >>> req = parse_request({"body": png_bytes}, {"X-Top-K": "3"}, num_classes=10)
    >>> req.top_k, len(req.image)
    (3, 1234)

How TorchServe 0.12 hands a request to the handler (read in ts/protocol/otf_message_handler.py and
ts/service.py, checked against a real server):

* A request is a dict of "parameters" by name. A plain body is the one parameter "body": bytes
  (a bytearray) for binary content types or none; `str` for text/*; the decoded JSON value for
  application/json (charset parameters are stripped by the frontend first). JSON the worker cannot
  parse, or any body when TS_DECODE_INPUT_REQUEST=false, arrives as bytes.
* multipart/form-data: one parameter per form field, every value bytes. File fields carry their
  content type in the per-field header entry (`headers[name] == {"content-type": "image/png"}`);
  text fields carry "".
* application/x-www-form-urlencoded bodies (what `curl --data-binary` sends unless told otherwise)
  are split into form fields by the frontend, which destroys a binary image, so they are refused.
* Query-string parameters are dropped on /predictions/{model}; on /invocations?model_name= and
  /{model}/predict they arrive as bytes parameters, indistinguishable from form text fields.
* gRPC (`InferenceAPIsService.Predictions`): each entry of the request's `input` map is a
  parameter of that name with no content type, and there are no HTTP headers; so the image is the
  parameter "data" (or "file"/"image"), and k the parameter "topk"/"k".
* `context.get_all_request_header(idx)` mixes those per-parameter dicts with the HTTP headers, and
  the HTTP header names keep the client's spelling (`X-Top-K` or `x-top-k`), so lookups here are
  case-insensitive.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from handler.preprocess import InputError

DEFAULT_TOP_K = 5
TOP_K_HEADER = "X-Top-K"
# Request parameters (query string or form text field) and JSON keys that carry k, in precedence order.
TOP_K_PARAMS = ("topk", "k")
# When a multipart request carries several files, the image is the field with the first of these names.
IMAGE_FIELDS = ("data", "file", "image")

# The request JSON is one flat object, {"data": "<base64>", "topk": 3}: anything nested deeper, or
# with more than this much outside its strings, is refused before it is parsed, so no JSON costs
# more than a scan of its bytes (deep nesting would overflow the parser's stack; millions of tiny
# arrays would take hundreds of MB).
MAX_JSON_DEPTH = 8
MAX_JSON_SKELETON = 4096  # bytes of a JSON text outside its strings
MAX_JSON_NODES = 256  # values in a JSON document that the worker already parsed

_SEND_HINT = (
    "send the image bytes as the body (Content-Type: application/octet-stream or image/*), "
    'as a multipart file field (curl -F "data=@shirt.png"), as JSON {"data": "<base64>"}, '
    'or over gRPC as input["data"]'
)
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SHOW = reprlib.Repr()  # bounded in depth and length, whatever a client nests or sends
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong = 2, 30, 30, 30
_DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+;base64,", re.IGNORECASE)
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


@dataclass(frozen=True)
class ParsedRequest:
    """What the model needs from one request."""

    image: bytes
    top_k: int


def header(headers: Mapping[str, Any], name: str) -> str | None:
    """Case-insensitive HTTP header lookup in TorchServe's per-request header dict."""
    wanted = name.lower()
    for key, value in headers.items():
        # dict values are TorchServe's per-parameter entries, not HTTP headers
        if key.lower() == wanted and isinstance(value, str):
            return value
    return None


def media_type(content_type: str | None) -> str:
    """'Multipart/Form-Data; boundary=x' -> 'multipart/form-data'; missing -> ''."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode_base64(text: str) -> bytes:
    """Standard or URL-safe base64, with or without padding, line breaks or a data: URL prefix."""
    compact = "".join(_DATA_URL.sub("", text.strip(), count=1).split())
    compact = compact.replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError("invalid_base64", f'"data" is not valid base64: {exc}') from exc


def parse_top_k(value: Any, num_classes: int) -> int:
    """A client's k (str, bytes or JSON number) -> int in [1, num_classes]; larger k is clamped."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", errors="replace")
    given = value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):  # a str left over is refused below, quoting the client
            value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(
            "invalid_top_k",
            f"top-k must be a whole number from 1 to {num_classes} (larger values are clamped), "
            f"got {_show(given)}; set it with the {TOP_K_HEADER} header or a topk parameter",
        )
    return min(value, num_classes)


def parse_request(
    row: Mapping[str, Any], headers: Mapping[str, Any], num_classes: int, default_top_k: int = DEFAULT_TOP_K
) -> ParsedRequest:
    """One TorchServe request (`data[idx]`, `context.get_all_request_header(idx)`) -> image bytes and k.

    k comes from a `topk`/`k` request parameter or JSON key, else the X-Top-K header, else the default.
    Raises InputError (400) for a payload that does not carry an image the way the API describes.
    """
    content_type = media_type(header(headers, "Content-Type"))
    if content_type == "application/x-www-form-urlencoded":
        raise InputError(
            "unsupported_content_type",
            "application/x-www-form-urlencoded bodies are split into form fields by TorchServe, which "
            "corrupts images (curl --data-binary sends this type unless -H 'Content-Type: ...' is given); "
            + _SEND_HINT,
        )
    if content_type.startswith("multipart/"):
        image, params = _from_form(row, headers), row
    else:
        # A plain HTTP body is the parameter "body"; a gRPC request names its image in the input map.
        field = next((name for name in ("body", *IMAGE_FIELDS) if name in row), "body")
        sent_as_json = _field_content_type(headers, field) == "application/json"
        image, json_params = _from_body(row.get(field), sent_as_json)
        params = {**row, **json_params}
    k_value = next((params[name] for name in TOP_K_PARAMS if name in params), None)
    if k_value is None:
        k_value = header(headers, TOP_K_HEADER)
    top_k = default_top_k if k_value is None else parse_top_k(k_value, num_classes)
    return ParsedRequest(image=image, top_k=min(top_k, num_classes))


def _from_body(body: Any, sent_as_json: bool) -> tuple[bytes, dict[str, Any]]:
    """The "body" parameter -> (image bytes, extra parameters from a JSON object).

    `sent_as_json`: the body came as application/json, so anything but bytes is the value TorchServe
    already parsed (a JSON string then arrives as str, like a text/* body otherwise would).
    """
    if body is None or (isinstance(body, (bytes, bytearray, str)) and not body):
        raise InputError("empty_body", "the request carried no image; " + _SEND_HINT)
    if isinstance(body, str) and not sent_as_json:
        # TorchServe decoded a text/* body as UTF-8; encoding it again gives back the exact bytes.
        body = body.encode("utf-8")
    if isinstance(body, (bytes, bytearray)):
        # No image format starts with "{", so a JSON object is recognised whatever its content type.
        if not (sent_as_json or bytes(body[:64]).lstrip().startswith(b"{")):
            return bytes(body), {}
        body = parse_json(bytes(body))
    else:
        check_json_shape(body)
    if not isinstance(body, dict) or "data" not in body:
        got = f"keys {_show(sorted(body))}" if isinstance(body, dict) else f"a JSON {_json_type(body)}"
        raise InputError(
            "missing_data", f'a JSON body must be an object with the base64 image under "data", got {got}'
        )
    data = body["data"]
    if not isinstance(data, str):
        raise InputError("invalid_data", f'"data" must be a base64 string, got a JSON {_json_type(data)}')
    return decode_base64(data), {name: body[name] for name in TOP_K_PARAMS if name in body}


def parse_json(raw: bytes) -> Any:
    """A JSON request body -> its value; InputError (400) if it is not JSON or not shaped like one.

    The shape is checked on the text first (`MAX_JSON_DEPTH`, `MAX_JSON_SKELETON`), so parsing
    costs no more than the body's size.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError("invalid_json", f"the body is not valid JSON: it is not UTF-8 text ({exc})") from exc
    skeleton = _JSON_STRING.sub(b'""', raw)
    depth = deepest = 0
    for byte in skeleton[: MAX_JSON_SKELETON + 1]:
        depth += (byte in b"[{") - (byte in b"]}")
        deepest = max(deepest, depth)
    if len(skeleton) > MAX_JSON_SKELETON or deepest > MAX_JSON_DEPTH:
        raise InputError("json_too_complex", _too_complex())
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError also covers numbers over 4300 digits
        raise InputError("invalid_json", f"the body is not valid JSON: {exc}") from exc


def check_json_shape(value: Any) -> None:
    """The same bounds for JSON that TorchServe's worker parsed already (decode_input_request=true)."""
    pending, seen = [(value, 1)], 0
    while pending:
        item, depth = pending.pop()
        seen += 1
        if depth > MAX_JSON_DEPTH or seen > MAX_JSON_NODES:
            raise InputError("json_too_complex", _too_complex())
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        pending.extend((child, depth + 1) for child in children)


def _too_complex() -> str:
    return (
        f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels, or holds more than "
        f"{MAX_JSON_SKELETON} bytes outside its strings or {MAX_JSON_NODES} values; "
        'send one object, {"data": "<base64 image>", "topk": 3}'
    )


def _from_form(row: Mapping[str, Any], headers: Mapping[str, Any]) -> bytes:
    """multipart/form-data fields -> the bytes of the one file field."""
    files = [name for name in row if _field_content_type(headers, name)]
    if not files:
        raise InputError(
            "missing_file",
            f"the multipart form has no file field (fields: {sorted(row) or 'none'}); "
            'attach the image as a file, e.g. curl -F "data=@shirt.png"',
        )
    if len(files) > 1:
        named = [name for name in IMAGE_FIELDS if name in files]
        if not named:
            raise InputError(
                "ambiguous_file",
                f"the multipart form has several file fields {sorted(files)}; send one image per "
                f"request, or name its field one of {list(IMAGE_FIELDS)}",
            )
        files = named
    return _file_bytes(files[0], row[files[0]], _field_content_type(headers, files[0]))


def _file_bytes(name: str, value: Any, content_type: str) -> bytes:
    """A file field's content as bytes, whatever TorchServe's worker made of it.

    With decode_input_request=true the worker decodes text/* parts to str (encoding it again gives
    back the exact bytes) and parses application/json parts, which leaves no image bytes.
    """
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise InputError(
        "unsupported_image",
        f"the file field {_show(name)} was sent as {content_type or 'JSON'} and holds a JSON "
        f'{_json_type(value)}, not an image; attach the image file itself, e.g. curl -F "data=@shirt.png"',
    )


def _field_content_type(headers: Mapping[str, Any], field: str) -> str:
    entry = headers.get(field)
    return (entry.get("content-type") or "") if isinstance(entry, dict) else ""


def _json_type(value: Any) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    """A short repr of a client's value for an error message, bounded in size and depth."""
    text = _SHOW.repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
