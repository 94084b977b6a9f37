"""The seed HTTP API over a real waitress server on loopback, with the tiny model."""

import json
import socket
import threading
import time

import pytest
import requests

from server.engine import Engine
from server.engine.budget import GenerationRequest


def parse_sse(raw: bytes):
    """[(event name or None, decoded JSON)] from an SSE body; every event must end with a blank line."""
    text = raw.decode("utf-8")
    assert text.endswith("\n\n")
    events = []
    for block in text[:-2].split("\n\n"):
        if block.startswith(": job "):  # the opening comment
            continue
        lines = block.split("\n")
        name = lines[0][len("event: "):] if lines[0].startswith("event: ") else None
        data = [line for line in lines if line.startswith("data: ")]
        assert len(data) == 1 and len(lines) == (2 if name else 1), block
        events.append((name, json.loads(data[0][len("data: "):])))
    return events


def raw_stream(url, path, body: bytes, headers=""):
    """Send a request on a plain socket; return (status line and headers, [(seconds, chunk bytes)])."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    start = time.perf_counter()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n{headers}\r\n".encode() + body)
    received = []
    while True:
        data = sock.recv(65536)
        if not data:
            break
        received.append((time.perf_counter() - start, data))
    sock.close()
    return received


def dechunk(received):
    """Split a chunked HTTP response into (head, [(arrival seconds, chunk payload)])."""
    buffer = b"".join(d for _, d in received)
    head, _, body = buffer.partition(b"\r\n\r\n")
    chunks, pos = [], 0
    while True:
        line_end = body.index(b"\r\n", pos)
        size = int(body[pos:line_end], 16)
        if size == 0:
            break
        chunks.append(body[line_end + 2: line_end + 2 + size])
        pos = line_end + 2 + size + 2
    return head.decode(), chunks


def wait_until_running(engine, timeout=10):
    """The worker took the job: the queue is empty again (bounded wait)."""
    deadline = time.time() + timeout
    while engine.running_id is None and time.time() < deadline:
        time.sleep(0.01)
    assert engine.running_id is not None


def wait_until_idle(engine, timeout=10):
    """Nothing runs on the engine any more (bounded wait)."""
    deadline = time.time() + timeout
    while engine.running_id is not None and time.time() < deadline:
        time.sleep(0.01)
    assert engine.running_id is None


def test_index_is_the_seed_contract(server_api):
    r = requests.get(server_api.url + "/")
    assert r.status_code == 200 and r.json() == {"message": "Server started", "success": True}
    assert list(r.json()) == ["message", "success"]


def test_stream_framing_byte_for_byte(server_api, engine):
    body = {"query": "你好", "history": [["hi", "hello"]], "max_length": "80", "temperature": 0}
    r = requests.post(server_api.url + "/stream", json=body)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert r.headers["X-Job-Id"]
    events = parse_sse(r.content)
    *updates, (name, done) = events
    assert name == "done" and all(n is None for n, _ in updates)
    expected = engine.submit(GenerationRequest(query="你好", history=[("hi", "hello")], max_length=80,
                                               temperature=0)).wait()
    reply, history = updates[-1][1]
    assert reply == expected.text
    assert history == [["hi", "hello"], ["你好", reply]]
    # bytes on the wire: compact UTF-8 JSON (no \u escapes), one data line per event
    assert f'data: ["{reply}",[["hi","hello"],["你好","{reply}"]]]\n\n'.encode() in r.content
    # the same prompt again comes from the prefix cache (all but its last token), and greedy float32 is exact
    assert expected.cached_tokens == expected.prompt_tokens - 1
    assert done == {"finish_reason": "length", "id": r.headers["X-Job-Id"], "prompt_tokens": expected.prompt_tokens,
                    "cached_tokens": len(engine.loaded.tokenizer.conversation_start()),  # (cached at start)
                    "completion_tokens": expected.completion_tokens, "dropped_rounds": 0,
                    "seconds": done["seconds"]}
    assert r.content.endswith(b"event: done\ndata: " + json.dumps(done, separators=(",", ":")).encode() + b"\n\n")


def test_stream_really_streams_one_chunk_per_event(serve_api, engine_for, slow_model):
    server = serve_api(engine_for(slow_model))
    received = raw_stream(server.url, "/stream", json.dumps({"query": "hi", "max_length": 60,
                                                             "temperature": 0}).encode())
    head, chunks = dechunk(received)
    assert "200 OK" in head and "Transfer-Encoding: chunked" in head
    events = [c for c in chunks if c.startswith(b"data: ")]
    done = json.loads(chunks[-1].split(b"data: ")[1])
    assert all(c.endswith(b"\n\n") and c.count(b"\n\n") == 1 for c in chunks)  # one event per chunk
    assert len(events) >= done["completion_tokens"] * 0.8  # about one event per token
    first_body_at = next(t for t, d in received if b"data: " in d)
    last_at = received[-1][0]
    assert first_body_at < last_at / 4, (first_body_at, last_at)  # the first token long before the end
    assert len(received) >= len(events) * 0.5  # arrived in many reads, not one burst at the end


def test_the_echo_holds_the_rounds_the_model_saw(serve_api, engine_for, tiny_model):
    server = serve_api(engine_for(tiny_model, reply_reserve=32))
    history = [[f"问题{i} hello world", f"回答{i} the model answer"] for i in range(12)]
    r = requests.post(server.url + "/stream", json={"query": "最后", "history": history, "temperature": 0})
    *updates, (_, done) = parse_sse(r.content)
    dropped = done["dropped_rounds"]
    assert 0 < dropped < len(history)
    assert updates[-1][1][1][:-1] == history[dropped:]  # the oldest rounds, which did not fit, are not sent back
    fits = requests.post(server.url + "/stream", json={"query": "最后", "history": history[-1:], "temperature": 0})
    *updates, (_, done) = parse_sse(fits.content)
    assert done["dropped_rounds"] == 0 and updates[-1][1][1][:-1] == history[-1:]  # as sent when it fits


def test_a_huge_history_does_not_amplify_the_reply(server):
    history = [["问" * 500, "答" * 500] for _ in range(300)]  # ~1 MB of JSON
    body = {"query": "hi", "history": history, "max_length": 250, "temperature": 0}
    r = requests.post(server.url + "/stream", json=body, timeout=120)
    sent = len(json.dumps(body, ensure_ascii=False).encode())
    assert r.status_code == 200 and len(r.content) < sent / 4, (len(r.content), sent)


def test_interrupt_mid_stream(serve_api, engine_for, slow_model):
    server = serve_api(engine_for(slow_model))
    with requests.post(server.url + "/stream", json={"query": "hi", "temperature": 0}, stream=True) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith(b"data: "))
        assert requests.post(server.url + "/interrupt").json() == {"message": "OK", "success": True}
        rest = b"\n".join(lines)
    done = json.loads(rest.split(b"event: done\ndata: ")[1])
    assert done["finish_reason"] == "interrupted"
    assert done["completion_tokens"] < 100
    assert json.loads(first[6:])[0]
    wait_until_idle(server.backing)  # behind a front end, the upstream's generation stopped too


def test_interrupt_a_queued_job_by_id(serve, engine_for, slow_model):
    server = serve(engine_for(slow_model, max_batch=1))  # one at a time, so the second request queues
    first = requests.post(server.url + "/stream", json={"query": "a", "max_length": 120}, stream=True)
    wait_until_running(server.engine)
    second = requests.post(server.url + "/stream", json={"query": "b", "max_length": 120}, stream=True)
    job_id = second.headers["X-Job-Id"]  # sent at once, before the job starts
    assert server.engine.running_id == first.headers["X-Job-Id"]
    r = requests.post(server.url + "/interrupt", json={"id": job_id})
    assert r.json() == {"message": "OK", "success": True}
    events = parse_sse(second.content)
    assert events == [("done", {**events[0][1], "finish_reason": "interrupted", "completion_tokens": 0})]
    assert parse_sse(first.content)[-1][1]["finish_reason"] == "length"  # the running one went on
    r = requests.post(server.url + "/interrupt", json={"id": job_id})
    assert r.status_code == 404 and r.json()["success"] is False and "no queued or running job" in r.json()["message"]


def test_disconnect_cancels_the_job(serve_api, engine_for, slow_model, caplog):
    caplog.set_level("INFO", logger="server.requests")
    server = serve_api(engine_for(slow_model))
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"query": "hi", "temperature": 0}).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    seen = b""
    for _ in range(20):  # headers, the opening comment, then the first token's event
        seen += sock.recv(4096)
        if b"data: " in seen:
            break
    assert b"data: " in seen
    job_id = server.engine.running_id
    assert job_id
    sock.close()
    deadline = time.time() + 5
    while server.engine.running_id == job_id and time.time() < deadline:
        time.sleep(0.02)
    assert server.engine.running_id is None  # cancelled, not generating 200 tokens for nobody
    wait_until_idle(server.backing)
    for _ in range(50):  # bounded: the request line is written as the job ends
        if f"job {job_id} /stream" in caplog.text:
            break
        time.sleep(0.02)
    line = next(r.getMessage() for r in caplog.records if f"job {job_id} /stream" in r.getMessage())
    assert "finish=interrupted" in line  # a client that left is logged too


def test_an_interrupted_plain_generate_says_so_in_a_header(serve_api, engine_for, slow_model):
    server = serve_api(engine_for(slow_model))
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=requests.post(
        server.url + "/generate", json={"query": "hi", "max_length": 200, "stream": False}, timeout=60)))
    thread.start()
    wait_until_running(server.engine)
    assert requests.post(server.url + "/interrupt", json={}).json()["success"] is True
    thread.join(60)
    assert result["r"].status_code == 200 and result["r"].headers["X-Finish-Reason"] == "interrupted"
    done = requests.post(server.url + "/generate", json={"query": "hi", "max_length": 40, "stream": False})
    assert done.headers["X-Finish-Reason"] == "length"


def test_disconnect_while_queued_removes_the_job(serve, engine_for, slow_model):
    """No write ever fails for a job still in the queue: only waitress's client_disconnected can tell."""
    server = serve(engine_for(slow_model, max_batch=1))
    running = requests.post(server.url + "/stream", json={"query": "a", "max_length": 200}, stream=True)
    wait_until_running(server.engine)
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"query": "queued", "max_length": 200}).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.time() + 5
    while server.engine.queue_length == 0 and time.time() < deadline:
        time.sleep(0.01)
    assert server.engine.queue_length == 1
    sock.close()
    deadline = time.time() + 5
    while server.engine.queue_length and time.time() < deadline:
        time.sleep(0.02)
    assert server.engine.queue_length == 0  # gone from the queue while the first job still runs
    assert server.engine.running_id is not None
    server.engine.interrupt()
    running.close()


