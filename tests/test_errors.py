"""Every exception class shadowctl defines is a ShadowctlError and is drawn in shadowctl/errors.py's tree.

The classes are found, not listed: every module of the package is imported (pkgutil.walk_packages)
and every subclass of BaseException whose module is shadowctl's is collected, so a class added
anywhere and forgotten in the tree, or not put under ShadowctlError, fails here. Private control-flow
exceptions (a leading underscore) are the one exception to the rule and must be listed as such.
"""

from __future__ import annotations

import gc
import importlib
import pkgutil
import re
from collections.abc import Iterator

import shadowctl
from shadowctl import errors
from shadowctl.errors import ShadowctlError

_NODE = re.compile(r"^(?P<rails>[│ ]*)(?P<branch>[├└]── )?(?P<name>\w+)\b")


def _import_all() -> list[str]:
    """Import every shadowctl module; return those left out because an optional extra is missing."""

    def fail(name: str) -> None:
        raise ImportError(f"cannot import package {name}")

    left_out = []
    for info in pkgutil.walk_packages(shadowctl.__path__, "shadowctl.", onerror=fail):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue  # `python -m shadowctl`: importing it runs the command line
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] == "shadowctl":
                raise
            left_out.append(f"{info.name} (needs {exc.name})")  # e.g. the demo extra's matplotlib
    return left_out


def _subclasses(cls: type[BaseException]) -> Iterator[type[BaseException]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _defined() -> dict[str, type[BaseException]]:
    _import_all()
    found: dict[str, type[BaseException]] = {}
    for cls in _subclasses(BaseException):
        if cls.__module__.split(".")[0] == "shadowctl":
            other = found.setdefault(cls.__name__, cls)
            assert other is cls, f"two exception classes are named {cls.__name__}: {other.__module__}, {cls.__module__}"
    return found


def _drawn() -> tuple[dict[str, str | None], set[str]]:
    """errors.py's tree as {class: parent drawn above it} and the private classes listed below it."""
    blocks = [b.split("\n\n")[0] for b in re.split(r"::\n\n", errors.__doc__ or "")[1:]]
    assert len(blocks) == 2, "errors.py draws the tree, then lists the private exceptions"
    assert "..." not in blocks[0], "the drawn tree must be complete"
    tree: dict[str, str | None] = {}
    stack: list[str] = []
    root_column = len(blocks[0]) - len(blocks[0].lstrip(" "))
    for line in blocks[0].splitlines():
        m = _NODE.match(line)
        assert m is not None, line
        depth = 0 if m.group("branch") is None else (len(m.group("rails")) - root_column) // 4 + 1
        del stack[depth:]
        tree[m.group("name")] = stack[-1] if stack else None
        stack.append(m.group("name"))
    private = {line.split()[0] for line in blocks[1].splitlines()}
    return tree, private


def _problems(defined: dict[str, type[BaseException]], tree: dict[str, str | None], private: set[str]) -> list[str]:
    out = []
    for name, cls in sorted(defined.items()):
        where = f"{cls.__module__}.{name}"
        if name.startswith("_"):
            if name not in private:
                out.append(f"{where}: a private exception must be listed in shadowctl/errors.py as such")
            if issubclass(cls, ShadowctlError):
                out.append(f"{where}: a ShadowctlError belongs in the tree, not among the private ones")
            continue
        if not issubclass(cls, ShadowctlError):
            out.append(f"{where} is not a ShadowctlError")
        if name not in tree:
            out.append(f"{where} is missing from the tree in shadowctl/errors.py")
        elif tree[name] is not None and tree[name] not in {b.__name__ for b in cls.__bases__}:
            out.append(f"{where} is drawn under {tree[name]}, but derives from {[b.__name__ for b in cls.__bases__]}")
    out += [f"{name} is drawn in the tree but not defined" for name in sorted(set(tree) - set(defined))]
    out += [f"{name} is listed as private but not defined" for name in sorted(private - set(defined))]
    return out


def test_every_exception_is_a_shadowctl_error_and_in_the_drawn_tree() -> None:
    defined = _defined()
    tree, private = _drawn()
    assert {"ShadowctlError", "CliError", "JudgeInputError", "_NoDataError"} <= set(defined)  # the search works
    assert tree["ShadowctlError"] is None and tree["AlreadyExists"] == "Conflict"  # and so does the drawing's
    assert _problems(defined, tree, private) == []


def test_a_forgotten_class_is_found_and_reported() -> None:
    """Classes defined now, as someone would add them to a module, are found and reported."""

    class ForgottenError(ShadowctlError):
        pass

    class PlainError(ValueError):
        pass

    for cls in (ForgottenError, PlainError):
        cls.__module__ = "shadowctl.somewhere"
    try:
        defined = _defined()
        problems = _problems(defined, *_drawn())
        assert problems == [
            "shadowctl.somewhere.ForgottenError is missing from the tree in shadowctl/errors.py",
            "shadowctl.somewhere.PlainError is not a ShadowctlError",
            "shadowctl.somewhere.PlainError is missing from the tree in shadowctl/errors.py",
        ]
    finally:
        del ForgottenError, PlainError, cls, defined
        gc.collect()  # __subclasses__ holds weak references: the other test must not see these
