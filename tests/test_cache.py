"""The answer cache on a shared filesystem: one append-only shard per writing process, readers merge; nothing is
lost or duplicated with several writer processes, a torn last line is ignored, an old SQLite cache is still read."""
import json
import multiprocessing as mp
import sqlite3
import threading

import pytest

from autorule_lib.cache import CacheCorruptError, ResponseCache, cache_key

N_PROCS, N_KEYS = 4, 1500


def writer(path, proc, barrier):
    cache = ResponseCache(path)
    barrier.wait()  # all start writing at once
    for i in range(N_KEYS):
        cache.put({"proc": proc, "i": i}, {"answer": f"{proc}-{i}", "text": "é" * (i % 7)})
        cache.put({"common": i}, {"answer": i})  # every process answers these too: same key, same answer


def test_concurrent_writer_processes_lose_and_duplicate_nothing(tmp_path):
    path = tmp_path / "cache" / "verdicts.sqlite"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(N_PROCS)
    procs = [ctx.Process(target=writer, args=(path, p, barrier)) for p in range(N_PROCS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    merged = ResponseCache(path)
    assert len(merged) == N_PROCS * N_KEYS + N_KEYS
    assert all(merged.get({"proc": p, "i": i}) == {"answer": f"{p}-{i}", "text": "é" * (i % 7)}
               for p in range(N_PROCS) for i in range(N_KEYS))
    assert merged.get({"common": 7}) == {"answer": 7}
    shards = list((tmp_path / "cache" / "verdicts.shards").glob("*.jsonl"))
    assert len(shards) == N_PROCS  # one file per writer: no file written by two processes
    assert not list(tmp_path.rglob("*-wal")) and not path.exists()  # no SQLite (and no WAL) on the shared dir


def test_threads_share_one_shard_and_a_reader_sees_other_writers(tmp_path):
    a, b = ResponseCache(tmp_path / "c.sqlite"), ResponseCache(tmp_path / "c.sqlite")
    threads = [threading.Thread(target=lambda t=t: [a.put({"t": t, "i": i}, i) for i in range(300)]) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b._last_refresh = 0  # b looked before a wrote: its next miss looks again
    assert b.get({"t": 3, "i": 299}) == 299 and len(b) == 1200 and {"t": 0, "i": 0} in b


def test_torn_last_line_is_ignored_and_a_reused_pid_appends_cleanly(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    cache.put({"q": 1}, "one")
    cache.close()
    shard = next((tmp_path / "c.shards").glob("*.jsonl"))
    with open(shard, "ab") as f:  # a kill in the middle of the next write
        f.write(b'{"k": "' + cache_key({"q": 2}).encode() + b'", "v": "\\"tw')
    reread = ResponseCache(tmp_path / "c.sqlite")
    assert reread.get({"q": 1}) == "one" and reread.get({"q": 2}) is None and len(reread) == 1
    reread.put({"q": 3}, "three")  # same host and pid as the dead writer: the same shard, torn tail cut first
    assert ResponseCache(tmp_path / "c.sqlite").get({"q": 3}) == "three"
    assert all(json.loads(line) for line in shard.read_text().splitlines())


def test_a_corrupt_line_names_the_file(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    cache.put({"q": 1}, "one")
    shard = next((tmp_path / "c.shards").glob("*.jsonl"))
    shard.write_bytes(b"garbage\n" + shard.read_bytes())
    with pytest.raises(CacheCorruptError, match=f"{shard.name}.*move the file aside"):
        ResponseCache(tmp_path / "c.sqlite")


def test_an_old_sqlite_cache_is_still_read(tmp_path):
    old = tmp_path / "verdicts.sqlite"
    conn = sqlite3.connect(old)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE answers (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL)")
    conn.execute("INSERT INTO answers (key, value) VALUES (?, ?)", (cache_key({"q": "old"}), json.dumps([1, 2])))
    conn.commit()
    conn.close()
    cache = ResponseCache(old)
    assert cache.get({"q": "old"}) == [1, 2]
    cache.put({"q": "new"}, 3)
    assert ResponseCache(old).get({"q": "new"}) == 3 and len(ResponseCache(old)) == 2