def test_four_concurrent_streams_complete_in_order(serve, engine_for, tiny_model, monkeypatch):
    engine = engine_for(tiny_model, max_batch=1)  # one at a time: the FIFO queue (test_batching runs them together)
    expected = {i: engine.submit(GenerationRequest(query=f"问题{i}", max_length=60, temperature=0)).wait().text
                for i in range(4)}
    gate = threading.Event()  # holds the first job in the model until all four are queued
    forward = tiny_model.model.forward
    monkeypatch.setattr(tiny_model.model, "forward", lambda *a, **k: (gate.wait(10), forward(*a, **k))[1])
    server = serve(engine)
    results, threads = {}, []

    def run(i):
        r = requests.post(server.url + "/stream", json={"query": f"问题{i}", "max_length": 60, "temperature": 0})
        *updates, (_, done) = parse_sse(r.content)
        results[i] = (updates[-1][1][0], done, time.perf_counter())

    try:
        for i in range(4):
            threads.append(threading.Thread(target=run, args=(i,)))
            threads[-1].start()
            deadline = time.time() + 10  # submitted in this order: wait until the server has this one
            while engine.queue_length + (engine.running_id is not None) < i + 1 and time.time() < deadline:
                time.sleep(0.005)
        gate.set()
        for t in threads:
            t.join(timeout=60)
    finally:
        gate.set()
    assert {i: results[i][0] for i in range(4)} == expected
    assert all(results[i][1]["finish_reason"] == "length" for i in range(4))
    finish_times = [results[i][2] for i in range(4)]
    assert finish_times == sorted(finish_times)


