"""How a prompt version is applied (issue 18): the one enum the policy, the route setting and the tap share.

Its own small module so that the tap, which reads route settings, does not load the whole policy model.
The rules themselves are :mod:`shadowctl.compare.prompts`."""

from __future__ import annotations

import enum


class PromptApply(str, enum.Enum):
    """How a prompt version is applied to a candidate request (docs/prompts.md)."""

    replace_system = "replaceSystem"  # the request's system prompt (= the primary's text) becomes the candidate's
    template = "template"  # the user's input, taken out of the primary's template, rendered in the candidate's
