"""Per-user state and conversation turns in a real database (SQLAlchemy).

SQLite in WAL mode is the embedded default, with `synchronous=FULL` (a committed transaction
survives a killed process and a power loss; `synchronous="NORMAL"` trades the power-loss guarantee
for one fsync less per commit) and `secure_delete` (a deleted user's text is overwritten, and
`delete_user` checkpoints the WAL, so the forgotten text leaves the files);
any SQLAlchemy URL works, e.g. postgresql+psycopg://user@host/db.

A read-modify-write of a user's state (`update_exchange`, `update_state`) is one transaction that
holds the write lock from its start: `BEGIN IMMEDIATE` on SQLite (pysqlite's own transaction
handling is turned off, as SQLAlchemy's docs advise, because it began the transaction only at the
first write, after the read), a row lock (`SELECT ... FOR UPDATE`) on PostgreSQL. So several server
processes on one database never lose a turn counter update. On PostgreSQL with the pgvector
extension available, turn embeddings are also kept in a `vector` column and the memory search
runs in the database (`<=>`, cosine distance); without it, memories are searched exactly in Python.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np
from sqlalchemy import ForeignKey, Integer, LargeBinary, String, Text, create_engine, delete, event, func, select, text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

logger = logging.getLogger(__name__)


def _vector_literal(vector: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in np.asarray(vector, np.float32).ravel()) + "]"


class Base(DeclarativeBase):
    pass


class UserRow(Base):
    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    state: Mapped[str] = mapped_column(Text, default="{}")
    updated: Mapped[float] = mapped_column(default=time.time)


class TurnRow(Base):
    __tablename__ = "turns"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    persona: Mapped[Optional[str]] = mapped_column(String(128), nullable=True)
    embedding: Mapped[Optional[bytes]] = mapped_column(LargeBinary, nullable=True)
    created: Mapped[float] = mapped_column(default=time.time)


SYNCHRONOUS = ("FULL", "NORMAL")


def _write_state(session: Session, row: Optional[UserRow], user_id: str, state: dict[str, Any]) -> None:
    """Insert the user's row (flushed, so turns can reference it) or update its state."""
    if row is None:
        session.add(UserRow(id=user_id, state=json.dumps(state)))
        session.flush()
    else:
        row.state, row.updated = json.dumps(state), time.time()


def _parse_state(user_id: str, raw: str) -> dict[str, Any]:
    try:
        state = json.loads(raw)
    except ValueError as err:
        state = None
        logger.warning("the stored state of user %r is corrupt (%s): starting it afresh", user_id, err)
    return state if isinstance(state, dict) else {}


