"""The controller's side of a prompt rewrite: read both prompt versions from their ConfigMaps.

A policy's ``spec.target.tap.rewrite.prompt`` names a ConfigMap key for the primary's text and one for the
candidate's (kustomize's ``configMapGenerator`` makes each version a ConfigMap of its own, named with a hash of
its content). The controller reads them with ``get`` on those ConfigMaps only (``shadowctl rbac configmaps``
prints the Role), checks them (:func:`shadowctl.compare.prompts.prompt_problem`: at most 32 KiB each, a
template's placeholder) and carries both texts and their digest in the route setting, so the taps need no
access to the cluster and apply exactly what the controller read.

The digest is also part of the candidate's identity (:func:`candidate_identity`): a ConfigMap whose text changes
mid-rollout (edited in place instead of a new generated name) is a new candidate, and the analysis restarts
from the shadow phase, like a new revision of a deployment. Between the read that finds the new text and the
next tick's, the taps may already apply it while the status still names the old digest; the next tick restarts
the analysis, so answers to the old and the new text are never judged together for longer than one interval.
"""

from __future__ import annotations

from shadowctl.compare.prompts import prompt_digest, prompt_problem
from shadowctl.compare.routing import Parameters, PromptRewrite, Rewrite
from shadowctl.kube import CONFIG_MAP, KubeClient, KubeError, NotFound, ResourceRef
from shadowctl.policy.model import ConfigMapKeyRef, TapRewrite
from shadowctl.policy.prompts import PromptApply
from shadowctl.routers.base import RouterError


class PromptUnavailable(RouterError):
    """A prompt version the policy names cannot be read or used (no ConfigMap, no key, too long, a template
    without its placeholder): the rollout holds and the status says which."""


async def read_text(kube: KubeClient, namespace: str, ref: ConfigMapKeyRef, apply: PromptApply, *,
                    primary: bool) -> str:
    """The text under the key, checked for `apply`; :class:`PromptUnavailable` saying which and why."""
    which = "primary" if primary else "candidate"
    where = f"rewrite.prompt.{which}: ConfigMap {namespace}/{ref.name} key {ref.key!r}"
    try:
        obj = await kube.get(ResourceRef(CONFIG_MAP, ref.name, namespace))
    except NotFound:
        raise PromptUnavailable(f"{where}: no such ConfigMap") from None
    except KubeError as exc:
        raise PromptUnavailable(f"{where}: cannot read it: {exc}") from exc
    text = (obj.get("data") or {}).get(ref.key)
    if not isinstance(text, str):
        binary = ref.key in (obj.get("binaryData") or {})
        raise PromptUnavailable(f"{where}: no such key" + (" (it is in binaryData; put text in data)" if binary
                                                            else ""))
    problem = prompt_problem(text, apply, primary=primary)
    if problem:
        raise PromptUnavailable(f"{where}: {problem}")
    return text


async def route_rewrite(kube: KubeClient | None, namespace: str, rewrite: TapRewrite) -> Rewrite:
    """The route setting's rewrite for a policy's (the prompts read from their ConfigMaps)."""
    prompt = None
    if rewrite.prompt is not None:
        if kube is None:
            raise PromptUnavailable("rewrite.prompt: the controller has no Kubernetes client to read the ConfigMaps")
        spec = rewrite.prompt
        primary = await read_text(kube, namespace, spec.primary.config_map_ref, spec.apply, primary=True)
        candidate = await read_text(kube, namespace, spec.candidate.config_map_ref, spec.apply, primary=False)
        prompt = PromptRewrite(apply=spec.apply, primary=primary, candidate=candidate,
                               digest=prompt_digest(spec.apply, primary, candidate))
    params = None
    if rewrite.parameters is not None:
        p = rewrite.parameters
        params = Parameters(temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens)
    return Rewrite(model=rewrite.model, prompt=prompt, parameters=params)


def candidate_identity(candidate_url: str | None, rewrite: Rewrite | None) -> str:
    """What names a tap target's candidate in the status: its URL and its rewrite (model, the prompts' digest,
    the parameters); a change of any is a new candidate."""
    if rewrite is None:
        return f"{candidate_url or ''}#"
    parts = [rewrite.model or ""]
    if rewrite.prompt is not None:
        parts.append(f"prompt:{rewrite.prompt.digest}")
    if rewrite.parameters is not None:
        p = rewrite.parameters
        parts.append(f"params:t={p.temperature},p={p.top_p},n={p.max_tokens}")
    return f"{candidate_url or ''}#" + ";".join(parts)
