"""The OpenAI-compatible personality service (FastAPI)."""

from .app import PersonaService, create_app
from .storage import Storage

__all__ = ["PersonaService", "Storage", "create_app"]
