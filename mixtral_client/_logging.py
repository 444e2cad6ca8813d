"""Opt-in logging: ``MIXTRAL_LOG=debug`` (or info, warning) logs requests, with keys redacted."""

from __future__ import annotations

import logging
from collections.abc import Mapping

__all__ = ["setup_logging"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def setup_logging(env: Mapping[str, str]) -> None:
    """Attach one stderr handler to the ``mixtral_client`` logger when ``MIXTRAL_LOG`` asks for it."""
    level = _LEVELS.get(env.get("MIXTRAL_LOG", "").strip().lower())
    if level is None:
        return
    logger = logging.getLogger("mixtral_client")
    logger.setLevel(level)
    if not any(getattr(h, "_mixtral", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[mixtral %(levelname)s] %(message)s"))
        handler._mixtral = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
