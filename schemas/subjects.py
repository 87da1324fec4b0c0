"""Every name the mesh uses on NATS, in one place: subjects, headers, JetStream streams and
durable consumers, KV buckets and their keys, object stores, and the few names of NATS's own
protocol the mesh spells. A name used on the wire is never spelled anywhere else.

The prefix (default ``mesh``) is configurable so several meshes can share one NATS account:
subjects start with it, and stream and bucket names derive from it (``Subjects.stream``,
``Subjects.bucket``). Subject tokens come from tenant, task, model and provider names, so
those must be subject-safe (no dots, spaces or wildcards): ``token()`` checks that.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_PREFIX = "mesh"

HEADER_DEADLINE = "Mesh-Deadline"  # absolute, ms since the epoch
HEADER_TASK = "Mesh-Task"
HEADER_TENANT = "Mesh-Tenant"
HEADER_BUDGET = "Mesh-Budget"  # planner -> router: the task's own cap (Task.budget_usd), USD as a decimal string
HEADER_SCHEDULE_RUN = "Mesh-Schedule-Run"  # a scheduled run's task id: anti-loop counts each run on its own
HEADER_TRACEPARENT = "traceparent"
HEADER_MSG_ID = "Nats-Msg-Id"  # JetStream de-duplication key
HEADER_EXPECTED_STREAM = "Nats-Expected-Stream"  # JetStream refuses a publish that would land in another stream
# JetStream refuses a publish unless the stream's last sequence is this one (the ledger journal's fence).
HEADER_EXPECTED_LAST_SEQUENCE = "Nats-Expected-Last-Sequence"

# NATS's own names (fixed by the server, never prefixed).
HEADER_STATUS = "Status"  # nats-py's header for the status code of a message without payload
STATUS_HEARTBEAT = "100"  # idle heartbeat or flow control: a pull request goes on
STATUS_NO_RESPONDERS = "503"  # nobody (no subscriber, no stream) answered a request
JS_API = "$JS.API"  # JetStream's request subjects
JS_API_PULL = "$JS.API.CONSUMER.MSG.NEXT"  # a pull request: + .<stream>.<durable> (``pull_request``)
JS_API_DIRECT_GET = "$JS.API.DIRECT.GET"  # + .<stream>.<subject>: the last message on a subject (``direct_get``)
JS_ACK = "$JS.ACK"  # acknowledgement subjects: $JS.ACK.<stream>.<consumer>.<delivered>...
JS_EVENT = "$JS.EVENT"  # JetStream advisories
JS_FLOW_CONTROL = "$JS.FC"  # a push consumer's flow-control requests, answered by the client
KV_API = "$KV"  # KV bucket subjects: $KV.<bucket>.<key>
OBJECT_STORE_API = "$O"  # object store subjects
INBOX = "_INBOX"  # reply subjects of requests

_TOKEN = re.compile(r"^[A-Za-z0-9_\-]+$")
# A token's length bound: schemas/messages.py's MAX_ID, so a subject or KV key made of a few tokens stays
# far inside NATS's 4 KiB protocol line (a longer one makes the server close the connection).
MAX_TOKEN = 256


def token(value: str) -> str:
    """Return ``value`` if it can be one subject token, else raise ValueError."""
    if len(value) > MAX_TOKEN:
        raise ValueError(f"{value[:40]!r}... cannot be a subject token: it is longer than {MAX_TOKEN} characters")
    if not _TOKEN.match(value):
        raise ValueError(f"{value!r} cannot be a subject token: use letters, digits, '-' and '_'")
    return value


def token_or_any(value: str) -> str:
    """``token(value)``, or the single-token wildcard '*' itself."""
    return value if value == "*" else token(value)


def direct_get(stream: str, subject: str) -> str:
    """JetStream's direct get of the last message stored on ``subject`` (wildcards allowed): the subject
    is in the request's subject, so a permission can allow it for some subjects only."""
    return f"{JS_API_DIRECT_GET}.{stream}.{subject}"


def object_chunks(bucket: str, nuid: str) -> str:
    """Where an Object Store keeps the chunks of one object (nats's own layout; its stream is OBJ_<bucket>)."""
    return f"{OBJECT_STORE_API}.{bucket}.C.{nuid}"


