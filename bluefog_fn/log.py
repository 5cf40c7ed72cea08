"""The library's log: the standard ``logging`` logger ``bluefog_fn``, every record carrying its rank.

The library never prints.  It logs warnings users must know about (ranks oversubscribing the
machine's cores, MPI initialized with ``MPI_THREAD_MULTIPLE``, a window never freed), ``INFO``
when a world starts and ``DEBUG`` when a plan is traced.

Configuration follows library practice: nothing is installed by default, so an application that
configures ``logging`` receives the records through its own handlers, and one that configures
nothing still sees warnings on stderr (Python's last-resort handler).  ``BLUEFOG_FN_LOG_LEVEL``
(``DEBUG``, ``INFO``, ``WARNING``, ``ERROR`` or a number) sets the logger's level and adds one
stderr handler printing ``[bluefog_fn rank R LEVEL] message``.

Every record has a ``rank`` attribute (the process's world rank; under an MPI launcher before
``bf.init``, the launcher's rank), usable in format strings as ``%(rank)s``.

Example:
    >>> import logging
    >>> from bluefog_fn.log import get_logger
    >>> get_logger().name
    'bluefog_fn'
    >>> get_logger("world").name
    'bluefog_fn.world'
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "bluefog_fn"
ENV = "BLUEFOG_FN_LOG_LEVEL"
FORMAT = "[bluefog_fn rank %(rank)s %(levelname)s] %(message)s"

_RANK_ENV = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def current_rank() -> int:
    """This process's world rank: from the process world once started, else the launcher's."""
    from .world import _process_world  # deferred: world imports the modules that log

    process = _process_world()
    if process is not None:
        return process.rank
    for key in _RANK_ENV:
        raw = os.environ.get(key)
        if raw is not None and raw.isdigit():
            return int(raw)
    return 0


class RankFilter(logging.Filter):
    """Adds ``record.rank`` (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "rank"):
            record.rank = current_rank()
        return True


_FILTER = RankFilter()


def _level_from_env(raw: str) -> int:
    value = raw.strip()
    if value.lstrip("-").isdigit():
        return int(value)
    level = logging.getLevelName(value.upper())
    if not isinstance(level, int):
        raise ValueError(
            f"{ENV} must be DEBUG, INFO, WARNING, ERROR, CRITICAL or a number, got {raw!r}"
        )
    return level


def _configure(logger: logging.Logger) -> None:
    """Apply ``BLUEFOG_FN_LOG_LEVEL`` once (the handler it adds is marked, never added twice)."""
    logger.addFilter(_FILTER)
    raw = os.environ.get(ENV)
    if not raw:
        return
    logger.setLevel(_level_from_env(raw))
    if not any(getattr(h, "_bluefog_fn", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(_FILTER)  # records of child loggers skip the parent's filters
        handler._bluefog_fn = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


def get_logger(name: str = "") -> logging.Logger:
    """The ``bluefog_fn`` logger, or its child ``bluefog_fn.<name>``, adding the rank to records.

    The library logger is configured from ``BLUEFOG_FN_LOG_LEVEL`` the first time it is asked
    for.  Records of every logger returned here carry ``record.rank``.

    Example:
        >>> from bluefog_fn.log import get_logger
        >>> get_logger("world").isEnabledFor(50)
        True
    """
    root = logging.getLogger(LOGGER_NAME)
    if _FILTER not in root.filters:
        _configure(root)
    if not name:
        return root
    logger = root.getChild(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger
