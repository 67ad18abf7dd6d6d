"""`shadowctl tap` rejects bad input with a message that says where and what (exit code 2), not a traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from shadowctl.cli.app import app


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--service", "nochat"], "--service 'nochat': expected NAMESPACE/NAME"),
        (["--service", "ns/chat", "--listen", "8080"], "--listen '8080': expected HOST:PORT"),
        (["--service", "ns/chat", "--mqtt", "tcp://b:1883"], "--mqtt: 'tcp://b:1883' is not a broker URL"),
        (["--service", "ns/chat", "--mirror-to", "candidate:80"], "--mirror-to 'candidate:80'"),
    ],
)
def test_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["tap", "--upstream", "http://127.0.0.1:8000", *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_bad_upstream() -> None:
    result = CliRunner().invoke(app, ["tap", "--upstream", "localhost:8000", "--service", "ns/chat"])
    assert result.exit_code == 2 and "--upstream 'localhost:8000'" in result.output
