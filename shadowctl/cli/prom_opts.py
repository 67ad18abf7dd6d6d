"""Prometheus connection options, shared by `shadowctl query` and `shadowctl run`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from shadowctl.cli.common import fail

URL_ENV = "SHADOWCTL_PROMETHEUS_URL"

TokenFileOpt = Annotated[
    Path | None,
    typer.Option("--prometheus-token-file", "--token-file", envvar="SHADOWCTL_PROMETHEUS_TOKEN_FILE",
                 show_default=False, help="File holding a bearer token for Prometheus; read again when Prometheus (or its "
                 "auth proxy) answers 401/403, so a rotated token (a projected service-account token) applies "
                 "without a restart."),
]
BasicAuthFileOpt = Annotated[
    Path | None,
    typer.Option("--prometheus-basic-auth-file", envvar="SHADOWCTL_PROMETHEUS_BASIC_AUTH_FILE", show_default=False,
                 help="File holding USER:PASSWORD for Prometheus's HTTP basic auth (not with a token)."),
]
CaFileOpt = Annotated[
    Path | None,
    typer.Option("--prometheus-ca-file", "--ca-file", envvar="SHADOWCTL_PROMETHEUS_CA_FILE", show_default=False,
                 help="CA bundle to verify Prometheus's certificate."),
]
InsecureOpt = Annotated[
    bool,
    typer.Option("--prometheus-insecure-skip-tls-verify", "--insecure-skip-tls-verify",
                 help="Do not verify Prometheus's certificate."),
]
TimeoutOpt = Annotated[float, typer.Option("--prometheus-timeout", "--timeout", help="Seconds per query.", min=0.1)]


def _read(path: Path, option: str) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise fail(f"{option} {path}: {exc.strerror or exc}", 2) from None
    if not text:
        raise fail(f"{option} {path}: the file is empty", 2)
    return text


def connection_options(
    token_file: Path | None, basic_auth_file: Path | None, ca_file: Path | None, insecure: bool, timeout: float
) -> dict[str, Any]:
    """Keyword arguments for PrometheusMetricSource from the options; usage errors exit with code 2."""
    if token_file is not None and basic_auth_file is not None:
        raise fail("give --prometheus-token-file or --prometheus-basic-auth-file, not both", 2)
    token = _read(token_file, "--prometheus-token-file") if token_file is not None else None
    basic: tuple[str, str] | None = None
    if basic_auth_file is not None:
        user, sep, password = _read(basic_auth_file, "--prometheus-basic-auth-file").partition(":")
        if not sep or not user:
            raise fail(f"--prometheus-basic-auth-file {basic_auth_file}: expected USER:PASSWORD on one line", 2)
        basic = (user, password)
    if ca_file is not None and not os.path.isfile(ca_file):
        raise fail(f"--prometheus-ca-file {ca_file}: no such file", 2)
    return {
        # The file too: read again when the server refuses the token (a rotated projected token).
        "bearer_token": token, "bearer_token_file": str(token_file) if token_file is not None else None,
        "basic_auth": basic, "ca_file": str(ca_file) if ca_file else None,
        "insecure_skip_verify": insecure, "timeout": timeout,
    }