class Storage:
    def __init__(self, url: str = "sqlite:///personaweave.db", synchronous: str = "FULL") -> None:
        if synchronous.upper() not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, not {synchronous!r}.")
        self.engine = create_engine(url)
        self.sqlite = url.startswith("sqlite")
        if self.sqlite:
            @event.listens_for(self.engine, "connect")
            def _sqlite_pragmas(connection, _record):  # noqa: ANN001
                connection.isolation_level = None  # no implicit BEGIN at the first write: `_begin` below
                cursor = connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                # FULL: also durable against a power loss; NORMAL: against a killed process only
                cursor.execute(f"PRAGMA synchronous={synchronous.upper()}")
                cursor.execute("PRAGMA secure_delete=ON")  # deleted text is overwritten, not left in free pages
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.close()

            @event.listens_for(self.engine, "begin")
            def _begin(connection):  # noqa: ANN001
                # a writer takes the write lock before its first read: no other writer slips in between
                connection.exec_driver_sql("BEGIN IMMEDIATE" if connection.get_execution_options().get("write")
                                           else "BEGIN")
        # the engine for transactions that write (same pool: only the BEGIN differs on SQLite)
        self.writer = self.engine.execution_options(write=True)
        Base.metadata.create_all(self.engine)
        self.pgvector = self.engine.dialect.name == "postgresql" and self._enable_pgvector()

    def _enable_pgvector(self) -> bool:
        try:
            with self.engine.begin() as conn:
                conn.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
                conn.execute(text("ALTER TABLE turns ADD COLUMN IF NOT EXISTS embedding_vec vector"))
                # turns stored before the column existed (or by a server without pgvector)
                rows = conn.execute(text("SELECT id, embedding FROM turns "
                                         "WHERE embedding IS NOT NULL AND embedding_vec IS NULL")).all()
                for turn_id, blob in rows:
                    conn.execute(text("UPDATE turns SET embedding_vec = CAST(:v AS vector) WHERE id = :id"),
                                 {"v": _vector_literal(np.frombuffer(blob, np.float32)), "id": turn_id})
            return True
        except SQLAlchemyError as err:
            logger.warning("pgvector is not available (%s); memories are searched exactly in Python.",
                           str(err.orig if hasattr(err, "orig") else err).splitlines()[0])
            return False

    def state(self, user_id: str) -> Optional[dict[str, Any]]:
        with Session(self.engine) as session:
            row = session.get(UserRow, user_id)
            return None if row is None else _parse_state(user_id, row.state)

    def iter_states(self):
        """(user id, state) of every user, for rebuilding in-memory state after a restart."""
        with Session(self.engine) as session:
            rows = session.execute(select(UserRow.id, UserRow.state)).all()
        for user_id, raw in rows:
            try:
                state = json.loads(raw)
                if not isinstance(state, dict):
                    raise ValueError(f"a {type(state).__name__}, not an object")
            except ValueError as err:  # one corrupt row must not keep the server down
                logger.warning("skipping the corrupt stored state of user %r: %s", user_id, err)
                continue
            yield user_id, state

    def save_state(self, user_id: str, state: dict[str, Any]) -> None:
        with Session(self.writer) as session, session.begin():
            _write_state(session, session.get(UserRow, user_id), user_id, state)

    def add_exchange(self, user_id: str, state: dict[str, Any], turns: list[tuple[str, str, Optional[str],
                                                                             Optional[np.ndarray]]]) -> None:
        """The user's turn, the reply and the new state in one transaction: all or nothing. The state
        is written as given: for a change of the stored state, use `update_exchange`."""
        with Session(self.writer) as session, session.begin():
            _write_state(session, session.get(UserRow, user_id), user_id, state)
            self._add_turns(session, user_id, turns)

    def update_exchange(self, user_id: str, change: Callable[[dict[str, Any]], dict[str, Any]],
                        turns: Sequence[tuple[str, str, Optional[str], Optional[np.ndarray]]] = ()
                        ) -> dict[str, Any]:
        """Read the user's state, `change(state) -> new state`, write it and add `turns`, all in one
        transaction that holds the write lock (SQLite) or the user's row lock (PostgreSQL) from the
        read on: concurrent updates from other threads or processes are serialised, none is lost.
        Returns the new state."""
        for attempt in range(3):
            try:
                return self._update_exchange(user_id, change, turns)
            except IntegrityError:  # two first writes of a new user on a database without upsert
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def update_state(self, user_id: str, change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        return self.update_exchange(user_id, change)

    def _update_exchange(self, user_id, change, turns) -> dict[str, Any]:
        with Session(self.writer) as session, session.begin():
            if self.engine.dialect.name == "postgresql":  # the row to lock must exist: insert it if missing
                from sqlalchemy.dialects.postgresql import insert

                session.execute(insert(UserRow).values(id=user_id, state="{}", updated=time.time())
                                .on_conflict_do_nothing())
            row = session.get(UserRow, user_id, with_for_update=True)  # FOR UPDATE (SQLite: BEGIN IMMEDIATE)
            state = change(_parse_state(user_id, row.state) if row is not None else {})
            _write_state(session, row, user_id, state)
            self._add_turns(session, user_id, turns)
            return state

    def _add_turns(self, session: Session, user_id: str, turns) -> None:
        for role, content, persona, vector in turns:
            blob = None if vector is None else np.asarray(vector, np.float32).tobytes()
            row = TurnRow(user_id=user_id, role=role, content=content, persona=persona, embedding=blob)
            session.add(row)
            if self.pgvector and vector is not None:
                session.flush()
                session.execute(text("UPDATE turns SET embedding_vec = CAST(:v AS vector) WHERE id = :id"),
                                {"v": _vector_literal(vector), "id": row.id})

    def history(self, user_id: str, limit: Optional[int] = None) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            query = select(TurnRow).where(TurnRow.user_id == user_id).order_by(TurnRow.id.desc())
            rows = session.scalars(query.limit(limit) if limit is not None else query).all()
            return [{"role": r.role, "content": r.content, "persona": r.persona} for r in reversed(rows)]

    def count_turns(self, user_id: str) -> int:
        with Session(self.engine) as session:
            return int(session.scalar(select(func.count()).select_from(TurnRow).where(TurnRow.user_id == user_id)))

    def user_memories(self, user_id: str) -> tuple[list[str], Optional[np.ndarray]]:
        """(texts, unit vectors) of the user's own past turns that have embeddings."""
        with Session(self.engine) as session:
            rows = session.scalars(select(TurnRow).where(TurnRow.user_id == user_id, TurnRow.role == "user",
                                                         TurnRow.embedding.is_not(None))).all()
            if not rows:
                return [], None
            return [r.content for r in rows], np.stack([np.frombuffer(r.embedding, np.float32) for r in rows])

    def search_memories(self, user_id: str, vector: np.ndarray, k: int, min_similarity: float) -> list[str]:
        """The user's own past turns closest to `vector` (unit length) by cosine, best first."""
        if self.pgvector:
            sql = text("SELECT content, 1 - (embedding_vec <=> CAST(:q AS vector)) FROM turns "
                       "WHERE user_id = :u AND role = 'user' AND embedding_vec IS NOT NULL "
                       "ORDER BY embedding_vec <=> CAST(:q AS vector) LIMIT :k")
            with self.engine.connect() as conn:
                rows = conn.execute(sql, {"q": _vector_literal(vector), "u": user_id, "k": k}).all()
            return [content for content, sim in rows if sim >= min_similarity]
        texts, vectors = self.user_memories(user_id)
        if vectors is None:
            return []
        sims = vectors @ np.asarray(vector, np.float32)
        return [texts[i] for i in np.argsort(-sims)[:k] if sims[i] >= min_similarity]

    def delete_user(self, user_id: str) -> bool:
        with Session(self.writer) as session, session.begin():
            session.execute(delete(TurnRow).where(TurnRow.user_id == user_id))
            deleted = session.execute(delete(UserRow).where(UserRow.id == user_id)).rowcount > 0
        if deleted and self.sqlite:  # the deleted text must not stay in the write-ahead log either
            raw = self.engine.raw_connection()  # outside any transaction (a checkpoint cannot run in one)
            try:
                busy = raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            finally:
                raw.close()
            if busy:  # a reader holds the log: the next checkpoint (SQLite's own, at the latest) clears it
                logger.warning("the WAL checkpoint after deleting %r was blocked by a reader", user_id)
        return deleted
