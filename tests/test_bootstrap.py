"""First-start download through the real huggingface_hub client, against a loopback fake hub."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from server.config import Settings, from_env
from server.engine import Engine
from server.model import disk
from server.setup import bootstrap
from server.setup.bootstrap import DownloadError, ensure_model
from server.startup import load_for
from tests.fake_hub import FakeHub

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "pytorch_model-00001-of-00002.bin"


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory):
    from tests.checkpoint_factory import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("hub-source"))


@pytest.fixture
def hub(hub_files):
    fake = FakeHub(hub_files)
    yield fake
    fake.close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(bootstrap, "BACKOFF_SECONDS", 0.01)


def settings_for(hub, folder, **changes):
    return Settings(model_dir=folder, mirror=hub.url, dtype="float32", quantize=16, max_context=128, **changes)


def test_fresh_download_then_start(hub, tmp_path):
    folder = tmp_path / "THUDM" / "chatglm2-6b"
    loaded = load_for(settings_for(hub, folder))
    for name, data in hub.files.items():
        if name.endswith(".py"):
            assert not (folder / name).exists()  # code is never downloaded
        else:
            assert (folder / name).read_bytes() == data
    assert loaded.tokenizer.decode(loaded.tokenizer.sp.encode("hello")) == "hello"
    # the real huggingface_hub client did the transfer
    assert all("hf_hub/" in e["agent"] for e in hub.log)
    assert any(e["path"].startswith("/api/models/THUDM/chatglm2-6b") for e in hub.log)
    before = len(hub.log)
    load_for(settings_for(hub, folder))  # a second start downloads nothing
    assert len(hub.log) == before


@pytest.fixture
def small_chunks(monkeypatch):
    """huggingface_hub writes what it receives in 10 MB chunks; the tiny files need small ones to leave a partial."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 4096)


def test_resume_fetches_only_the_rest(hub, tmp_path, monkeypatch, small_chunks):
    folder = tmp_path / "m"
    monkeypatch.setattr(bootstrap, "RETRIES", 1)
    hub.cut_once.add(WEIGHTS)
    hub.fail[WEIGHTS] = 503  # then the connection stays down: this start gives up
    with pytest.raises(DownloadError, match="503"):
        ensure_model(settings_for(hub, folder))
    assert not (folder / WEIGHTS).exists()
    size = len(hub.files[WEIGHTS])
    kept = (folder / (WEIGHTS + ".incomplete")).stat().st_size
    assert 0 < kept <= hub.gets(WEIGHTS)[0]["sent"] < size

    del hub.fail[WEIGHTS]  # the network is back: start again
    ensure_model(settings_for(hub, folder))
    assert (folder / WEIGHTS).read_bytes() == hub.files[WEIGHTS]
    resumed = hub.gets(WEIGHTS)[-1]
    assert resumed["range"] == f"bytes={kept}-"
    assert resumed["sent"] == size - kept  # only the rest was fetched
    assert not (folder / (WEIGHTS + ".incomplete")).exists()


def test_cut_transfer_is_resumed_within_one_start(hub, tmp_path, small_chunks):
    folder = tmp_path / "m"
    hub.cut_once.add(WEIGHTS)
    ensure_model(settings_for(hub, folder))
    assert (folder / WEIGHTS).read_bytes() == hub.files[WEIGHTS]
    cut, rest = hub.gets(WEIGHTS)
    assert rest["range"] and rest["range"] != "bytes=0-"
    assert rest["sent"] < len(hub.files[WEIGHTS])  # not started over


def test_corrupted_file_is_fetched_again(hub, tmp_path, caplog):
    folder = tmp_path / "m"
    hub.corrupt[WEIGHTS] = 1
    ensure_model(settings_for(hub, folder))
    assert (folder / WEIGHTS).read_bytes() == hub.files[WEIGHTS]
    assert len([e for e in hub.gets(WEIGHTS) if e["sent"]]) == 2
    assert "does not match the hub's checksum" in caplog.text


