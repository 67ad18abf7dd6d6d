"""Errors of the local-environment simulators (model server, mesh, load generator)."""

from __future__ import annotations

from shadowctl.errors import ShadowctlError


class SimError(ShadowctlError):
    """A simulator cannot do what it was asked (bad knob, bad route table, port in use)."""


class KnobError(SimError, ValueError):
    """A model-server knob has a bad name or value; the message names the knob."""