def test_tokenize_counts_and_lists_pieces(server_api, tiny_model):
    r = requests.post(server_api.url + "/tokenize", json={"text": "hello world 你好"})
    assert r.status_code == 200 and r.json() == {"len": len(tiny_model.tokenizer.pieces("hello world 你好"))}
    r = requests.post(server_api.url + "/tokenize", json={"text": "hello world", "return_tokens": True})
    assert r.json() == {"len": len(r.json()["tokens"]), "tokens": tiny_model.tokenizer.pieces("hello world")}


def test_generate_streams_response_events(server_api, engine):
    expected = engine.submit(GenerationRequest(query="hi", max_length=50, temperature=0)).wait().text
    r = requests.post(server_api.url + "/generate", json={"query": "hi", "answer_prefix": "", "max_length": 50,
                                                       "history": [], "top_p": 0.7, "temperature": 0, "stream": True})
    events = parse_sse(r.content)
    assert all(name is None and list(data) == ["response"] for name, data in events)
    assert events[-1][1]["response"] == expected


def test_generate_get_and_plain_text(server_api, engine):
    expected = engine.submit(GenerationRequest(query="hi", history=[("a", "b")], max_length=50,
                                               temperature=0)).wait().text
    r = requests.get(server_api.url + "/generate", params={"query": "hi", "history": '[["a","b"]]',
                                                           "max_length": "50", "temperature": "0", "stream": "false"})
    assert r.status_code == 200 and r.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert r.text == expected
    r = requests.get(server_api.url + "/generate", params={"query": "hi", "max_length": "50", "temperature": "0",
                                                       "stream": "1"})
    assert r.headers["Content-Type"].startswith("text/event-stream")