def pull_request(stream: str, durable: str) -> str:
    """The subject a pull request for ``durable`` on ``stream`` (both full names) is published to."""
    return f"{JS_API_PULL}.{stream}.{durable}"


@dataclass(frozen=True)
class Subjects:
    prefix: str = DEFAULT_PREFIX

    # -- tasks (JetStream) --
    # A task is submitted on its tenant's subject: the tenant is the one the submitter's credential may
    # publish as (services/runtime/identities.py), and the planner takes it from the subject.
    def task_submit(self, tenant: str) -> str:
        return f"{self.prefix}.task.submit.{token(tenant)}"

    @property
    def task_submit_all(self) -> str:
        return f"{self.prefix}.task.submit.*"

    @staticmethod
    def tenant_of(subject: str) -> str:
        """The tenant token a per-tenant subject ends with (task submit, artifact put and get)."""
        return subject.rsplit(".", 1)[-1]

    # A task's events: <prefix>.task.event.<tenant>.<task>.<kind>. Progress events are core NATS (live
    # followers see them); only the terminal ones are stored (STREAM_TASK_EVENTS), each carrying the
    # task's whole history. The tenant token lets a subscription (and a permission) cover one tenant.
    def task_event(self, tenant: str, task_id: str, kind: str) -> str:
        return f"{self.prefix}.task.event.{token(tenant)}.{token(task_id)}.{token(kind)}"

    def task_events_of(self, tenant: str, task_id: str) -> str:
        """Every event of one task."""
        return f"{self.prefix}.task.event.{token(tenant)}.{token(task_id)}.>"

    def task_events_of_tenant(self, tenant: str) -> str:
        """Every event of every task of one tenant."""
        return f"{self.prefix}.task.event.{token(tenant)}.>"

    @property
    def task_events(self) -> str:
        return f"{self.prefix}.task.event.>"

    def task_endings(self, kinds: Iterable[str]) -> list[str]:
        """The subjects of every task's events of ``kinds`` (the terminal ones: what the stream keeps)."""
        return [f"{self.prefix}.task.event.*.*.{token(kind)}" for kind in sorted(kinds)]

    # -- planner -> router (request/reply) --
    @property
    def step_request(self) -> str:
        return f"{self.prefix}.step.request"

    # -- router -> inference (request/reply, queue groups) --
    def infer_local(self, model: str) -> str:
        return f"{self.prefix}.infer.local.{token(model)}"

    def infer_cloud(self, provider: str) -> str:
        return f"{self.prefix}.infer.cloud.{token(provider)}"

    @property
    def infer_local_all(self) -> str:
        return f"{self.prefix}.infer.local.>"

    @property
    def infer_cloud_all(self) -> str:
        return f"{self.prefix}.infer.cloud.>"

    # -- a call's streamed output (core NATS): StepRequest.stream_to is the caller's own inbox --
    @staticmethod
    def stream_cancel(stream_to: str) -> str:
        """Where the caller of a streamed call asks for it to stop (its client went away)."""
        return f"{stream_to}.cancel"

    # -- local engines' load, for spillover (core NATS, latest value wins) --
    def local_load(self, model: str) -> str:
        return f"{self.prefix}.local.load.{token(model)}"

    @property
    def local_load_all(self) -> str:
        return f"{self.prefix}.local.load.>"

    # -- metering (JetStream, dedupe on Nats-Msg-Id) --
    def usage(self, tenant: str) -> str:
        return f"{self.prefix}.usage.{token(tenant)}"

    @property
    def usage_all(self) -> str:
        return f"{self.prefix}.usage.>"

    # -- budgets (request/reply) --
    @property
    def budget_reserve(self) -> str:
        return f"{self.prefix}.budget.reserve"

    @property
    def budget_settle(self) -> str:
        return f"{self.prefix}.budget.settle"

    # -- budget queries (request/reply to the accountant) --
    @property
    def budget_show(self) -> str:
        return f"{self.prefix}.budget.show"

    # -- an operator's changes (request/reply to the accountant): <prefix>.operator.<name>.<action>, where
    # only that operator's credential may publish, so the accountant records who from the subject --
    def operator(self, name: str, action: str) -> str:
        """``action`` is OPERATOR_KILL or OPERATOR_BUDGET ('*': every action, in a permission)."""
        return f"{self.prefix}.operator.{token(name)}.{token_or_any(action)}"

    def operator_all(self, action: str) -> str:
        return f"{self.prefix}.operator.*.{token(action)}"

    @staticmethod
    def operator_of(subject: str) -> str:
        """The operator's name in an operator subject."""
        return subject.rsplit(".", 2)[-2]

    # -- the accountant's private journal of reservations (JetStream) --
    @property
    def ledger(self) -> str:
        return f"{self.prefix}.ledger"

    # -- control (JetStream + last value in KV) --
    @property
    def control_kill(self) -> str:
        return f"{self.prefix}.control.kill"

    @property
    def control_pace(self) -> str:
        return f"{self.prefix}.control.pace"

    @property
    def control_budget(self) -> str:
        """Every cap change an operator made (a BudgetUpdate with who and when), for ClickHouse."""
        return f"{self.prefix}.control.budget"

    # -- artifacts (request/reply, as a tenant: the store takes the tenant from the subject) --
    def artifact_put(self, tenant: str) -> str:
        """``tenant``: '*' for every tenant's (a subscription, a permission)."""
        return f"{self.prefix}.artifact.put.{token_or_any(tenant)}"

    def artifact_get(self, tenant: str) -> str:
        return f"{self.prefix}.artifact.get.{token_or_any(tenant)}"

    def artifact_created(self, artifact_type: str) -> str:
        return f"{self.prefix}.artifact.created.{token(artifact_type)}"

    @property
    def artifact_created_all(self) -> str:
        return f"{self.prefix}.artifact.created.>"

    # -- dead letters (JetStream) --
    def dlq(self, service: str) -> str:
        return f"{self.prefix}.dlq.{token(service)}"

    @property
    def dlq_all(self) -> str:
        return f"{self.prefix}.dlq.>"

    # -- agent services (request/reply, queue group per agent name) --
    def agent(self, name: str) -> str:
        return f"{self.prefix}.agent.{token(name)}"

    # -- spend alerts (JetStream, dedupe on Nats-Msg-Id = alert id), from the accountant --
    def alert(self, tenant: str) -> str:
        """Where the alerts about ``tenant``'s spend go (``ALERT_MESH_WIDE`` for spend of several tenants)."""
        return f"{self.prefix}.alert.{token(tenant)}"

    @property
    def alert_all(self) -> str:
        return f"{self.prefix}.alert.>"

    # -- verdicts on calls' answers (JetStream, dedupe on Nats-Msg-Id = feedback id), to ClickHouse --
    def feedback(self, tenant: str) -> str:
        return f"{self.prefix}.feedback.{token(tenant)}"

    @property
    def feedback_all(self) -> str:
        return f"{self.prefix}.feedback.>"

    # -- benchmarks' raw request/reply echo (loadtest/bench) --
    @property
    def bench_echo(self) -> str:
        return f"{self.prefix}.bench.echo"

    # -- JetStream streams, KV buckets and object stores (names derive from the prefix) --
    def stream(self, name: str) -> str:
        return f"{self.prefix.upper()}_{name}"

    def bucket(self, name: str) -> str:
        return f"{self.prefix}_{name}"


