"""The root of shadowctl's own exception tree.

Every adapter defines its errors under :class:`ShadowctlError` and chains the
third-party exception that caused it (``raise X(...) from exc``), so that the
kubernetes, httpx, prometheus-api-client and MQTT libraries' exceptions never
leak out of the adapters, and a command line can print any of them as one
line. The whole tree (``tests/test_errors.py`` fails when a class is missing
here, or is not under ``ShadowctlError``)::

    ShadowctlError
    ├── PolicyError                  shadowctl.policy: bad policy input, every problem as FILE:LINE:COL
    ├── YamlTooLarge                 shadowctl.policy: YAML past its size, depth or node bounds (line, column)
    ├── JudgeError                   shadowctl.judge
    │   └── JudgeInputError          (also a ValueError) a spec or data object is malformed
    ├── MalformedEvent               shadowctl.compare (also a ValueError): not a valid output event
    ├── MalformedRouteMessage        shadowctl.compare (also a ValueError): not a valid route setting or report
    ├── ComparatorUnavailable        shadowctl.compare: a comparator cannot run here (semantic without its extra)
    ├── TemplateError                shadowctl.compare.llmjudge (also a ValueError): a judge prompt lacks a placeholder
    ├── KubeError                    shadowctl.kube: an API call failed (``status``: the HTTP status)
    │   ├── ConfigError              no usable kubeconfig or in-cluster configuration
    │   ├── BadRequest               400
    │   ├── Unauthorized             401
    │   ├── Forbidden                403
    │   ├── NotFound                 404
    │   ├── Conflict                 409: a stale resourceVersion
    │   │   └── AlreadyExists        409 on create
    │   ├── Gone                     410 outside a watch
    │   │   └── WatchExpired         410 on a watch: re-list
    │   ├── UnsupportedMediaType     415
    │   ├── Invalid                  422 (``causes``: the fields)
    │   └── Unavailable              unreachable, timeouts, 429, 5xx after retries
    ├── RouterError                  shadowctl.routers
    │   ├── RouteNotFound            the object or its route does not exist
    │   ├── DestinationNotFound      a destination or revision the policy names is not there
    │   ├── UnmanagedTraffic         traffic to something that is neither primary nor candidate
    │   ├── WouldBeRejected          the object would fail the API server's or the mesh's validation
    │   ├── Unsupported              e.g. mirroring on Knative alone
    │   ├── ConflictRetriesExhausted every write met a newer resourceVersion
    │   ├── VerifyFailed             the read-back shows other routes than were written
    │   ├── RevisionsChanged         KServe: a new revision became the latest ready one mid-rollout
    │   ├── ClusterError             the Kubernetes API failed (the KubeError is chained)
    │   ├── Superseded               a fence refused a route write: the policy or the Lease changed; decide again
    │   ├── NotConfirmed             routers.tap: the taps did not all report the route setting applied; hold
    │   ├── PromptUnavailable        routers.tap_prompts: a prompt version's ConfigMap key cannot be read or used
    │   └── ChannelUnavailable       routers.tap: the tap-router channel's MQTT broker cannot be used
    ├── SourceError                  shadowctl.sources
    │   ├── SourceConfigError        a metric cannot be turned into a query
    │   ├── QueryFailed              a raw Prometheus query failed
    │   ├── SecretUnavailable        a Secret a policy names cannot be read or lacks what it should hold
    │   ├── JudgeCallFailed          llm-judge: the judge model did not give a verdict (timeout, error, no [[X]])
    │   └── OutputSourceError        the MQTT output source cannot deliver events
    │       ├── BrokerUnavailable    the broker cannot be reached, or the connection was lost
    │       ├── BrokerRejected       the broker refused the credentials or the subscription
    │       └── EmbedderUnavailable  the semantic comparator's local model cannot be loaded
    ├── TapError                     shadowctl.tap: the tap cannot start
    ├── UpstreamUnavailable          shadowctl.tap: no connection to the upstream model server
    ├── PublisherError               shadowctl.tap.publisher: events cannot be published now (it retries)
    │   └── PublisherRefused         the broker refused the credentials or the client certificate
    ├── TracingConfigError           shadowctl.otel (also a ValueError): an --otlp-endpoint that is not a URL
    ├── WebhookRefused               shadowctl.webhooks: a call not made (address not allowed, signing key unreadable)
    ├── SimError                     shadowctl.sim: a simulator cannot do what it was asked
    │   ├── KnobError                (also a ValueError) a bad model-server knob
    │   └── ControlPlaneError        the local control plane cannot start or answer
    ├── ReportError                  shadowctl.demo: recorded data unreadable, or the report unwritable
    ├── CliError                     shadowctl.cli: a failure the command explains in one line
    ├── PluginUsage                  shadowctl.cli: a `kubectl shadow` command line the plugin cannot run
    └── ReplayInputError             shadowctl.cli: a malformed line of a `judge replay` file

Deliberately not under ``ShadowctlError``: private control flow, raised and
caught inside one module, where an ``except ShadowctlError`` elsewhere must never
catch one by mistake (one that escapes is a bug, and should look like one)::

    _DuplicateKey                    shadowctl.policy.loader: becomes a PolicyError problem
    _NoDataError                     shadowctl.judge.core: becomes a metric's ``nodata`` result
    _BadRequest                      shadowctl.sim.modelserver: becomes an HTTP 400 answer
    _Missing                         shadowctl.sources.prometheus: becomes a NoData window
"""


class ShadowctlError(Exception):
    """Base class of every error shadowctl raises on purpose."""
