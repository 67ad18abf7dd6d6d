"""The Argo CD health check (deploy/argocd/health.lua) under a real Lua 5.1, on objects from real rollouts.

Argo CD runs a resource's health script with gopher-lua (a Lua 5.1) and passes the object as the
global table ``obj``; the script returns ``{status, message}``. Here the script runs under the Debian
``lua5.1`` interpreter (hack/setup.sh installs it) in an environment cut down to what Argo CD opens
without ``useOpenLibs``: the base functions and ``table`` (no ``string``, ``math``, ``os``, ``io``, and
no string methods). The object reaches it through a small JSON-to-Lua bridge (:func:`lua_literal`:
objects become tables, arrays 1-based tables, null nil), as Argo CD converts the unstructured object.

The inputs are deploy/argocd/testdata/*.yaml, recorded from real rollouts by tests/argocd_record.py
(the reconciler against the local kube-apiserver), with their expected health in
deploy/argocd/health_test.yaml (Argo CD's own layout for resource customizations).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest_kube import KubeEnv

from shadowctl.policy.status import Phase

REPO = Path(__file__).resolve().parent.parent
ARGOCD = REPO / "deploy" / "argocd"
SCRIPT = ARGOCD / "health.lua"
CM_PATCH = ARGOCD / "argocd-cm-patch.yaml"
HEALTH_KEY = "resource.customizations.health.shadowctl.dev_ShadowPolicy"

EXPECTED = {
    Phase.pending: "Healthy",  # once the controller has looked: nothing to roll out
    Phase.shadowing: "Progressing",
    Phase.progressing: "Progressing",
    Phase.waiting_promotion: "Suspended",
    Phase.promoting: "Progressing",
    Phase.succeeded: "Healthy",
    Phase.rolling_back: "Degraded",
    Phase.rolled_back: "Degraded",
    Phase.paused: "Suspended",
    Phase.failed: "Degraded",
}
"""Every phase's Argo CD health (when the controller has seen the generation and can act)."""

# Run ``SCRIPT`` (its path is arg[1]) on ``obj`` with only what Argo CD's VM opens, and print the
# result as two lines: the status, then the message.
HARNESS = r"""
local chunk = assert(loadfile(arg[1]))
local env = {obj = obj, table = table}
for _, name in ipairs({"assert", "error", "ipairs", "next", "pairs", "pcall", "print", "rawequal", "rawget",
                       "rawset", "select", "tonumber", "tostring", "type", "unpack", "xpcall",
                       "getmetatable", "setmetatable"}) do
  env[name] = _G[name]
end
debug.setmetatable("", nil)  -- no string library: no ("x"):method() either
setfenv(chunk, env)
local ok, hs = pcall(chunk)
if not ok then
  io.stderr:write("lua error: " .. tostring(hs) .. "\n")
  os.exit(3)
end
io.write(tostring(hs.status), "\n", tostring(hs.message), "\n")
"""


def lua_literal(value: Any) -> str:
    """A Lua expression for a JSON value: the bridge Argo CD's decoding of the object amounts to."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"JSON has no {value}")
        return repr(value)
    if isinstance(value, str):
        out = []
        for ch in value:
            code = ord(ch)
            if ch in ('"', "\\"):
                out.append("\\" + ch)
            elif code < 32 or code == 127:
                out.append(f"\\{code:03d}")
            elif code > 127:
                out.extend(f"\\{b:03d}" for b in ch.encode("utf-8"))
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{lua_literal(str(k))}] = {lua_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"not JSON: {type(value).__name__}")


def lua() -> str:
    found = shutil.which("lua5.1") or ("/usr/bin/lua5.1" if os.path.exists("/usr/bin/lua5.1") else None)
    if found is None:
        pytest.fail("no lua5.1 interpreter: run hack/setup.sh (Debian package lua5.1)")
    return found


def health(obj: dict[str, Any], script: Path = SCRIPT) -> tuple[str, str]:
    """(status, message) of ``script`` for ``obj`` under lua5.1 as Argo CD runs it."""
    program = f"obj = {lua_literal(json.loads(json.dumps(obj)))}\n{HARNESS}"
    done = subprocess.run([lua(), "-", str(script)], input=program, capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 0, done.stderr
    status, message = done.stdout.split("\n", 1)
    return status, message.removesuffix("\n")


def load(path: Path) -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return obj


def cases() -> list[dict[str, Any]]:
    tests: list[dict[str, Any]] = load(ARGOCD / "health_test.yaml")["tests"]
    return tests


@pytest.mark.parametrize("case", cases(), ids=lambda c: Path(c["inputPath"]).stem)
def test_recorded_rollouts_get_their_health(case: dict[str, Any]) -> None:
    obj = load(ARGOCD / case["inputPath"])
    assert health(obj) == (case["healthStatus"]["status"], case["healthStatus"]["message"])


def test_every_recording_is_checked_and_every_phase_recorded() -> None:
    listed = {c["inputPath"] for c in cases()}
    assert listed == {f"testdata/{p.name}" for p in (ARGOCD / "testdata").glob("*.yaml")}
    recorded = {(load(ARGOCD / path).get("status") or {}).get("phase") for path in listed}
    assert set(Phase) <= recorded, f"no recorded rollout in phase {set(Phase) - recorded}: tests/argocd_record.py"


def test_every_phase_maps_to_a_health() -> None:
    """A new Phase fails here until both this table and the script's say what Argo CD shows for it."""
    assert set(EXPECTED) == set(Phase), f"phases without an Argo CD health: {set(Phase) - set(EXPECTED)}"
    base = load(ARGOCD / "testdata" / "succeeded.yaml")
    for phase, expected in EXPECTED.items():
        obj = json.loads(json.dumps(base))
        obj["status"]["phase"] = phase.value
        status, message = health(obj)
        assert status == expected, (phase, status, message)
        assert message.startswith(phase.value), message


