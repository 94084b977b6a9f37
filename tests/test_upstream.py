"""The front end (--backend): routing, failover, errors and the torch-free process, against vLLM-framed stand-ins
that generate with the tiny model (tests/upstream_standin.py). The seed-API and OpenAI tests run against a front
end too (the `serve_api` fixture); this file covers what only a front end has."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import requests

from server.engine.budget import GenerationRequest
from server.upstream import UpstreamEngine, pool
from server.upstream.engine import banned_ids, completion_body
from tests.test_http import parse_sse, wait_until_idle
from tests.wine_helpers import free_port, wait_for_health

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(pool, "BACKOFF_SECONDS", 0.2)
    monkeypatch.setattr(pool, "PROBE_EVERY_SECONDS", 0.1)


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there


def front_over(urls, engine, **options) -> UpstreamEngine:
    front = UpstreamEngine(urls, reply_reserve=engine.reply_reserve, **options)
    front.attach(engine.loaded.tokenizer)
    return front


def wait_for(condition, timeout=10):
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.02)
    assert condition()


def test_health_lists_each_upstream_and_the_context_they_report(serve, serve_standin, engine):
    a, b = serve_standin(engine), serve_standin(engine, name="other-name")
    front = front_over([a.url + "/v1", b.url], engine)  # a bare host gets /v1
    try:
        server = serve(front)
        body = requests.get(server.url + "/health").json()
        assert body["status"] == "ready" and body["device"] == "upstream" and body["profile"] == "backend"
        assert body["precision"] == "chatglm2-export, other-name"
        assert body["max_context"] == engine.max_context == 256  # what the upstreams report
        assert [u["url"] for u in body["upstreams"]] == [a.url + "/v1", b.url + "/v1"]
        assert all(u["state"] == "up" and u["in_flight"] == 0 and u["max_context"] == 256 for u in body["upstreams"])
        assert body["queue"] == 0 and body["prompt_cache"] is None
    finally:
        front.close()


def test_each_request_goes_to_the_least_busy_upstream(serve, serve_standin, engine_for, slow_model):
    a, b = serve_standin(engine_for(slow_model)), serve_standin(engine_for(slow_model))
    front = front_over([a.url, b.url], a.engine)
    try:
        server = serve(front)
        first = requests.post(server.url + "/stream", json={"query": "a", "max_length": 200}, stream=True)
        wait_for(lambda: len(a.standin.requests) + len(b.standin.requests) == 1)
        second = requests.post(server.url + "/stream", json={"query": "b", "max_length": 200}, stream=True)
        wait_for(lambda: len(a.standin.requests) + len(b.standin.requests) == 2)
        assert len(a.standin.requests) == len(b.standin.requests) == 1  # the idle one took the second
        health = requests.get(server.url + "/health").json()
        assert [u["in_flight"] for u in health["upstreams"]] == [1, 1]
        assert sorted(health["running_jobs"]) == sorted([first.headers["X-Job-Id"], second.headers["X-Job-Id"]])
        requests.post(server.url + "/interrupt")
        assert parse_sse(first.content)[-1][1]["finish_reason"] == "interrupted"
        assert parse_sse(second.content)[-1][1]["finish_reason"] == "interrupted"
        wait_until_idle(a.engine)
        wait_until_idle(b.engine)
        wait_for(lambda: front.pool.in_flight == 0)
    finally:
        front.close()


def test_a_failed_upstream_is_skipped_and_used_again_once_it_answers(serve, serve_standin, engine):
    port = free_port()
    live = serve_standin(engine)
    front = front_over([f"http://127.0.0.1:{port}/v1", live.url + "/v1"], engine)
    try:
        server = serve(front)
        health = requests.get(server.url + "/health").json()
        down, up = health["upstreams"]
        assert health["status"] == "ready" and down["state"] == "down" and up["state"] == "up"
        assert "does not answer" in down["error"] and down["retry_in"] is not None
        for i in range(3):  # every request is answered by the live one
            r = requests.post(server.url + "/stream", json={"query": f"q{i}", "max_length": 30, "temperature": 0})
            assert parse_sse(r.content)[-1][1]["finish_reason"] == "length"
        assert len(live.standin.requests) == 3
        revived = serve(engine, app=live.standin.app(), port=port)  # the engine comes back on its port
        wait_for(lambda: front.pool.upstreams[0].state == "up")
        assert requests.get(server.url + "/health").json()["upstreams"][0]["error"] is None
        assert revived.url.endswith(str(port))
    finally:
        front.close()


def test_no_upstream_answering_is_a_503_with_retry_after_and_tokenize_still_works(serve, engine):
    front = front_over([dead_url(), dead_url()], engine)
    try:
        server = serve(front)
        health = requests.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        assert "no upstream answers" in health.json()["error"]
        assert all(u["state"] == "down" for u in health.json()["upstreams"])
        r = requests.post(server.url + "/stream", json={"query": "hi"})
        assert r.status_code == 503 and r.headers["Retry-After"] == "5"
        assert r.json()["success"] is False and "no upstream answers" in r.json()["message"]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
        assert err.value.status_code == 503 and err.value.body["code"] == "model_not_ready"
        r = requests.post(server.url + "/tokenize", json={"text": "hello 你好"})  # the tokenizer is local
        assert r.status_code == 200 and r.json()["len"] == len(engine.loaded.tokenizer.pieces("hello 你好"))
    finally:
        front.close()


def test_an_upstream_failing_midway_is_an_error_event_and_a_503(serve, serve_standin, engine):
    upstream = serve_standin(engine)
    upstream.standin.fail_midway = 2
    front = front_over([upstream.url], engine)
    try:
        server = serve(front)
        events = parse_sse(requests.post(server.url + "/stream", json={"query": "hi", "max_length": 60}).content)
        name, error = events[-1]
        assert name == "error" and "stand-in engine failed" in error["message"]
        assert [n for n, _ in events[:-1]] == [None, None]  # what came before the failure was streamed
        r = requests.post(server.url + "/generate", json={"query": "hi", "max_length": 60})
        assert r.status_code == 503 and r.headers["Retry-After"] == "5" and "stand-in engine failed" in r.text
        wait_until_idle(engine)
    finally:
        front.close()


@pytest.mark.parametrize("status, expected", [(400, 502), (503, 503), (429, 429)])
def test_upstream_http_errors_become_the_projects_errors(serve, serve_standin, engine, status, expected):
    upstream = serve_standin(engine)
    upstream.standin.status = status
    front = front_over([upstream.url], engine)
    try:
        server = serve(front)
        r = requests.post(server.url + "/stream", json={"query": "hi"})
        assert r.status_code == expected and r.json()["success"] is False
        if expected == 502:
            assert "refused the request" in r.json()["message"] and f"answered {status}" in r.json()["message"]
        else:
            assert r.headers["Retry-After"] == "5"
        r = requests.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == expected and set(r.json()["error"]) == {"message", "type", "param", "code"}
    finally:
        front.close()


def test_an_upstream_that_takes_only_text_gets_the_prompt_as_text(serve, serve_standin, engine):
    upstream = serve_standin(engine, token_ids=False)
    front = front_over([upstream.url], engine)
    try:
        server = serve(front)
        body = {"query": "你好", "history": [["hi", "hello"]], "answer_prefix": "好的", "max_length": 80,
                "temperature": 0}
        reply = parse_sse(requests.post(server.url + "/stream", json=body).content)[-2][1][0]
        expected = engine.submit(GenerationRequest(query="你好", history=[("hi", "hello")], answer_prefix="好的",
                                                   max_length=80, temperature=0)).wait()
        assert reply == expected.text
        prompts = [r["prompt"] for r in upstream.standin.requests]
        assert isinstance(prompts[0], list) and prompts[1] == "[gMASK]sop[Round 1]\n\n问：hi\n\n答：hello\n\n" \
                                                             "[Round 2]\n\n问：你好\n\n答：好的"
        requests.post(server.url + "/stream", json=body)
        assert isinstance(upstream.standin.requests[2]["prompt"], str)  # learned once
        assert requests.get(server.url + "/health").json()["upstreams"][0]["token_ids"] is False
    finally:
        front.close()


def test_completion_body_maps_the_fitted_prompt_and_sampling(engine):
    from server.engine import Job
    from server.upstream.pool import Upstream

    job = Job(request=GenerationRequest(query="q", temperature=0, top_p=0.3, seed=2**64 - 1, stop=["\n\n"]),
              prompt=engine.fit(GenerationRequest(query="q", max_new_tokens=7)))
    tok = engine.loaded.tokenizer
    specials = banned_ids(tok, None)  # vLLM does not say its vocabulary's size: the five special tokens
    assert list(specials) == list(tok.special_ids.values()) and tok.eos_id not in specials
    body = completion_body(Upstream("http://x/v1", model="m"), job, specials)
    assert body == {"model": "m", "prompt": job.prompt.ids, "max_tokens": 7, "temperature": 0.0, "top_p": 1.0,
                    "stream": True, "stream_options": {"include_usage": True},
                    "logit_bias": {str(i): -100 for i in specials}, "seed": 2**63 - 1, "stop": ["\n\n"]}
    padded = banned_ids(tok, 448)  # llama-server says n_vocab: its padding rows are banned too, as locally
    assert padded == list(range(tok.first_special_id, 448))
    sampled = Job(request=GenerationRequest(query="q", temperature=0.8, top_p=0.7), prompt=job.prompt)
    assert completion_body(Upstream("http://x/v1"), sampled, padded, text="[gMASK]sop...") == {
        "model": "chatglm2-6b", "prompt": "[gMASK]sop...", "max_tokens": 7, "temperature": 0.8, "top_p": 0.7,
        "stream": True, "stream_options": {"include_usage": True}, "logit_bias": {str(i): -100 for i in padded}}


def test_too_many_in_flight_is_busy(serve, serve_standin, engine_for, slow_model):
    upstream = serve_standin(engine_for(slow_model))
    front = front_over([upstream.url], upstream.engine, max_batch=1, max_queue=0)
    try:
        server = serve(front)
        running = requests.post(server.url + "/stream", json={"query": "a", "max_length": 200}, stream=True)
        wait_for(lambda: front.running_id is not None)
        r = requests.post(server.url + "/stream", json={"query": "b"})
        assert r.status_code == 429 and "busy" in r.json()["message"]
        requests.post(server.url + "/interrupt")
        running.close()
    finally:
        front.close()


def test_the_tokenizer_alone_is_downloaded_for_a_front_end(tmp_path):
    from server.config import Settings
    from server.startup import load_tokenizer_for
    from tests.checkpoint_factory import write_checkpoint
    from tests.fake_hub import FakeHub

    hub = FakeHub(write_checkpoint(tmp_path / "source"))
    try:
        folder = tmp_path / "front" / "chatglm2-6b"
        tokenizer = load_tokenizer_for(Settings(model_dir=folder, mirror=hub.url, backend="http://x/v1"))
        assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.model"]
        assert tokenizer.decode(tokenizer.sp.encode("hello")) == "hello"
        fetched = {e["path"].rsplit("/", 1)[-1] for e in hub.log if "/resolve/" in e["path"]}
        assert fetched == {"tokenizer.model"}
    finally:
        hub.close()


def test_the_front_end_process_runs_without_torch(tmp_path, serve_standin, engine, tiny_checkpoint):
    """`python -m server --backend URL` with only tokenizer.model, in a Python where torch, transformers,
    accelerate and bitsandbytes cannot be imported, answers like the local server."""
    blocked = tmp_path / "blocked"
    for name in ("torch", "transformers", "accelerate", "bitsandbytes", "safetensors"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    folder = tmp_path / "tokenizer-only"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes((tiny_checkpoint / "tokenizer.model").read_bytes())
    upstream = serve_standin(engine)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{blocked}{os.pathsep}{ROOT}"}
    proc = subprocess.Popen([sys.executable, "-m", "server", "--backend", upstream.url + "/v1", "--model-dir",
                             str(folder), "--port", str(port), "--offline", "--no-chatlog"], cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_for_health(url, proc, lambda body: body["status"] in ("ready", "error"), timeout=60)
        assert health["status"] == "ready", health
        body = {"query": "你好", "max_length": 60, "temperature": 0}
        events = parse_sse(requests.post(url + "/stream", json=body, timeout=60).content)
        expected = engine.submit(GenerationRequest(query="你好", max_length=60, temperature=0)).wait()
        assert events[-2][1][0] == expected.text and events[-1][1]["finish_reason"] == "length"
        r = requests.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "你好"}], "max_tokens": 10, "temperature": 0})
        assert r.json()["usage"]["completion_tokens"] == 10
    finally:
        proc.kill()
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert "Traceback" not in out, out
    assert json.loads(json.dumps(health))["upstreams"][0]["model"] == "chatglm2-export"


def test_a_client_that_leaves_closes_the_upstream_stream(serve, serve_standin, engine_for, slow_model):
    upstream = serve_standin(engine_for(slow_model))
    front = front_over([upstream.url], upstream.engine)
    try:
        server = serve(front)
        done = threading.Event()

        def leave():
            with requests.post(server.url + "/v1/chat/completions", stream=True, json={
                    "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 200}) as r:
                next(line for line in r.iter_lines() if b'"content":"' in line and b'"content":""' not in line)
            done.set()

        thread = threading.Thread(target=leave)
        thread.start()
        thread.join(30)
        assert done.is_set()
        wait_until_idle(front)
        wait_until_idle(upstream.engine)  # the upstream stopped generating for nobody
        assert front.pool.in_flight == 0
    finally:
        front.close()


def test_terminal_chat_on_a_front_end(serve_standin, engine, tiny_checkpoint):
    upstream = serve_standin(engine)
    proc = subprocess.run(
        [sys.executable, "-m", "server", "chat", "--backend", upstream.url, "--model-dir", str(tiny_checkpoint),
         "--offline", "--max-context", "128"],
        input="你好\nexit\n", capture_output=True, text=True, encoding="utf-8", timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("答 / ChatGLM2: ") == 1 and "[length]" in proc.stdout
    assert len(upstream.standin.requests) == 1 and upstream.standin.requests[0]["prompt"][:2] == \
        engine.loaded.tokenizer.prompt_prefix()
    assert upstream.standin.requests[0]["max_tokens"] == 128 - len(upstream.standin.requests[0]["prompt"])


LLAMA_SERVER = os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")
LLAMA_CPP = os.environ.get("LLAMA_CPP_DIR")  # llama.cpp's source tree: its convert_hf_to_gguf.py makes the GGUF


@pytest.mark.skipif(not (LLAMA_SERVER and LLAMA_CPP), reason="optional: set LLAMA_SERVER (a built llama-server) "
                    "and LLAMA_CPP_DIR (its source tree) to run the front end against real llama.cpp")
def test_a_real_llama_server_upstream_answers_like_the_local_model(tmp_path, serve, engine, tiny_checkpoint):
    """The tiny checkpoint as a float32 GGUF in llama.cpp's own server: through the front end, greedy replies
    equal the local float32 model's, token for token (llama.cpp's chatglm graph computes the same logits)."""
    subprocess.run([sys.executable, str(ROOT / "bench" / "gguf_chatglm2.py"), "--llama-cpp", LLAMA_CPP, "--model",
                    str(tiny_checkpoint), "--out", str(tmp_path), "--types", "", "--outtype", "f32"], check=True,
                   capture_output=True, timeout=300)
    port = free_port()
    proc = subprocess.Popen([LLAMA_SERVER, "-m", str(tmp_path / "chatglm2-f32.gguf"), "--host", "127.0.0.1",
                             "--port", str(port), "-c", str(2 * engine.max_context), "-np", "2", "-t", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    front = None
    try:
        def answers():
            try:
                return requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok
            except requests.ConnectionError:
                return proc.poll() is not None  # stop waiting for a server that exited

        wait_for(answers, timeout=60)
        assert proc.poll() is None, "llama-server exited"
        front = front_over([f"http://127.0.0.1:{port}/v1"], engine)
        assert front.pool.upstreams[0].max_model_len == engine.max_context  # per slot: 512 / 2
        server = serve(front)
        for query, history in [("你好", []), ("hello world", [("hi", "hello")])]:
            expected = engine.submit(GenerationRequest(query=query, history=history, max_length=80,
                                                       temperature=0)).wait()
            body = {"query": query, "history": [list(p) for p in history], "max_length": 80, "temperature": 0}
            *updates, (_, done) = parse_sse(requests.post(server.url + "/stream", json=body).content)
            assert updates[-1][1][0] == expected.text
            assert done["completion_tokens"] == expected.completion_tokens
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        result = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "你好"}],
                                                temperature=0, max_tokens=20)
        expected = engine.submit(GenerationRequest(query="你好", max_new_tokens=20, temperature=0)).wait()
        assert result.choices[0].message.content == expected.text and result.usage.completion_tokens == 20
        assert front.pool.upstreams[0].accepts_ids is True
    finally:
        if front:
            front.close()
        proc.kill()
        proc.wait(10)


def test_a_backend_that_is_no_url_is_one_line_at_start(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "server", "--backend", "gpu-host:8000", "--model-dir",
                           str(tmp_path), "--offline"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "CHATGLM2_SETTINGS_FILE": str(tmp_path / "none.ini")})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--backend" in proc.stderr and "is not an http(s) URL such as http://127.0.0.1:8000/v1" in proc.stderr
