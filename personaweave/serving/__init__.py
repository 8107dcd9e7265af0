"""The OpenAI-compatible personality service (FastAPI)."""

from personaweave.serving.app import PersonaService, create_app
from personaweave.serving.storage import Storage

__all__ = ["PersonaService", "Storage", "create_app"]
