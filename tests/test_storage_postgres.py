"""The service's storage on a real PostgreSQL server, started here in a temporary folder.

Skips with the reason when no server binaries (initdb, pg_ctl) or no psycopg are available;
the pgvector test also skips when the `vector` extension is not installed on the server.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sqlalchemy")
pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'personaweave[serve]')")

from personaweave.serving import Storage  # noqa: E402
from personaweave.testing import free_port  # noqa: E402


def _pg_bin() -> str | None:
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return os.path.dirname(os.path.realpath(found))
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(versions[-1]) if versions else None


@pytest.fixture(scope="module")
def postgres_url():
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    # directly under /tmp: pytest's own temp root is private to the user running the tests
    data = Path(tempfile.mkdtemp(prefix="personaweave-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the packaged 'postgres' user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user to run the server as")
        os.chown(data, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    run = lambda *cmd: subprocess.run(prefix + list(cmd), check=True, capture_output=True, timeout=120)  # noqa: E731
    started = False
    try:
        try:
            run(os.path.join(bindir, "initdb"), "-D", str(data), "-A", "trust", "-U", "pw", "--no-sync")
            port = free_port()
            run(os.path.join(bindir, "pg_ctl"), "-D", str(data), "-l", str(data / "log"), "-w", "-o",
                f"-p {port} -h 127.0.0.1 -k {data} -c fsync=off", "start")
        except (subprocess.SubprocessError, OSError) as err:
            pytest.skip(f"could not start a PostgreSQL server: {err}")
        started = True
        yield f"postgresql+psycopg://pw@127.0.0.1:{port}/postgres"
    finally:
        if started:
            run(os.path.join(bindir, "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(data, ignore_errors=True)


def unit(seed: int, dim: int = 384) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def test_state_turns_memories_and_delete_on_postgres(postgres_url):
    storage = Storage(postgres_url)
    storage.save_state("u1", {"persona": "pirate", "turns": 0})
    near = unit(1)
    far = -near
    storage.add_exchange("u1", {"persona": "pirate", "turns": 1},
                         [("user", "I love sailing", "pirate", near), ("assistant", "Arr!", "pirate", None)])
    storage.add_exchange("u1", {"persona": "pirate", "turns": 2},
                         [("user", "taxes are dull", "pirate", far), ("assistant", "Aye.", "pirate", None)])
    assert storage.state("u1") == {"persona": "pirate", "turns": 2}
    assert storage.count_turns("u1") == 4
    assert [t["content"] for t in storage.history("u1", limit=2)] == ["taxes are dull", "Aye."]
    assert storage.search_memories("u1", near, k=2, min_similarity=0.5) == ["I love sailing"]
    assert storage.search_memories("u1", near, k=2, min_similarity=-1.0) == ["I love sailing", "taxes are dull"]
    assert storage.search_memories("nobody", near, k=2, min_similarity=0.0) == []
    assert storage.delete_user("u1") and storage.count_turns("u1") == 0 and storage.state("u1") is None


def test_pgvector_search_matches_the_exact_search(postgres_url):
    storage = Storage(postgres_url)
    if not storage.pgvector:
        pytest.skip("the PostgreSQL server has no pgvector extension (Debian bookworm does not package "
                    "postgresql-15-pgvector; it comes from the PGDG apt repository)")
    vectors = [unit(i) for i in range(20)]
    for i, v in enumerate(vectors):
        storage.add_exchange("v", {}, [("user", f"turn {i}", None, v)])
    query = unit(100)
    expected = [f"turn {i}" for i in np.argsort(-np.stack(vectors) @ query)[:5]]
    assert storage.search_memories("v", query, k=5, min_similarity=-1.0) == expected


def test_processes_read_modify_write_one_new_user_on_postgres(postgres_url):
    """8 processes x 10 turns for one user who does not exist yet: the row is upserted, then locked
    (SELECT ... FOR UPDATE) from the read to the commit, so none of the 80 updates is lost."""
    import multiprocessing

    from test_storage_concurrency import INCREMENTS, THREADS, increment_in_a_process

    Storage(postgres_url)
    context = multiprocessing.get_context("fork")
    start = context.Barrier(THREADS)
    processes = [context.Process(target=increment_in_a_process, args=(postgres_url, "racer", start))
                 for _ in range(THREADS)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=120)
    assert [p.exitcode for p in processes] == [0] * THREADS
    storage = Storage(postgres_url)
    assert storage.state("racer")["turns"] == THREADS * INCREMENTS
    assert storage.count_turns("racer") == 2 * THREADS * INCREMENTS
