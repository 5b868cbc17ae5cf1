"""What a killed writer leaves behind (SIGKILL and power loss run no cleanup): the next run that writes in the same
folder removes its temporaries, and a model folder moved aside for a replacement that never arrived is put back."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cadenza.artifacts import atomic_dir, sweep_abandoned, temporary_sibling, writer_tag
from cadenza.ecd.embed_cache import EmbeddingCache
from cadenza.llm import token_store
from cadenza.llm.tokenize import TokenizedRows


def kill_when_ready(code: str, ready: Path) -> None:
    """Run `code` in another Python process until it creates `ready`, then SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, "the writer ended before it was killed"
        assert time.monotonic() < deadline, "the writer never got ready"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def chunks(n: int, sleep_after: Path = None):
    ids = [np.arange(5 + i % 3, dtype=np.int64) for i in range(n)]
    yield np.arange(n), TokenizedRows(ids, np.full(n, 2, dtype=np.int64), 0)
    if sleep_after is not None:
        sleep_after.touch()
        time.sleep(600)


def test_a_model_folder_written_by_a_killed_process_is_removed_by_the_next_write(tmp_path):
    final, ready = tmp_path / "runs" / "model", tmp_path / "ready"
    kill_when_ready(f"""
import time
from pathlib import Path
from cadenza.artifacts import atomic_dir
with atomic_dir(Path({str(final)!r})) as tmp:
    (tmp / "weights").write_bytes(bytes(10_000))
    Path({str(ready)!r}).touch()
    time.sleep(600)
""", ready)
    left = [p.name for p in final.parent.iterdir()]
    assert len(left) == 1 and left[0].startswith(".model.") and left[0].endswith(".tmp")
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("new")
    assert [p.name for p in final.parent.iterdir()] == ["model"]
    assert (final / "weights").read_text() == "new"


def test_a_token_store_of_a_killed_pass_is_removed_by_the_next_pass(tmp_path):
    tokens, ready = tmp_path / "tokens", tmp_path / "ready"
    kill_when_ready(f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_leftovers import chunks
from cadenza.llm import token_store
token_store.write(Path({str(tokens / "stream-a")!r}), chunks(40, Path({str(ready)!r})), 80, {{}})
""", ready)
    assert [p.name for p in tokens.iterdir() if p.name.endswith(".tmp")]  # the killed pass's ids and index
    rows, _ = token_store.write(tokens / "stream-b", chunks(40), 40, {})
    assert len(rows) == 40 and rows.ids[3].tolist() == list(range(5))
    assert sorted(p.name for p in tokens.iterdir()) == ["stream-b"]


def test_an_embedding_shard_of_a_killed_run_is_removed_when_the_cache_opens(tmp_path):
    folder, ready = tmp_path / "embeddings", tmp_path / "ready"
    cache = EmbeddingCache(folder)
    cache.add(_keys(3), np.ones((3, 4), np.float32))
    kill_when_ready(f"""
import time
from pathlib import Path
from cadenza.artifacts import temporary_sibling
with open(temporary_sibling(Path({str(folder / "shard-x.safetensors")!r})), "wb") as f:
    f.write(bytes(10_000))
    f.flush()
    Path({str(ready)!r}).touch()
    time.sleep(600)
""", ready)
    assert len(list(folder.glob(".shard-x.safetensors.*.tmp"))) == 1
    opened = EmbeddingCache(folder).open()
    assert len(opened.shards) == 1 and not list(folder.glob(".*"))


def _keys(n: int) -> np.ndarray:
    from cadenza.ecd.embed_cache import KEY

    return np.frombuffer(np.arange(2 * n, dtype=np.uint64).tobytes(), KEY)


def test_sweep_removes_only_what_a_dead_writer_of_this_machine_left(tmp_path):
    pid, host = dead_pid(), writer_tag().split("@", 1)[1]

    def left(name: str, kind: str, tag: str) -> Path:
        path = tmp_path / f".{name}.0123abcd.{tag}.{kind}"
        path.mkdir()
        (path / "file").write_text(name)
        return path

    dead, alive, other_host = f"{pid}@{host}", writer_tag(), f"{pid}@another-machine"
    left("stream-1", "tmp", dead)
    scratch = tmp_path / f".pass.k2j4_x9q.{dead}.tmp"  # the ecd pass's scratch folder (tempfile's naming)
    scratch.mkdir()
    left("model", "old", dead)  # killed after moving the old model aside, before the new one was renamed in
    (tmp_path / "kept").mkdir()
    left("kept", "old", dead)  # ... and after: the old copy is garbage
    running = left("stream-2", "tmp", alive)
    elsewhere = left("stream-3", "tmp", other_host)
    handled = sweep_abandoned(tmp_path)
    assert len(handled) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["kept", "model", running.name, elsewhere.name])
    assert (tmp_path / "model" / "file").read_text() == "model"
    assert sweep_abandoned(tmp_path / "missing") == []


@pytest.mark.parametrize("kind", ["tmp", "old"])
def test_temporary_names_carry_the_writer(tmp_path, kind):
    name = temporary_sibling(tmp_path / "model.v1", kind).name
    assert name.startswith(".model.v1.") and name.endswith(f".{writer_tag()}.{kind}")


def test_a_predictions_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    import pandas as pd

    from cadenza.data.stream import write_frames

    left = tmp_path / f".predictions.csv.0a1b2c3d.{dead_pid()}@{writer_tag().split('@', 1)[1]}.tmp"
    left.write_text("half a file")
    assert write_frames([pd.DataFrame({"a": [1, 2]})], tmp_path / "predictions.csv") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv"]
