"""The service's request schemas and their validation, shaped like the OpenAI images and chat APIs.

Every bad request becomes an ApiError with an HTTP status and a one-line message naming the field;
the service answers it as {"error": {"message", "type", "param"}} and never as a 5xx.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
import uuid
from dataclasses import dataclass

from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, *, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param}}


@dataclass(frozen=True)
class Limits:
    image_size: int            # the model's generation size: the one `size` accepted
    max_n: int = 8
    max_prompt_chars: int = 1000
    max_steps: int = 100
    max_guidance: float = 20.0
    max_new_tokens: int = 256
    max_image_bytes: int = 8 << 20
    max_image_pixels: int = 4096 * 4096
    max_body_bytes: int = 16 << 20


class ImagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str
    n: int = 1
    size: str | None = None
    num_inference_steps: int = 30
    guidance_scale: float | int = 2.0
    seed: int | None = None
    response_format: str = "b64_json"
    model: str | None = None
    user: str | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    messages: list[dict]
    max_tokens: int | None = None
    model: str | None = None


def parse_json(raw: bytes, content_type: str | None, limits: Limits) -> dict:
    if len(raw) > limits.max_body_bytes:
        raise ApiError(413, f"request body is {len(raw)} bytes, over the {limits.max_body_bytes} limit")
    if not content_type or content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, f"content type must be application/json, got {content_type or 'none'!r}")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON body: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the JSON body must be an object, got {type(data).__name__}")
    return data


def _model(cls, data: dict):
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "body"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise ApiError(422, f"{field}: {msg}", field) from None


def images_request(data: dict, limits: Limits) -> ImagesRequest:
    req = _model(ImagesRequest, data)
    if not req.prompt.strip():
        raise ApiError(422, "prompt: must not be empty", "prompt")
    if len(req.prompt) > limits.max_prompt_chars:
        raise ApiError(422, f"prompt: {len(req.prompt)} characters, over the {limits.max_prompt_chars} limit",
                       "prompt")
    if not 1 <= req.n <= limits.max_n:
        raise ApiError(422, f"n: must be between 1 and {limits.max_n}, got {req.n}", "n")
    if not 1 <= req.num_inference_steps <= limits.max_steps:
        raise ApiError(422, f"num_inference_steps: must be between 1 and {limits.max_steps}, "
                            f"got {req.num_inference_steps}", "num_inference_steps")
    g = float(req.guidance_scale)
    if not (g == g and 1.0 <= g <= limits.max_guidance):  # g == g rejects NaN
        raise ApiError(422, f"guidance_scale: must be between 1 and {limits.max_guidance}, got {g}",
                       "guidance_scale")
    wanted = f"{limits.image_size}x{limits.image_size}"
    if req.size is not None and req.size != wanted:
        raise ApiError(422, f"size: this model generates {wanted} only, got {req.size!r}", "size")
    if req.response_format != "b64_json":
        raise ApiError(422, f"response_format: only 'b64_json' is supported, got {req.response_format!r}",
                       "response_format")
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise ApiError(422, f"seed: must be between 0 and 2**63 - 1, got {req.seed}", "seed")
    return req


def decode_image_url(url: str, limits: Limits) -> Image.Image:
    """A data URL (data:image/...;base64,...) -> RGB image, with size limits."""
    param = "messages.content.image_url.url"
    if not url.startswith("data:"):
        raise ApiError(422, f"{param}: only data URLs (data:image/png;base64,...) are accepted", param)
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64") or not head[5:].startswith("image/"):
        raise ApiError(422, f"{param}: expected data:image/<type>;base64,<data>", param)
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise ApiError(413, f"{param}: image over the {limits.max_image_bytes} byte limit", param)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{param}: invalid base64", param) from None
    try:
        image = Image.open(io.BytesIO(raw))  # lazy: reads the header, so the size check comes first
        if image.width * image.height > limits.max_image_pixels:
            raise ApiError(413, f"{param}: {image.width}x{image.height} pixels, over the limit", param)
        image.load()
    except ApiError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        raise ApiError(422, f"{param}: not a decodable image", param) from None
    return image.convert("RGB")


def chat_request(data: dict, limits: Limits) -> tuple[Image.Image, str, int]:
    """(image, question, max_tokens) from the last user message: one image and text parts."""
    req = _model(ChatRequest, data)
    users = [m for m in req.messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ApiError(422, "messages: needs a message with role 'user'", "messages")
    content = users[-1].get("content")
    if not isinstance(content, list):
        raise ApiError(422, "messages.content: must be a list of parts (text and one image_url)",
                       "messages.content")
    texts, images = [], []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
            raise ApiError(422, "messages.content: each part must be {type: text|image_url, ...}",
                           "messages.content")
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(422, "messages.content.text: must be a string", "messages.content.text")
            texts.append(part["text"])
        else:
            url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else None
            if not isinstance(url, str):
                raise ApiError(422, "messages.content.image_url.url: must be a string",
                               "messages.content.image_url.url")
            images.append(url)
    if len(images) != 1:
        raise ApiError(422, f"messages.content: needs exactly one image_url part, got {len(images)}",
                       "messages.content")
    question = " ".join(t.strip() for t in texts).strip()
    if not question:
        raise ApiError(422, "messages.content.text: the question must not be empty", "messages.content.text")
    if len(question) > limits.max_prompt_chars:
        raise ApiError(422, f"messages.content.text: over the {limits.max_prompt_chars} character limit",
                       "messages.content.text")
    max_tokens = 64 if req.max_tokens is None else req.max_tokens
    if not 1 <= max_tokens <= limits.max_new_tokens:
        raise ApiError(422, f"max_tokens: must be between 1 and {limits.max_new_tokens}", "max_tokens")
    return decode_image_url(images[0], limits), question, max_tokens


# -- responses (shared by the FastAPI service and the Ray Serve deployment) --------------------------
def image_rows(req: ImagesRequest):
    """The sampler rows of an images request: n rows with consecutive seeds (random if none given)."""
    from serving.sampler import ImageRequest

    seed = req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little")
    return [ImageRequest(req.prompt, seed=seed + i, guidance=float(req.guidance_scale),
                         steps=req.num_inference_steps) for i in range(req.n)]


def images_response(req: ImagesRequest, rows: list, results: list) -> dict:
    """OpenAI images response; a row that came back non-finite fails the request (500, counted)."""
    failed = [r.error for r in results if r.image is None]
    if failed:
        raise ApiError(500, f"{len(failed)} of {len(rows)} image(s) failed: {failed[0]}")
    data = []
    for row, r in zip(rows, results):
        buf = io.BytesIO()
        r.image.save(buf, format="PNG")
        data.append({"b64_json": base64.b64encode(buf.getvalue()).decode(), "revised_prompt": req.prompt,
                     "seed": row.seed, "batch_size": r.batch_size, "bucket": r.bucket})
    return {"created": int(time.time()), "data": data}


def chat_response(processor, question: str, answer: str, model: str | None) -> dict:
    prompt_tokens = len(processor.encode(question))
    completion_tokens = len(processor.encode(answer, bos=False))
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
            "created": int(time.time()), "model": model or "janusflow",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
