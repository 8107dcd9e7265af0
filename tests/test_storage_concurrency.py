"""Concurrent read-modify-write of one user's state: no update may be lost.

Every turn reads the user's stored state, increments `turns` and writes it back with the turn's
rows (`PersonaService.persist` -> `Storage.state` + `Storage.add_exchange`). Counting rows alone
cannot see a lost update (every exchange inserts its two rows even when its state write overwrote a
concurrent one), so these tests check the counter against the rows.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading

import pytest

pytest.importorskip("sqlalchemy")

from personaweave.serving.storage import Storage  # noqa: E402

THREADS, INCREMENTS = 8, 10


def increment(storage: Storage, user: str, lock: threading.Lock, start: threading.Barrier) -> None:
    """The service's read-modify-write, one turn at a time, serialised per user by `lock`."""
    start.wait()
    for i in range(INCREMENTS):
        with lock:
            state = storage.state(user) or {}
            state["turns"] = state.get("turns", 0) + 1
            storage.add_exchange(user, state, [("user", f"m{i}", "robot", None), ("assistant", "ok", "robot", None)])


def test_threads_read_modify_write_one_user_and_lose_no_update(tmp_path):
    """Each read sees the last committed write (no stale snapshot, no cached row), and each exchange
    commits its state with its turns: after 8 threads x 10 turns, turns == 80 and 160 rows."""
    storage = Storage(f"sqlite:///{tmp_path}/db.sqlite")
    lock, start = threading.Lock(), threading.Barrier(THREADS)
    threads = [threading.Thread(target=increment, args=(storage, "same", lock, start)) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert storage.state("same")["turns"] == THREADS * INCREMENTS
    assert storage.count_turns("same") == 2 * THREADS * INCREMENTS
    # a second Storage on the same file (another process's view) sees the same committed state
    assert Storage(f"sqlite:///{tmp_path}/db.sqlite").state("same")["turns"] == THREADS * INCREMENTS


def increment_in_a_process(url: str, user: str, start) -> None:
    """Another server process on the same database: no lock is shared, only the database's own."""
    storage = Storage(url)
    start.wait()
    for i in range(INCREMENTS):
        storage.update_exchange(user, lambda state: {**state, "turns": state.get("turns", 0) + 1},
                                [("user", f"m{i}", "robot", None), ("assistant", "ok", "robot", None)])


def test_processes_read_modify_write_one_user_and_lose_no_update(tmp_path):
    """8 processes x 10 turns on one SQLite file: the read, the change and the write are one
    transaction that holds the write lock from its start (BEGIN IMMEDIATE), so turns == 80.
    (Reading outside the write transaction, with the user's row already there, kept 10 of 80
    updates; for a new user, 7 of the 8 processes failed on the row's first insert.)"""
    url = f"sqlite:///{tmp_path}/db.sqlite"
    Storage(url)  # the tables exist before the processes race
    context = multiprocessing.get_context("fork")
    start = context.Barrier(THREADS)
    processes = [context.Process(target=increment_in_a_process, args=(url, "same", start)) for _ in range(THREADS)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=120)
    assert [p.exitcode for p in processes] == [0] * THREADS
    storage = Storage(url)
    assert storage.count_turns("same") == 2 * THREADS * INCREMENTS
    assert storage.state("same")["turns"] == THREADS * INCREMENTS


def test_concurrent_requests_for_one_user_keep_the_turn_counter(tmp_path, hash_encoder):
    """Through the service: 1 + 6 concurrent requests for one user -> turns == 7 in the stored state,
    not just 14 rows (the per-user lock must cover the read-modify-write)."""
    pytest.importorskip("fastapi")
    import httpx

    from personaweave.serving import PersonaService, create_app
    from personaweave.serving.memory import Memory
    from personaweave.testing import tiny_persona_model

    model, tok = tiny_persona_model()
    service = PersonaService(model.eval(), tok, Storage(f"sqlite:///{tmp_path}/db.sqlite"),
                             memory=Memory(hash_encoder), max_new_tokens=6)
    app = create_app(service)
    body = {"model": "robot", "user": "same", "messages": [{"role": "user", "content": "hello what"}]}

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            first = await client.post("/v1/chat/completions", json=body)  # the user exists: only updates race
            replies = await asyncio.gather(*[client.post("/v1/chat/completions", json=body) for _ in range(6)])
        return [r.status_code for r in [first, *replies]]

    assert asyncio.run(run()) == [200] * 7
    assert service.storage.count_turns("same") == 14
    assert service.storage.state("same")["turns"] == 7
