"""Logging for the simulators' standalone processes: to stderr, so stdout carries only what scripts read."""

from __future__ import annotations

import sys

import structlog


def log_to_stderr() -> None:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
