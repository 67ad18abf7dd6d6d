"""Reading ShadowPolicy files: the file system side of the policy loader (the core parses text only)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from shadowctl.policy import PolicyError, Problem, ShadowPolicy
from shadowctl.policy.loader import ParsedPolicy, parse_documents
from shadowctl.policy.yaml_bounds import YamlLimits


def policy_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and directories (recursively: *.yaml, *.yml) in a stable order."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out.extend(sorted(x for x in p.rglob("*") if x.suffix in (".yaml", ".yml") and x.is_file()))
        else:
            out.append(p)
    return out


def _read(path: Path, limits: YamlLimits) -> str:
    """The file's text; a file larger than the limit is refused before it is read."""
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise PolicyError([Problem(str(path), 1, 1, "", f"the file is {size} bytes, more than the limit of "
                                                           f"{limits.max_bytes}")])
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise PolicyError([Problem(str(path), 1, 1, "", "no such file")]) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([Problem(str(path), 1, 1, "", f"cannot read the file: {exc}")]) from exc


def load_documents(path: str | Path, limits: YamlLimits = YamlLimits()) -> list[ParsedPolicy]:
    """Every ShadowPolicy in one file, each with its data as written and its YAML node."""
    p = Path(path)
    return parse_documents(_read(p, limits), str(p), limits)


def load_policies(path: str | Path, limits: YamlLimits = YamlLimits()) -> list[ShadowPolicy]:
    """Load every ShadowPolicy in one file."""
    return [d.policy for d in load_documents(path, limits)]


def load_policy(path: str | Path, name: str | None = None) -> ShadowPolicy:
    """Load one ShadowPolicy from a file (by `name` when the file holds several)."""
    policies = load_policies(path)
    if name is not None:
        for pol in policies:
            if pol.metadata.name == name:
                return pol
        raise PolicyError([Problem(str(path), 1, 1, "", f"no ShadowPolicy named {name!r} in the file")])
    if len(policies) > 1:
        names = ", ".join(p.metadata.name for p in policies)
        raise PolicyError([Problem(str(path), 1, 1, "", f"the file holds several policies ({names}); name one")])
    return policies[0]
