"""Shared fixtures. The real Prometheus, Mosquitto and Kubernetes control plane fixtures live in plugin modules."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import pytest_timeout
from openai_stub import OpenAIStub

REPO = Path(__file__).resolve().parent.parent
SHARED_CRDS = REPO.parent / "shared" / "crds"


@pytest.fixture
def repo() -> Path:
    return REPO

pytest_plugins = ["conftest_kube", "conftest_mqtt", "conftest_prometheus"]


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """Every test starts with the logging configuration the session had: a command run through CliRunner
    (`shadowctl run --log-level warning`, `shadowctl tap`) configures structlog for the whole process, and a
    level filter left behind hid the info events a later test captures with structlog.testing.capture_logs
    (a fresh-clone run failed test_pairing_workers_run that way)."""
    import logging

    import structlog

    config = structlog.get_config()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        yield
    finally:
        structlog.configure(**config)
        root.setLevel(level)
        root.handlers[:] = handlers


@pytest_asyncio.fixture
async def stub() -> AsyncIterator[OpenAIStub]:
    """The OpenAI-compatible stub upstream (tests/openai_stub.py), started on a free port."""
    s = OpenAIStub()
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


# A hung async test shows only the event loop's select() in pytest-timeout's thread dump. Its SIGALRM
# handler runs on the loop's thread, so the running loop is reachable there: print every task's stack
# too (where each coroutine is waiting), which is what tells a lost cancellation from a slow server.
_dump_threads = pytest_timeout.dump_stacks


def _dump_stacks_and_tasks(terminal: Any) -> None:
    _dump_threads(terminal)
    loop = asyncio.events._get_running_loop()
    if loop is None:
        return
    for task in asyncio.all_tasks(loop):
        terminal.sep("~", title=f"asyncio task {task.get_name()}")
        out = io.StringIO()
        task.print_stack(file=out)
        terminal.write(out.getvalue())


pytest_timeout.dump_stacks = _dump_stacks_and_tasks
