"""Backends: where tasks queue and request state lives."""

from .base import HOOKS, Backend, RequestRecord, Task
from .memory import MemoryBackend

__all__ = ["HOOKS", "Backend", "MemoryBackend", "RequestRecord", "Task"]
