"""Backends: where tasks queue and request state lives."""

from .base import HOOKS, Backend, RequestRecord, Summary, Task, deadline
from .memory import MemoryBackend

__all__ = ["HOOKS", "Backend", "MemoryBackend", "RequestRecord", "Summary", "Task", "deadline"]
