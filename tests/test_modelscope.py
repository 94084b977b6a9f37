"""ModelScope as a download source: pinned with mirror = modelscope, and the last automatic fallback."""

import pytest

from server.config import Settings
from server.setup import bootstrap, modelscope
from server.setup.bootstrap import DownloadError, ensure_model
from server.startup import load_for
from tests.fake_hub import FakeHub
from tests.modelscope_standin import ModelScopeStandin
from tests.test_bootstrap import WEIGHTS, refusing_url


@pytest.fixture(scope="module")
def source_files(tmp_path_factory):
    from tests.checkpoint_factory import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("modelscope-source"))


@pytest.fixture
def standin(source_files, monkeypatch):
    fake = ModelScopeStandin(source_files)
    monkeypatch.setattr(modelscope, "ENDPOINT", fake.url)
    monkeypatch.setattr(bootstrap, "BACKOFF_SECONDS", 0.01)
    yield fake
    fake.close()


def test_pinned_modelscope_downloads_resumes_and_starts(standin, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")  # a hub token is not sent to another site
    folder = tmp_path / "THUDM" / "chatglm2-6b"
    folder.mkdir(parents=True)
    partial = folder / (WEIGHTS + ".incomplete")  # a stopped earlier start
    partial.write_bytes(standin.files[WEIGHTS][:1000])
    settings = Settings(model_dir=folder, mirror="modelscope", dtype="float32", quantize=16, max_context=128)
    loaded = load_for(settings)
    assert loaded.tokenizer.decode(loaded.tokenizer.sp.encode("hello")) == "hello"
    for name, data in standin.files.items():
        assert name.endswith(".py") != (folder / name).is_file()  # code never downloaded
        if not name.endswith(".py"):
            assert (folder / name).read_bytes() == data
    listing = [e for e in standin.log if e["path"].endswith("/repo/files")]
    assert listing and listing[0]["path"] == "/api/v1/models/ZhipuAI/chatglm2-6b/repo/files"
    assert listing[0]["query"] == {"Revision": "master", "Recursive": "True"}
    assert [e["range"] for e in standin.downloads(WEIGHTS)] == ["bytes=1000-"]
    assert all(e["authorization"] is None for e in standin.log)


def test_auto_falls_back_to_modelscope_after_two_refusing_hubs(standin, source_files, tmp_path, monkeypatch,
                                                               caplog):
    """huggingface.co does not accept a connection; hf-mirror.com answers but refuses (403)."""
    denying = FakeHub(source_files)
    denying.deny = 403
    try:
        monkeypatch.setattr(bootstrap, "AUTO_SOURCES", (refusing_url(), denying.url, "modelscope"))
        folder = tmp_path / "m"
        with caplog.at_level("WARNING", logger="server.setup.bootstrap"):
            ensure_model(Settings(model_dir=folder))
    finally:
        denying.close()
    assert (folder / WEIGHTS).read_bytes() == standin.files[WEIGHTS]
    warnings = [r.getMessage() for r in caplog.records]
    assert any("cannot be reached" in w for w in warnings)
    assert any(denying.url in w and "did not list" in w and "403" in w for w in warnings)
    assert any("downloading from modelscope instead" in w for w in warnings)
    assert len(denying.log) == 1  # tried once, not five times with backoff: the next source is waiting


def test_a_damaged_file_is_fetched_again_then_reported(standin, tmp_path):
    settings = Settings(model_dir=tmp_path / "m", mirror="modelscope")
    standin.corrupt[WEIGHTS] = 1
    ensure_model(settings)
    assert (tmp_path / "m" / WEIGHTS).read_bytes() == standin.files[WEIGHTS]
    assert len(standin.downloads(WEIGHTS)) == 2  # the sha256 caught the first copy

    standin.corrupt[WEIGHTS] = 2
    (tmp_path / "m" / WEIGHTS).unlink()
    with pytest.raises(DownloadError, match="checksum"):
        ensure_model(settings)


def test_an_unknown_model_is_one_clear_message(standin, tmp_path):
    with pytest.raises(DownloadError, match="ModelScope has no ZhipuAI/chatglm9-6b"):
        ensure_model(Settings(model_dir=tmp_path / "m", mirror="modelscope", repo="THUDM/chatglm9-6b"))


def test_modelscope_names_and_urls():
    assert modelscope.repo_id("THUDM/chatglm3-6b-32k") == "ZhipuAI/chatglm3-6b-32k"
    assert modelscope.repo_id("someone/model") == "someone/model"
    assert modelscope.file_url("THUDM/chatglm2-6b-int4", "main", "a b.json").endswith(
        "/api/v1/models/ZhipuAI/chatglm2-6b-int4/repo?Revision=master&FilePath=a%20b.json")
