"""Scale-out on Ray Serve: one local CPU replica wrapping the same sampler, hit over HTTP."""

import base64
import concurrent.futures as cf
import io
import socket
import time

import httpx
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="ray[serve] is part of the test extras")


@pytest.fixture(scope="module")
def ray_service(tmp_path_factory):
    from ray import serve

    from conftest import randomize_
    from models.pipeline import JanusFlowPipeline
    from serving.ray_app import run

    pipe = JanusFlowPipeline.from_config("tiny", seed=0)
    randomize_(pipe.model, seed=6)
    model = tmp_path_factory.mktemp("ray") / "model"
    pipe.save_pretrained(model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    run(str(model), backend="torch", buckets=(1, 2, 4), replicas=1, host="127.0.0.1", port=port,
        max_wait_ms=1000, blocking=False)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    yield url, pipe
    serve.shutdown()
    ray.shutdown()


def test_ray_replica_batches_and_validates(ray_service):
    url, pipe = ray_service

    def one(i):
        return httpx.post(url + "/v1/images/generations", timeout=120,
                          json={"prompt": f"a blue square {i}", "num_inference_steps": 2, "seed": 50 + i})

    with cf.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(one, range(4)))
    assert [r.status_code for r in replies] == [200] * 4
    assert max(r.json()["data"][0]["batch_size"] for r in replies) > 1  # Ray Serve batched them
    image = Image.open(io.BytesIO(base64.b64decode(replies[2].json()["data"][0]["b64_json"])))
    want = pipe(["a blue square 2"], num_inference_steps=2, guidance_scale=2.0, seed=[52])[0]
    assert max(abs(a - b) for a, b in zip(image.tobytes(), want.tobytes())) <= 1
    bad = httpx.post(url + "/v1/images/generations", json={"prompt": "", "num_inference_steps": 2}, timeout=30)
    assert bad.status_code == 422 and "prompt" in bad.json()["error"]["message"]
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    chat = httpx.post(url + "/v1/chat/completions", timeout=120, json={"max_tokens": 3, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What colour?"}, {"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}]}]})
    assert chat.status_code == 200
    assert chat.json()["choices"][0]["message"]["content"] == pipe.answer(image, "What colour?", max_new_tokens=3)