STREAM_TASKS = "TASKS"  # task_submit, work queue
STREAM_TASK_EVENTS = "TASK_EVENTS"  # task_endings: terminal task events (with their history), limits
STREAM_USAGE = "USAGE"  # usage_all, dedupe window
STREAM_CONTROL = "CONTROL"  # control kill + pace
STREAM_ARTIFACT_EVENTS = "ARTIFACT_EVENTS"  # artifact_created_all
STREAM_DLQ = "DLQ"  # dlq_all
STREAM_LEDGER = "LEDGER"  # ledger: the accountant's reservation journal (declared by the accountant)
STREAM_ALERTS = "ALERTS"  # alert_all: spend alerts (deploy/alerts.toml), dedupe window
STREAM_FEEDBACK = "FEEDBACK"  # feedback_all: verdicts on answers, dedupe window

BUCKET_RESPONSE_CACHE = "response_cache"  # router: exact-match cache
BUCKET_ARTIFACT_INDEX = "artifact_index"  # artifact-store: id -> metadata
BUCKET_ARTIFACT_BODIES = "artifacts"  # artifact-store: Object Store of bodies
BUCKET_CONTROL = "control"  # kill switch and pace, last value per key
BUCKET_BUDGETS = "budgets"  # accountant: caps changed at run time, per scope
BUCKET_LEDGER = "ledger"  # accountant: Object Store holding the ledger snapshot
BUCKET_ACCOUNTANT_LEASE = "accountant_lease"  # accountant: the leader's lease (key LEASE_KEY, compare-and-set)
LEASE_KEY = "leader"
BUCKET_SCHEDULES = "schedules"  # planner: cron schedules, one key per schedule id
BUCKET_ATTEMPTS = "attempts"  # planner: anti-loop attempts per task fingerprint per UTC day (TTL)
BUCKET_KEYS = "keys"  # gateway: VirtualKeys by the sha256 of their secret (`frugalmesh keys`)
BUCKET_TASK_CALLS = "task_calls"  # gateway and router: layer-2 call counts per task (TTL, compare-and-set)
BUCKET_ALERTS_FIRED = "alerts_fired"  # accountant: one key per alert sent, claimed with create (TTL)

