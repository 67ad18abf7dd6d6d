"""A Mosquitto configuration with TLS, a password file and an ACL: what the tests and the demo run.

Who may do what on the broker (the ACL intent of docs/outputs.md, "Securing the broker"):

* a **tap** publishes its service's output events (``shadowctl/outputs/<namespace>/<service>/+``)
  and its policy's route-applied reports (``shadowctl/route-applied/<namespace>/<policy>/+``),
  and subscribes to its policy's route setting (``shadowctl/route/<namespace>/<policy>``);
* the **controller** subscribes to output events and route-applied reports, and publishes only
  route settings (``shadowctl/route/#``) and its own notifications (``shadowctl/events/#``): the
  two exceptions to "the controller only reads". It cannot publish an output event.

:func:`write_broker_config` writes ``mosquitto.conf``, the password file (hashed by
``mosquitto_passwd -U`` from the Debian package, so no password is ever on a command line) and
the ACL file into one folder, with the broker's serving certificate issued by a
:class:`~shadowctl.sim.pki.LocalCA`. The same three files are what a production broker needs;
docs/outputs.md shows them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shadowctl.sim.errors import SimError
from shadowctl.sim.pki import LocalCA

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"

OUTPUTS = "shadowctl/outputs"
ROUTE = "shadowctl/route"
ROUTE_APPLIED = "shadowctl/route-applied"
EVENTS = "shadowctl/events"


@dataclass(frozen=True)
class AclRule:
    """One ``topic`` line of a Mosquitto ACL: ``access`` is read (subscribe and receive), write or readwrite."""

    access: str
    topic: str

    def line(self) -> str:
        return f"topic {self.access} {self.topic}"


def tap_rules(namespace: str, service: str, policy: str | None = None) -> list[AclRule]:
    """What a tap for ``namespace/service`` may do; with ``policy``, also the route channel of that policy."""
    rules = [AclRule("write", f"{OUTPUTS}/{namespace}/{service}/+")]
    if policy is not None:
        rules += [AclRule("write", f"{ROUTE_APPLIED}/{namespace}/{policy}/+"),
                  AclRule("read", f"{ROUTE}/{namespace}/{policy}")]
    return rules


def controller_rules() -> list[AclRule]:
    """What the controller may do: read outputs and route-applied reports; write route settings and events."""
    return [AclRule("read", f"{OUTPUTS}/#"), AclRule("read", f"{ROUTE_APPLIED}/#"),
            AclRule("write", f"{ROUTE}/#"), AclRule("write", f"{EVENTS}/#")]


def acl_text(rules: Mapping[str, Sequence[AclRule]]) -> str:
    """The ACL file: a ``user`` block per user; a user not listed may do nothing."""
    blocks = []
    for user, user_rules in rules.items():
        if not user or any(c.isspace() for c in user):
            raise SimError(f"MQTT user {user!r}: a user name has no spaces")
        blocks.append("\n".join([f"user {user}", *(r.line() for r in user_rules)]))
    return "\n\n".join(blocks) + "\n"


@dataclass
class BrokerFiles:
    """What :func:`write_broker_config` wrote; ``ca`` is the CA file clients trust."""

    config: Path
    passwords: Path
    acl: Path
    ca: Path
    port: int
    host: str = "127.0.0.1"
    users: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"


def write_password_file(path: Path, users: Mapping[str, str]) -> None:
    """``user:password`` lines hashed in place by ``mosquitto_passwd -U`` (mode 0600)."""
    if not Path(MOSQUITTO_PASSWD).exists():
        raise SimError(f"needs {MOSQUITTO_PASSWD} (Debian package mosquitto)")
    for user, password in users.items():
        if ":" in user or "\n" in user + password:
            raise SimError(f"MQTT user {user!r}: no ':' in a user name, no newline in a user name or password")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.writelines(f"{user}:{password}\n" for user, password in users.items())
    answer = subprocess.run([MOSQUITTO_PASSWD, "-U", str(path)], capture_output=True, text=True, check=False)
    if answer.returncode != 0:
        raise SimError(f"mosquitto_passwd -U {path} failed: {answer.stderr.strip()[:300]}")


def write_broker_config(
    folder: Path,
    port: int,
    ca: LocalCA,
    users: Mapping[str, str],
    rules: Mapping[str, Sequence[AclRule]],
    *,
    host: str = "127.0.0.1",
    require_certificate: bool = False,
) -> BrokerFiles:
    """Write a TLS listener on ``host:port`` with passwords and an ACL; ``require_certificate``: clients must
    also present a certificate from ``ca`` (mutual TLS)."""
    folder.mkdir(parents=True, exist_ok=True)
    server = ca.issue(f"mosquitto-{port}", host, hosts=(host, "localhost"))
    files = BrokerFiles(folder / f"mosquitto-{port}.conf", folder / f"mosquitto-{port}.passwd",
                        folder / f"mosquitto-{port}.acl", ca.cert_file, port, host, dict(users))
    write_password_file(files.passwords, users)
    files.acl.write_text(acl_text(rules))
    lines = [
        f"listener {port} {host}",
        f"cafile {ca.cert_file}",
        f"certfile {server.cert}",
        f"keyfile {server.key}",
        "tls_version tlsv1.2",
        f"require_certificate {'true' if require_certificate else 'false'}",
        "allow_anonymous false",
        f"password_file {files.passwords}",
        f"acl_file {files.acl}",
        "persistence false",
    ]
    if os.geteuid() == 0:
        # As root mosquitto switches to its own user, which could not read the private key written here.
        lines.append("user root")
    files.config.write_text("\n".join(lines) + "\n")
    return files


def start_broker(config: Path, log: Path, host: str, port: int, timeout: float = 10.0, *,
                 new_session: bool = False) -> subprocess.Popen[bytes]:
    """Start ``mosquitto -c config`` (output appended to `log`) and wait until it accepts TCP connections on
    host:port; SimError with the log's tail if it exits or does not listen within `timeout` seconds.
    `new_session`: its own process group, so a signal meant for the caller's group does not reach it."""
    with log.open("ab") as out:
        proc = subprocess.Popen([MOSQUITTO, "-c", str(config)], stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                start_new_session=new_session)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SimError(f"mosquitto exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.02)
    proc.kill()
    proc.wait()
    raise SimError(f"mosquitto did not listen on {port} within {timeout}s")
