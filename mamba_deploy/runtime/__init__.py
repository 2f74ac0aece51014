"""One session API over backends: ``open_session(artifact_or_model, backend=...)``."""
from .session import BACKENDS, Session, open_session

__all__ = ["BACKENDS", "Session", "open_session"]
