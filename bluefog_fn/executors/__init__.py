"""Executors: how each kind of world runs the ops (see :mod:`.base`)."""

from .base import Executor, WindowEngine

__all__ = ["Executor", "WindowEngine"]
