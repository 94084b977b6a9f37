"""Fixtures: tiny ChatGLM2 checkpoints in the hub layout, loaded models, engines, an isolated environment."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from server.engine import Engine
from server.model.loader import load_model
from server.model.profiles import Plan
from tests.checkpoint_factory import write_checkpoint

REAL_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "chatglm2" / "tokenizer.model"


def cpu_plan(bits: int = 16, dtype: str = "float32", max_context: int = 256) -> Plan:
    return Plan(device="cpu", bits=bits, dtype=dtype, max_context=max_context, profile="test", reason="test")


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """No test sees the user's settings, hub token or caches."""
    for name in list(os.environ):
        if name.startswith(("CHATGLM2_", "HF_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CHATGLM2_SETTINGS_FILE", str(tmp_path / "no-settings.ini"))  # not the project's settings.ini
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(autouse=True)
def no_lasting_log_handlers():
    """A test that runs `main()` in this process (export) leaves the console and server.log handlers of
    cli.setup_logging behind: remove them, so later tests' log lines do not reach the real console."""
    import logging

    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "from_setup_logging", False)]:
        root.removeHandler(handler)
        handler.close()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny checkpoint whose replies never end before max_length (eos is always unlikely)."""
    return write_checkpoint(tmp_path_factory.mktemp("chatglm2-tiny"))


@pytest.fixture(scope="session")
def eos_checkpoint(tmp_path_factory) -> Path:
    """A tiny checkpoint whose every reply ends at once with eos."""
    return write_checkpoint(tmp_path_factory.mktemp("chatglm2-eos"), eos_bias=30.0)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return load_model(tiny_checkpoint, cpu_plan())


@pytest.fixture
def slow_model(tiny_model, monkeypatch):
    """The tiny model at a real model's pace (each forward pass 15 ms longer), so a reply can be watched and stopped.
    (The pause is in the embedding, which every pass runs: also the engine's mixed steps, which walk the layers
    themselves.)"""
    embed = tiny_model.model.model.embed_tokens
    forward = embed.forward

    def slow(*args, **kwargs):
        time.sleep(0.015)
        return forward(*args, **kwargs)

    monkeypatch.setattr(embed, "forward", slow)
    return tiny_model


@pytest.fixture
def engine_for():
    """engine_for(loaded, **options) -> a running Engine, closed after the test."""
    engines = []

    def make(loaded, **options):
        engine = Engine(**options)
        engine.attach(loaded)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture
def engine(engine_for, tiny_model):
    return engine_for(tiny_model)


class LiveServer:
    """The real app on a real waitress server, on a free loopback port, in a background thread."""

    def __init__(self, engine, app=None, **settings):
        import threading

        from server.config import Settings
        from server.web.app import create_app
        from server.web.serve import make_server

        self.engine = engine
        self.settings = Settings(**{"host": "127.0.0.1", "port": 0, "chatlog": False, **settings})
        self.app = app or create_app(self.settings, engine)
        self.server = make_server(self.app, self.settings)
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        """waitress's own loop, in short turns so that close() can end it from this thread."""
        from waitress import wasyncore

        while not self.stopping.is_set():
            wasyncore.loop(timeout=0.05, map=self.server._map, count=1)
        wasyncore.close_all(self.server._map)  # kept-alive client connections too

    def close(self):
        self.stopping.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "the test server did not stop"
        self.server.task_dispatcher.shutdown(timeout=5)


@pytest.fixture
def serve():
    """serve(engine, **settings) -> LiveServer, closed after the test."""
    servers = []

    def start(engine, app=None, **settings):
        servers.append(LiveServer(engine, app, **settings))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def server(serve, engine):
    return serve(engine)


@pytest.fixture
def serve_standin(serve):
    """serve_standin(engine, **knobs) -> a vLLM-framed OpenAI-compatible engine on loopback that generates with
    `engine` (tests/upstream_standin.py); its StandIn is `.standin`."""
    from tests.upstream_standin import StandIn

    def start(engine, **knobs):
        standin = StandIn(engine, **knobs)
        upstream = serve(engine, app=standin.app())
        upstream.standin = standin
        return upstream

    return start


@pytest.fixture
def front_for(serve_standin):
    """front_for(engine, **options) -> an attached UpstreamEngine (--backend) whose one upstream is a stand-in
    serving `engine`, with the same context budget and reply reserve; the stand-in is `.upstream_server`."""
    from server.upstream import UpstreamEngine

    fronts = []

    def make(engine, standin=None, **options):
        upstream = standin or serve_standin(engine)
        front = UpstreamEngine([upstream.url + "/v1"], reply_reserve=engine.reply_reserve, **options)
        front.attach(engine.loaded.tokenizer)
        front.upstream_server = upstream
        fronts.append(front)
        return front

    yield make
    for front in fronts:
        front.close()


@pytest.fixture(params=["local", "front"])
def serve_api(request, serve, front_for):
    """serve_api(engine, **settings) -> the project's API over `engine`: directly ("local"), or ("front") as a
    front end (--backend) whose upstream is a vLLM-framed stand-in generating with that engine. The same
    tests run both ways; `.backing` is the engine that generates."""
    def start(engine, **settings):
        server = serve(engine if request.param == "local" else front_for(engine), **settings)
        server.backing = engine
        return server

    start.mode = request.param
    return start


@pytest.fixture
def server_api(serve_api, engine):
    return serve_api(engine)


@pytest.fixture
def prefill_lengths(monkeypatch) -> list[int]:
    """The length of every prompt piece the model's prefill runs from now on (a spy: the real prefill runs)."""
    import server.model.forward as forward

    lengths, real = [], forward.prefill

    def counting(model, ids, cache, every_position=False):
        lengths.append(len(ids))
        return real(model, ids, cache, every_position)

    monkeypatch.setattr(forward, "prefill", counting)
    return lengths