def test_file_corrupted_twice_fails_clearly(hub, tmp_path):
    hub.corrupt[WEIGHTS] = 2
    with pytest.raises(DownloadError, match="both copies fail the checksum") as err:
        ensure_model(settings_for(hub, tmp_path / "m"))
    assert "--mirror" in str(err.value)


def test_verify_recheck_replaces_a_damaged_local_file(hub, tmp_path, caplog):
    folder = tmp_path / "m"
    ensure_model(settings_for(hub, folder))
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[100] ^= 0xFF  # same size: only the checksum can tell
    (folder / WEIGHTS).write_bytes(bytes(data))
    ensure_model(settings_for(hub, folder))  # a plain start trusts complete files
    assert (folder / WEIGHTS).read_bytes() != hub.files[WEIGHTS]
    with caplog.at_level("WARNING", logger="server.setup.bootstrap"):
        ensure_model(settings_for(hub, folder, verify=True))
    assert (folder / WEIGHTS).read_bytes() == hub.files[WEIGHTS]
    assert f"{WEIGHTS} does not match the hub's checksum: downloading it again" in caplog.text  # which, and why


def test_a_read_only_file_system_is_a_disk_message_not_a_network_one(hub, tmp_path, monkeypatch):
    """(Tests run as root, who can write anywhere: the refusal is what a read-only disk answers.)"""
    import builtins
    import errno

    real_open = builtins.open

    def read_only(path, mode="r", *args, **kwargs):
        if str(path).endswith(".incomplete") and "a" in mode:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only)
    with pytest.raises(DownloadError) as err:
        ensure_model(settings_for(hub, tmp_path / "m"))
    assert "Cannot write" in str(err.value) and "model_dir" in str(err.value) and "network" not in str(err.value)


def test_mirror_from_hf_endpoint(hub, tmp_path):
    settings = Settings(model_dir=tmp_path / "m").replace(**from_env({"HF_ENDPOINT": hub.url}))
    assert settings.mirror == hub.url
    ensure_model(settings)
    assert (tmp_path / "m" / "config.json").exists() and hub.log


def test_offline_names_the_missing_files_and_never_connects(hub, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_bytes(hub.files["config.json"])
    settings = Settings(model_dir=folder, mirror=hub.url).replace(**from_env({"HF_HUB_OFFLINE": "1"}))
    with pytest.raises(DownloadError) as err:
        ensure_model(settings)
    message = str(err.value)
    assert "tokenizer.model" in message and "pytorch_model.bin.index.json" in message
    assert "huggingface.co/THUDM/chatglm2-6b" in message and str(folder) in message
    assert hub.log == []


def test_not_enough_disk_is_refused_before_downloading(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    with pytest.raises(DownloadError, match="Not enough disk space") as err:
        ensure_model(settings_for(hub, tmp_path / "m"))
    assert "GB" in str(err.value)
    assert not [e for e in hub.log if "/resolve/" in e["path"]]


def test_unknown_repository_is_a_404_message(hub, tmp_path):
    with pytest.raises(DownloadError, match="not found.*404.*--repo"):
        ensure_model(settings_for(hub, tmp_path / "m", repo="THUDM/no-such-model"))


@pytest.mark.parametrize("status", [401, 403])
def test_access_denied_says_what_to_do(hub, tmp_path, status):
    hub.deny = status
    with pytest.raises(DownloadError, match=f"refused access.*{status}.*HF_TOKEN"):
        ensure_model(settings_for(hub, tmp_path / "m"))


def test_unwritable_model_folder_is_a_clear_message(hub, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DownloadError, match="Cannot create.*--model-dir"):
        ensure_model(settings_for(hub, blocker / "chatglm2-6b"))


def test_no_network_is_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr(bootstrap, "RETRIES", 2)
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="Cannot reach.*hf-mirror.com"):
        ensure_model(Settings(model_dir=tmp_path / "m", mirror=f"http://127.0.0.1:{port}"))


def test_health_reports_download_progress(hub, tmp_path, serve):
    hub.bytes_per_second = 400_000  # slow enough to be seen downloading
    engine = Engine()
    server = serve(engine)
    settings = settings_for(hub, tmp_path / "m")
    engine.load_in_background(lambda e: load_for(settings, report=e.set_state))
    seen = []
    deadline = time.time() + 30
    while time.time() < deadline:
        body = requests.get(server.url + "/health").json()
        seen.append(body)
        if body["status"] in ("ready", "error"):
            break
        time.sleep(0.05)
    downloading = [b for b in seen if b["status"] == "downloading"]
    assert downloading and seen[-1]["status"] == "ready"
    fractions = [b["progress"] for b in downloading]
    assert fractions == sorted(fractions) and any(0 < f < 1 for f in fractions)
    assert downloading[-1]["total_bytes"] == sum(len(d) for n, d in hub.files.items() if not n.endswith(".py"))
    r = requests.post(server.url + "/tokenize", json={"text": "hi"})
    assert r.status_code == 200


def test_cli_offline_failure_is_one_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "server", "chat", "--offline", "--model-dir", str(tmp_path / "m")],
                          capture_output=True, text=True, encoding="utf-8", timeout=120, cwd=ROOT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "Offline mode" in proc.stderr and "离线" in proc.stderr