def test_health_reports_the_model(server):
    r = requests.get(server.url + "/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ready" and body["device"] == "cpu" and body["precision"] == "float32"
    assert body["max_context"] == 256 and body["queue"] == 0 and body["version"]
    assert body["running_jobs"] == [] and body["queued_jobs"] == [] and body["max_batch"] >= 1
    # the chat template's start, run at start; the first conversation extends it and takes its place
    assert body["prompt_cache"] == {"entries": 1, "mb": body["prompt_cache"]["mb"],
                                    "max_mb": body["prompt_cache"]["max_mb"]}
    assert requests.post(server.url + "/stream", json={"query": "hi", "max_length": 40}).status_code == 200
    (entry,) = server.engine.prefix_cache.entries.values()
    assert len(entry.ids) > len(server.engine.loaded.tokenizer.conversation_start())
    assert requests.get(server.url + "/health").json()["prompt_cache"]["entries"] == 1


def test_loading_server_answers_at_once_and_refuses_generation(serve):
    release = threading.Event()
    engine = Engine()
    server = serve(engine)
    engine.load_in_background(lambda e: (release.wait(10), (_ for _ in ()).throw(RuntimeError("no weights")))[1])
    assert requests.get(server.url + "/").status_code == 200
    r = requests.get(server.url + "/health")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    r = requests.post(server.url + "/stream", json={"query": "hi"})
    assert r.status_code == 503 and r.headers["Retry-After"] == "5" and "still loading" in r.json()["message"]
    release.set()
    deadline = time.time() + 5
    while engine.state == "loading" and time.time() < deadline:
        time.sleep(0.02)
    r = requests.get(server.url + "/health")
    assert r.status_code == 503 and r.json()["status"] == "error" and "no weights" in r.json()["error"]


def test_busy_queue_is_refused_with_retry_after(serve, engine_for, slow_model):
    server = serve(engine_for(slow_model, max_queue=1, max_batch=1))
    running = requests.post(server.url + "/stream", json={"query": "a", "max_length": 100}, stream=True)
    wait_until_running(server.engine)
    waiting = requests.post(server.url + "/stream", json={"query": "b", "max_length": 100}, stream=True)
    r = requests.post(server.url + "/stream", json={"query": "c"})
    assert r.status_code == 429 and r.headers["Retry-After"] == "5" and "busy" in r.json()["message"]
    requests.post(server.url + "/interrupt", json={"id": waiting.headers["X-Job-Id"]})
    requests.post(server.url + "/interrupt")
    running.close()
    waiting.close()


@pytest.mark.parametrize("origin", ["http://127.0.0.1:3000", "http://localhost:8080", "http://[::1]:9"])
def test_cors_preflight_and_headers_for_loopback_origins(server, origin):
    r = requests.options(server.url + "/stream", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == origin and r.headers["Vary"] == "Origin"
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert r.headers["Access-Control-Allow-Headers"] == "content-type"
    assert "Access-Control-Allow-Credentials" not in r.headers


@pytest.mark.parametrize("route", ["/", "/stream", "/interrupt", "/v1/models"])
def test_a_foreign_web_page_is_refused_by_default(server, route):
    r = requests.post(server.url + route, data=b'{"query": "hi"}', headers={"Origin": "http://evil.test",
                                                                            "Content-Type": "text/plain"})
    assert r.status_code in (403, 405) and "Access-Control-Allow-Origin" not in r.headers
    if r.status_code == 403:
        assert "--allow-origin http://evil.test" in r.text
    assert requests.get(server.url + "/", headers={"Origin": "http://evil.test"}).status_code == 403
    assert requests.get(server.url + "/").status_code == 200  # no Origin: not a browser, allowed


@pytest.mark.parametrize("allow, allowed", [("http://evil.test", True), ("*", True), ("http://other.test", False)])
def test_allow_origin_opens_the_api_to_named_pages(serve, engine, allow, allowed):
    server = serve(engine, allow_origin=allow)
    r = requests.post(server.url + "/tokenize", json={"text": "hi"}, headers={"Origin": "http://evil.test"})
    assert (r.status_code == 200) is allowed
    if allowed:
        assert r.headers["Access-Control-Allow-Origin"] == "http://evil.test"


def test_dns_rebinding_is_refused_on_a_loopback_bind(server):
    r = requests.post(server.url + "/tokenize", json={"text": "hi"}, headers={"Host": "rebind.evil.test:5178"})
    assert r.status_code == 403 and r.json()["message"].startswith("this server answers only requests addressed")
    for host in ("localhost:5178", "127.0.0.1", "[::1]:5178"):
        assert requests.post(server.url + "/tokenize", json={"text": "hi"}, headers={"Host": host}).status_code == 200

def test_api_key_guards_everything_but_index_and_health(serve, engine):
    server = serve(engine, api_key="s3cret")
    assert requests.get(server.url + "/").status_code == 200
    assert requests.get(server.url + "/health").status_code == 200
    r = requests.post(server.url + "/tokenize", json={"text": "hi"})
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["message"]
    r = requests.post(server.url + "/tokenize", json={"text": "hi"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = requests.post(server.url + "/tokenize", json={"text": "hi"}, headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200
    assert requests.options(server.url + "/tokenize").status_code == 200  # preflights carry no credentials
    anonymous = requests.get(server.url + "/health").json()
    assert anonymous == {"status": "ready", "progress": None}  # no model path, no job ids
    keyed = requests.get(server.url + "/health", headers={"Authorization": "Bearer s3cret"}).json()
    assert keyed["status"] == "ready" and "model" in keyed and "running" in keyed
    assert requests.post(server.url + "/ui/render", json={"text": "*hi*"}).status_code == 401
    assert requests.get(server.url + "/ui/").status_code == 200  # the page itself asks for the key


def test_render_refuses_huge_text_and_never_takes_more_than_two_threads(server, monkeypatch):
    import threading

    from server.web import page as web

    r = requests.post(server.url + "/ui/render", json={"text": "|a|b|\n" * 20_000})
    assert r.status_code == 413 and "at most 64000" in r.json()["message"]
    release = threading.Event()
    monkeypatch.setattr(web, "render_markdown", lambda source: release.wait(10) and "<p>x</p>")
    slow = [threading.Thread(target=requests.post, args=(server.url + "/ui/render",), kwargs={"json": {"text": "x"}})
            for _ in range(2)]
    for t in slow:
        t.start()
    try:
        for _ in range(100):  # bounded: both renders are under way
            if web.RENDERS._value == 0:
                break
            threading.Event().wait(0.05)
        r = requests.post(server.url + "/ui/render", json={"text": "x"})
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert requests.post(server.url + "/tokenize", json={"text": "hi"}).status_code == 200  # the API still answers
    finally:
        release.set()
        for t in slow:
            t.join(10)


def test_exposed_host_logs_a_warning(caplog):
    from server.config import Settings
    from server.run import warn_if_exposed

    warn_if_exposed(Settings(host="127.0.0.1"))
    assert not caplog.records
    warn_if_exposed(Settings(host="0.0.0.0"))
    assert "other machines on the network" in caplog.text and "--api-key" in caplog.text


def test_request_log_and_chat_log(server, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="server"):
        requests.post(server.url + "/stream", json={"query": "记录我", "max_length": 40, "temperature": 0})
        time.sleep(0.1)
    line = next(r.getMessage() for r in caplog.records if r.name == "server.requests")
    assert "/stream" in line and "finish=length" in line and "tok/s=" in line and "ttft=" in line
    assert "记录我" not in line  # full texts only in the chat log
    chat = next(r.getMessage() for r in caplog.records if r.name == "server.chatlog")
    assert json.loads(chat)["query"] == "记录我"


def test_delta_mode_streams_only_what_changed_and_adds_up_to_the_seed_stream(server_api):
    body = {"query": "你好", "history": [["hi", "hello"]], "max_length": 80, "temperature": 0}
    seed = parse_sse(requests.post(server_api.url + "/stream", json=body).content)
    delta = parse_sse(requests.post(server_api.url + "/stream", json={**body, "delta": True}).content)
    *seed_updates, (_, seed_done) = seed
    *delta_updates, (name, delta_done) = delta
    assert name == "done" and delta_done["completion_tokens"] == seed_done["completion_tokens"]
    text = ""
    for _, data in delta_updates:
        text = data["text"] if "text" in data else text + data["delta"]
    assert text == seed_updates[-1][1][0]
    assert len(delta_updates) == len(seed_updates)
    assert all(set(data) in ({"delta"}, {"text"}) for _, data in delta_updates)


def test_delta_change_is_an_append_or_the_whole_text():
    from server.web.original_api import change

    assert change("abc", "abcd") == {"delta": "d"}
    assert change("", "x") == {"delta": "x"}
    assert change("今年是[[训练", "今年是2023年") == {"text": "今年是2023年"}  # a filled placeholder rewrites


def test_rendered_links_open_apart_and_images_become_buttons(server):
    html = requests.post(server.url + "/ui/render", json={
        "text": '[doc](https://example.com/a?b=1&c=2) ![px "x"](http://t.example/p.gif?u=1&v=<2>)'}).json()["html"]
    assert '<a href="https://example.com/a?b=1&amp;c=2" target="_blank" rel="noopener noreferrer">doc</a>' in html
    assert "<img" not in html
    assert 'class="remote-image" data-src="http://t.example/p.gif?u=1&amp;v=%3C2%3E"' in html


@pytest.mark.parametrize("path, kind", [("/ui/", "text/html"), ("/ui/app.js", "text/javascript"),
                                        ("/ui/app.css", "text/css"), ("/ui/sw.js", "text/javascript"),
                                        ("/ui/manifest.webmanifest", "application/manifest+json")])
def test_the_page_has_its_types_even_where_mimetypes_says_text_plain(server, monkeypatch, path, kind):
    """As on Windows PCs whose registry maps .js and .css to text/plain (Python's mimetypes reads it)."""
    import mimetypes

    real = mimetypes.guess_type
    monkeypatch.setattr(mimetypes, "guess_type", lambda url, strict=True: ("text/plain", None)
                        if str(url).endswith((".js", ".css", ".html", ".webmanifest")) else real(url, strict))
    r = requests.get(server.url + path, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].split(";")[0] == kind
