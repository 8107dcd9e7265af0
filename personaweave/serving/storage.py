"""Per-user state and conversation turns in a real database (SQLAlchemy).

SQLite in WAL mode is the embedded default, with `synchronous=FULL` (a committed transaction
survives a killed process and a power loss; `synchronous="NORMAL"` trades the power-loss guarantee
for one fsync less per commit) and `secure_delete` (a deleted user's text is overwritten, and
`delete_user` checkpoints the WAL, so the forgotten text leaves the files);
any SQLAlchemy URL works, e.g. postgresql+psycopg://user@host/db. On PostgreSQL with the pgvector
extension available, turn embeddings are also kept in a `vector` column and the memory search
runs in the database (`<=>`, cosine distance); without it, memories are searched exactly in Python.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Optional

import numpy as np
from sqlalchemy import ForeignKey, Integer, LargeBinary, String, Text, create_engine, delete, event, func, select, text
from sqlalchemy.exc import SQLAlchemyError
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


class Storage:
    def __init__(self, url: str = "sqlite:///personaweave.db", synchronous: str = "FULL") -> None:
        if synchronous.upper() not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, not {synchronous!r}.")
        self.engine = create_engine(url)
        self.sqlite = url.startswith("sqlite")
        if self.sqlite:
            @event.listens_for(self.engine, "connect")
            def _sqlite_pragmas(connection, _record):  # noqa: ANN001
                cursor = connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                # FULL: also durable against a power loss; NORMAL: against a killed process only
                cursor.execute(f"PRAGMA synchronous={synchronous.upper()}")
                cursor.execute("PRAGMA secure_delete=ON")  # deleted text is overwritten, not left in free pages
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.close()
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
            if row is None:
                return None
            try:
                state = json.loads(row.state)
            except ValueError as err:
                state = None
                logger.warning("the stored state of user %r is corrupt (%s): starting it afresh", user_id, err)
            return state if isinstance(state, dict) else {}

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
        with Session(self.engine) as session, session.begin():
            row = session.get(UserRow, user_id)
            if row is None:
                session.add(UserRow(id=user_id, state=json.dumps(state)))
            else:
                row.state, row.updated = json.dumps(state), time.time()

    def add_exchange(self, user_id: str, state: dict[str, Any], turns: list[tuple[str, str, Optional[str],
                                                                             Optional[np.ndarray]]]) -> None:
        """The user's turn, the reply and the new state in one transaction: all or nothing."""
        with Session(self.engine) as session, session.begin():
            row = session.get(UserRow, user_id)
            if row is None:
                session.add(UserRow(id=user_id, state=json.dumps(state)))
                session.flush()
            else:
                row.state, row.updated = json.dumps(state), time.time()
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
        with Session(self.engine) as session, session.begin():
            session.execute(delete(TurnRow).where(TurnRow.user_id == user_id))
            deleted = session.execute(delete(UserRow).where(UserRow.id == user_id)).rowcount > 0
        if deleted and self.sqlite:  # the deleted text must not stay in the write-ahead log either
            with self.engine.connect() as conn:
                busy = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").first()[0]
            if busy:  # a reader holds the log: the next checkpoint (SQLite's own, at the latest) clears it
                logger.warning("the WAL checkpoint after deleting %r was blocked by a reader", user_id)
        return deleted