def test_an_unknown_phase_or_a_status_of_another_shape_is_not_an_error() -> None:
    base = load(ARGOCD / "testdata" / "succeeded.yaml")
    base["status"]["phase"] = "Canarying"
    assert health(base) == ("Unknown", "Unknown phase Canarying: candidate serves 100% of traffic")
    odd = {"apiVersion": "shadowctl.dev/v1alpha1", "kind": "ShadowPolicy", "metadata": {"name": "x", "generation": 1},
           "status": {"phase": "Paused", "conditions": "not a list", "observedGeneration": "1", "step": "two"}}
    assert health(odd) == ("Suspended", "Paused")
    assert health({"metadata": {"generation": 2}, "status": {}}) == (
        "Progressing", "Waiting for the shadowctl controller to report a phase")


def test_the_harness_opens_only_what_argo_cd_does(tmp_path: Path) -> None:
    """A script that reaches for the string library fails here as it would in Argo CD."""
    for body in ('return {status = string.format("%s", "Healthy")}', 'return {status = ("x"):upper()}',
                 'return {status = os.time()}'):
        script = tmp_path / "bad.lua"
        script.write_text(body)
        program = f"obj = {{}}\n{HARNESS}"
        done = subprocess.run([lua(), "-", str(script)], input=program, capture_output=True, text=True,
                              timeout=30, check=False)
        assert done.returncode == 3 and "lua error" in done.stderr, (body, done.stdout, done.stderr)


def test_the_bridge_keeps_strings_numbers_and_arrays() -> None:
    obj = {"s": 'a "q" \\ \n ü', "i": 3, "f": 2.5, "l": [1, "two"], "n": None, "b": False}
    program = (f"obj = {lua_literal(obj)}\n"
               'io.write(obj.s, "|", obj.i + 1, "|", obj.f, "|", #obj.l, obj.l[2], "|", tostring(obj.n), "|", '
               'tostring(obj.b))')
    done = subprocess.run([lua(), "-"], input=program, capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout == 'a "q" \\ \n ü|4|2.5|2two|nil|false'


def test_the_argocd_cm_patch_carries_the_script_and_merges(kube_env: KubeEnv, tmp_path: Path) -> None:
    """The install line of the README, with the real kubectl, on an argocd-cm that already has settings."""
    patch = load(CM_PATCH)
    assert patch["data"][HEALTH_KEY] == SCRIPT.read_text(encoding="utf-8"), (
        f"{CM_PATCH.name} must carry {SCRIPT.name} verbatim (indented 4 spaces under its key)")
    kubectl = str(Path(sys.executable).parent / "kubectl")
    config = kube_env.direct_kubeconfig(tmp_path / "kubeconfig")
    env = {**os.environ, "KUBECONFIG": str(config)}
    try:
        subprocess.run([kubectl, "create", "namespace", "argocd"], env=env, capture_output=True, check=False)
        subprocess.run([kubectl, "-n", "argocd", "delete", "configmap", "argocd-cm", "--ignore-not-found"],
                       env=env, capture_output=True, check=True)
        subprocess.run([kubectl, "-n", "argocd", "create", "configmap", "argocd-cm",
                        "--from-literal=url=https://argocd.example.com"], env=env, capture_output=True, check=True)
        subprocess.run([kubectl, "-n", "argocd", "patch", "configmap", "argocd-cm", "--type", "merge",
                        "--patch-file", str(CM_PATCH)], env=env, capture_output=True, check=True, cwd=REPO)
        got = subprocess.run([kubectl, "-n", "argocd", "get", "configmap", "argocd-cm", "-o", "json"], env=env,
                             capture_output=True, text=True, check=True)
        data = json.loads(got.stdout)["data"]
        assert data["url"] == "https://argocd.example.com"
        assert data[HEALTH_KEY] == SCRIPT.read_text(encoding="utf-8")
    finally:
        subprocess.run([kubectl, "-n", "argocd", "delete", "configmap", "argocd-cm", "--ignore-not-found"],
                       env=env, capture_output=True, check=False)
