"""The inference service: a real uvicorn server on a local port, hit by a real HTTP client."""

import base64
import concurrent.futures as cf
import io
import json
import time

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import randomize_
from models.pipeline import JanusFlowPipeline
from serving.backends import TorchBackend
from serving.sampler import Sampler
from serving.service import BackgroundServer as Server
from serving.service import ServiceConfig, create_app


@pytest.fixture(scope="module")
def pipe():
    p = JanusFlowPipeline.from_config("tiny", seed=0)
    randomize_(p.model, seed=4)
    return p


def make_app(pipe, **kw):
    sampler = Sampler.from_model(pipe.model, pipe.processor, TorchBackend(pipe.model), buckets=(1, 2, 4))
    config = ServiceConfig(model="test", **{"max_wait_ms": 300, "queue_size": 16, "warm_steps": 1, **kw})
    return create_app(sampler, config)


@pytest.fixture(scope="module")
def server(pipe):
    with Server(make_app(pipe)) as s:
        yield s


def png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(url: str, text="What colour is the circle?", **kw):
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": text},
                                                      {"type": "image_url", "image_url": {"url": url}}]}], **kw}


def test_health_ready_and_concurrent_clients_are_batched(server, pipe):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").json()["buckets"] == [1, 2, 4]

    def one(i):
        return httpx.post(server.url + "/v1/images/generations", timeout=60,
                          json={"prompt": f"a red circle {i}", "num_inference_steps": 2, "seed": 100 + i,
                                "guidance_scale": 2.0, "size": "32x32"})

    with cf.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(one, range(4)))
    assert [r.status_code for r in replies] == [200] * 4
    sizes = [r.json()["data"][0]["batch_size"] for r in replies]
    assert max(sizes) > 1, sizes  # the 300 ms window put concurrent requests in one batch
    image = Image.open(io.BytesIO(base64.b64decode(replies[0].json()["data"][0]["b64_json"])))
    assert image.size == (32, 32)
    want = pipe(["a red circle 0"], num_inference_steps=2, guidance_scale=2.0, seed=[100])[0]
    assert np.abs(np.asarray(image, np.int16) - np.asarray(want, np.int16)).max() <= 1  # batching-independent
    metrics = httpx.get(server.url + "/metrics").text
    assert "janusflow_batch_size_count" in metrics and "janusflow_images_total 4.0" in metrics
    assert 'janusflow_requests_total{endpoint="images",status="200"} 4.0' in metrics


def test_n_images_and_chat_answer(server, pipe):
    r = httpx.post(server.url + "/v1/images/generations", timeout=60,
                   json={"prompt": "two squares", "n": 3, "num_inference_steps": 2, "seed": 7})
    assert r.status_code == 200 and [d["seed"] for d in r.json()["data"]] == [7, 8, 9]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    r = httpx.post(server.url + "/v1/chat/completions", json=chat_body(png_data_url(image), max_tokens=4),
                   timeout=60)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == pipe.answer(image, "What colour is the circle?",
                                                                   max_new_tokens=4)


GOOD = {"prompt": "a red circle", "num_inference_steps": 2}
BAD = [
    ({**GOOD, "prompt": ""}, 422, "prompt"),
    ({**GOOD, "prompt": "x" * 5000}, 422, "prompt"),
    ({**GOOD, "n": 0}, 422, "n"),
    ({**GOOD, "n": 99}, 422, "n"),
    ({**GOOD, "num_inference_steps": 0}, 422, "num_inference_steps"),
    ({**GOOD, "num_inference_steps": "30"}, 422, "num_inference_steps"),
    ({**GOOD, "guidance_scale": 500}, 422, "guidance_scale"),
    ({**GOOD, "size": "1024x1024"}, 422, "size"),
    ({**GOOD, "response_format": "url"}, 422, "response_format"),
    ({**GOOD, "colour": "red"}, 422, "colour"),
    ({"n": 1}, 422, "prompt"),
]


@pytest.mark.parametrize("body,status,field", BAD)
def test_bad_image_requests_are_4xx_naming_the_field(server, body, status, field):
    r = httpx.post(server.url + "/v1/images/generations", json=body, timeout=30)
    assert r.status_code == status
    error = r.json()["error"]
    assert field in error["message"] and "\n" not in error["message"]


def test_bad_bodies_and_images(server):
    post = lambda path, **kw: httpx.post(server.url + path, timeout=30, **kw)  # noqa: E731
    r = post("/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = post("/v1/images/generations", content=b"prompt=x", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = post("/v1/images/generations", json=[1, 2])
    assert r.status_code == 400
    cases = [(chat_body("data:image/png;base64,@@@"), "invalid base64"),
             (chat_body("data:image/png;base64," + base64.b64encode(b"hello").decode()), "not a decodable image"),
             (chat_body("https://example.com/x.png"), "only data URLs"),
             (chat_body(png_data_url(Image.new("RGB", (4, 4))), text=""), "question must not be empty"),
             ({"messages": []}, "role 'user'"),
             ({"messages": [{"role": "user", "content": "hi"}]}, "list of parts")]
    for body, message in cases:
        r = post("/v1/chat/completions", json=body)
        assert 400 <= r.status_code < 500 and message in r.json()["error"]["message"], (body, r.text)
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 1200, 3), dtype=np.uint8))
    r = post("/v1/chat/completions", json=chat_body(png_data_url(big)))
    assert r.status_code == 200  # a large but legal image is resized, not rejected


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=3), max_leaves=8)
FIELDS = st.fixed_dictionaries({}, optional={
    "prompt": JSONISH, "n": JSONISH, "size": JSONISH, "num_inference_steps": st.integers(-5, 3) | JSONISH,
    "guidance_scale": JSONISH, "seed": JSONISH, "response_format": JSONISH, "messages": JSONISH,
    "max_tokens": JSONISH})


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=FIELDS | JSONISH, path=st.sampled_from(["/v1/images/generations", "/v1/chat/completions"]))
def test_fuzzed_requests_never_get_a_5xx(server, body, path):
    r = httpx.post(server.url + path, content=json.dumps(body).encode(),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code < 500, r.text


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200), ctype=st.sampled_from(["application/json", "text/plain", ""]))
def test_fuzzed_bytes_never_get_a_5xx(server, raw, ctype):
    r = httpx.post(server.url + "/v1/chat/completions", content=raw, headers={"content-type": ctype}, timeout=30)
    assert 400 <= r.status_code < 500


def test_full_queue_answers_429_and_shutdown_finishes_in_flight(pipe):
    with Server(make_app(pipe, queue_size=2, max_wait_ms=1500)) as s:
        with cf.ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, s.url + "/v1/images/generations", timeout=60,
                                json={"prompt": "a", "n": 2, "num_inference_steps": 2})
            time.sleep(0.5)  # the first request waits in the queue for its batch to fill
            r = httpx.post(s.url + "/v1/images/generations", json={"prompt": "b", "num_inference_steps": 2},
                           timeout=30)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            s.server.should_exit = True  # shut down while the first is still queued
            assert first.result().status_code == 200
    assert not s.thread.is_alive()