def refusing_url() -> str:
    import socket

    with socket.socket() as s:  # a port nobody listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_auto_mirror_falls_back_when_the_hub_cannot_be_reached(hub, tmp_path, monkeypatch, caplog):
    """Two loopback hubs: the first refuses (as huggingface.co does from mainland China), the second serves."""
    monkeypatch.setattr(bootstrap, "AUTO_SOURCES", (refusing_url(), hub.url, "modelscope"))
    folder = tmp_path / "m"
    with caplog.at_level("WARNING", logger="server.setup.bootstrap"):
        ensure_model(Settings(model_dir=folder))  # mirror defaults to auto: no setting needed
    assert (folder / WEIGHTS).read_bytes() == hub.files[WEIGHTS]
    assert any("cannot be reached" in r.getMessage() for r in caplog.records)
    assert any("instead" in r.getMessage() and hub.url in r.getMessage() for r in caplog.records)


def test_auto_mirror_keeps_the_hub_when_it_answers(hub, monkeypatch, tmp_path):
    monkeypatch.setattr(bootstrap, "AUTO_SOURCES", (hub.url, refusing_url(), "modelscope"))
    for mirror in ("auto", "AUTO"):
        chosen, files, commit = bootstrap.list_from_first_source(Settings(model_dir=tmp_path, mirror=mirror))
        assert chosen.mirror == hub.url and commit == hub.commit and {f.name for f in files} <= set(hub.files)


def test_a_pinned_mirror_is_used_as_is_without_probing(hub, monkeypatch, tmp_path):
    monkeypatch.setattr(bootstrap, "reachable", lambda url: pytest.fail("a pinned source is not probed"))
    chosen, _files, _commit = bootstrap.list_from_first_source(Settings(model_dir=tmp_path, mirror=hub.url + "/"))
    assert chosen.mirror == hub.url


def test_overall_progress_only_grows_and_reaches_one_exactly_once(hub, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    partial = folder / (WEIGHTS + ".incomplete")  # a stopped earlier start: resumed, counted once
    partial.write_bytes(hub.files[WEIGHTS][: len(hub.files[WEIGHTS]) // 3])
    reports = []
    ensure_model(settings_for(hub, folder), report=lambda state, **detail: reports.append((state, detail)))
    fractions = [d["progress"] for s, d in reports if s == "downloading"]
    assert fractions == sorted(fractions) and fractions.count(1.0) == 1 and fractions[-1] == 1.0
    last = [d for s, d in reports if s == "downloading"][-1]
    assert last["downloaded_bytes"] == last["total_bytes"]
    assert reports[-1][0] == "loading"