# The tenant token of alerts about spend of several tenants (a model, agent or global scope): mesh.alert._mesh.
ALERT_MESH_WIDE = "_mesh"

# The actions of an operator's subject (Subjects.operator).
OPERATOR_KILL = "kill"  # a KillSwitch: trip or clear
OPERATOR_BUDGET = "budget"  # a BudgetUpdate: change caps

# Keys of BUCKET_CONTROL: kill.global, kill.<scope>.<key> (the latest KillSwitch) and pace.<tenant> (PaceSignal).
CONTROL_KILL_KEYS = "kill."
CONTROL_PACE_KEYS = "pace."


def control_kill_key(scope: str, key: str) -> str:
    """The control bucket's key for the kill switch of ``scope`` (global, tenant, task, model) and ``key``."""
    return f"{CONTROL_KILL_KEYS}global" if scope == "global" else f"{CONTROL_KILL_KEYS}{scope}.{key}"


def control_pace_key(tenant: str) -> str:
    """The control bucket's key for ``tenant``'s latest PaceSignal."""
    return f"{CONTROL_PACE_KEYS}{tenant}"


# NATS's service framework (ADR-32, nats.micro): every agent instance is a micro service named after its
# agent, answering $SRV.PING|INFO|STATS[.<name>[.<id>]]; the `nats` CLI's `micro ls` lists agents too.
SRV_API = "$SRV"
SRV_PING = "PING"
SRV_INFO = "INFO"
SRV_STATS = "STATS"


def service_subject(verb: str, name: str = "", instance: str = "") -> str:
    """``$SRV.<verb>``, narrowed to one service name and one instance when given."""
    return ".".join(part for part in (SRV_API, verb, name, instance) if part)


# An agent's micro-service metadata (strings, as ADR-32 has them): what the registry and the pre-flight read.
AGENT_META_PREFIX = "frugalmesh_prefix"  # the mesh it serves: agents of other meshes on the account are not its
AGENT_META_CONSUMES = "consumes"  # artifact types it reads, comma-separated
AGENT_META_PRODUCES = "produces"  # artifact types it writes, comma-separated
AGENT_META_COST_USD = "cost_usd"  # declared: typical cost of one request, USD
AGENT_META_LATENCY_S = "latency_s"  # declared: typical time of one request, seconds
AGENT_META_SUCCESS = "success_rate"  # declared: share of requests answered with an artifact, 0 to 1

# Durable consumers, each shared by its service's replicas (names are not prefixed: they live in a prefixed stream).
DURABLE_PLANNER = "planner"  # STREAM_TASKS
DURABLE_USAGE_INGEST = "accountant"  # STREAM_USAGE -> ClickHouse usage_events
DURABLE_TASK_INGEST = "accountant-tasks"  # STREAM_TASK_EVENTS -> task_events
DURABLE_ARTIFACT_INGEST = "accountant-artifacts"  # STREAM_ARTIFACT_EVENTS -> artifacts
DURABLE_KILL_INGEST = "accountant-kills"  # STREAM_CONTROL (kill subject) -> kill_events
DURABLE_BUDGET_INGEST = "accountant-budgets"  # STREAM_CONTROL (budget subject) -> budget_changes
DURABLE_FEEDBACK_INGEST = "accountant-feedback"  # STREAM_FEEDBACK -> feedback
