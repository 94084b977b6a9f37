"""The prefix cache's disk tier: a conversation continues from its cached keys and values after a restart."""

import shutil

from server.engine.budget import GenerationRequest
from server.engine.prefix_cache import PrefixCache
from server.engine.prefix_disk import FOLDER, DiskPrefixCache
from tests.test_prefix_cache import tensors

GREEDY = {"temperature": 0.0}
STAMP = {"model": "tiny", "bits": 16}


def disk(folder, stamp=STAMP, max_bytes=10**7) -> DiskPrefixCache:
    return DiskPrefixCache(folder, stamp, max_bytes)


def test_an_entry_outlives_the_process_and_is_found_by_its_prefix(tmp_path):
    first = PrefixCache(10**6, disk=disk(tmp_path))
    first.store([1, 2, 3, 4, 5], tensors(5))
    first.disk.flush()
    files = list((tmp_path / FOLDER).rglob("*.safetensors"))
    assert len(files) == 1 and not list((tmp_path / FOLDER).rglob("*.tmp"))
    again = PrefixCache(10**6, disk=disk(tmp_path))  # a restart: the memory tier is empty
    n, found = again.lookup([1, 2, 3, 4, 9, 9], "cpu")
    assert n == 4 and found[0][0][0, 0, :, 0].tolist() == [0, 1, 2, 3]
    assert found[1][1][0, 1, :, 3].tolist() == [0, 1, 2, 3]
    (entry,) = again.entries.values()  # now in memory too: the positions in common, all that was read
    assert entry.ids == [1, 2, 3, 4] and [k.shape[2] for k, _ in entry.tensors] == [4, 4]
    assert again.lookup([1, 2, 3, 4, 5, 6], "cpu")[0] == 5  # more of it on disk: read again, further


def test_another_model_or_precision_never_reads_them_and_removes_them(tmp_path):
    old = disk(tmp_path)
    old.put([1, 2, 3], tensors(3))
    old.flush()
    other = PrefixCache(10**6, disk=disk(tmp_path, {"model": "tiny", "bits": 8}))
    assert other.lookup([1, 2, 3, 4], "cpu") == (0, None)
    assert [p.name for p in (tmp_path / FOLDER).iterdir()] == [other.disk.folder.name]  # the old folder is gone


def test_the_newest_turn_replaces_the_earlier_and_the_budget_holds(tmp_path):
    one = tensors(4)
    entry_bytes = sum(k.nbytes + v.nbytes for k, v in one) + 4 * 4
    cache = disk(tmp_path, max_bytes=int(2.5 * entry_bytes) + 4096)
    cache.put([1, 2, 3, 4], one)
    cache.put([1, 2, 3, 4, 5, 6], tensors(6))  # the next turn of the same chat holds the first
    cache.flush()
    assert [e.ids for e in cache.entries.values()] == [[1, 2, 3, 4, 5, 6]]
    for start in (10, 20, 30):
        cache.put([start, start + 1, start + 2, start + 3], tensors(4))
    cache.flush()
    assert cache.bytes <= cache.max_bytes and len(list(cache.folder.iterdir())) == len(cache.entries)
    assert [30, 31, 32, 33] in [e.ids for e in cache.entries.values()]  # the least recently used went first


def test_a_write_cut_by_a_kill_leaves_nothing_that_is_read(tmp_path):
    cache = disk(tmp_path)
    (cache.folder / "deadbeef.tmp").write_bytes(b"half a file")
    (cache.folder / "broken.safetensors").write_bytes(b"\x00" * 10)
    again = disk(tmp_path)
    assert again.entries == {} and list(again.folder.iterdir()) == []


def test_after_a_restart_the_next_turn_computes_only_its_new_tokens(engine_for, tiny_checkpoint, tiny_model,
                                                                    tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model_dir)
    tiny_model.path = model_dir  # (the loaded model as if loaded from there)
    try:
        first = engine_for(tiny_model, prompt_cache_disk_mb=64)
        turn = first.submit(GenerationRequest(query="你好 hello world", max_new_tokens=12, **GREEDY)).wait(60)
        first.prefix_cache.disk.flush()
        first.close()
        history = [("你好 hello world", turn.text)]
        follow_up = GenerationRequest(query="and then?", history=history, max_new_tokens=8, **GREEDY)
        cold = engine_for(tiny_model, prompt_cache_mb=0).submit(follow_up).wait(60)
        restarted = engine_for(tiny_model, prompt_cache_disk_mb=64)  # a new process would start like this
        warm = restarted.submit(follow_up).wait(60)
    finally:
        tiny_model.path = tiny_checkpoint
    assert warm.cached_tokens >= turn.prompt_tokens and cold.cached_tokens == 0
    assert warm.text == cold.text  # the same reply, from the cached keys and values
    assert restarted.prefix_cache.usage()["disk"]["entries"] >= 1


def test_zero_turns_the_disk_tier_off(engine_for, tiny_model):
    engine = engine_for(tiny_model, prompt_cache_disk_mb=0)
    assert engine.prefix_cache.disk is None and "disk" not in engine.prefix_cache.usage()
    engine.submit(GenerationRequest(query="hi", max_new_tokens=3, **GREEDY)).wait(60)
    assert len(engine.prefix_cache) == 1  # the memory tier alone


def test_the_chat_templates_start_is_cached_at_start_in_memory_only(engine_for, tiny_checkpoint, tiny_model,
                                                                    tmp_path):
    """A new engine holds the template's start before any request, not on disk (that tier holds conversations);
    a raw prompt that does not begin with it reuses nothing, and without a prefix cache nothing is run."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model_dir, ignore=shutil.ignore_patterns(FOLDER))  # (other tests' entries)
    tiny_model.path = model_dir
    try:
        engine = engine_for(tiny_model, prompt_cache_disk_mb=64)
    finally:
        tiny_model.path = tiny_checkpoint
    start = tiny_model.tokenizer.conversation_start()
    (entry,) = engine.prefix_cache.entries.values()
    assert entry.ids == start and entry.tensors[0][0].shape[2] == len(start)
    engine.prefix_cache.disk.flush()
    assert engine.prefix_cache.disk.entries == {} and list(engine.prefix_cache.disk.folder.iterdir()) == []
    raw = engine.submit(GenerationRequest(query="", prompt_ids=start[2:] + [5, 6, 7], max_new_tokens=2,
                                          **GREEDY)).wait(60)
    assert raw.cached_tokens == 0 and raw.finish_reason == "length"
    assert engine_for(tiny_model, prompt_cache_mb=0).prefix_cache.entries == {}
