"""Configuration shared by every service, from the environment (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.subjects import DEFAULT_PREFIX, Subjects
from services.runtime.identities import broker_options, connect_options, operator_name, tls_context

REPO_DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"


class MeshSettings(BaseSettings):
    """Everything a service needs to find the bus, the database and its configuration.

    Each field reads ``FRUGALMESH_<NAME>``; the connection URLs also read the conventional
    ``NATS_URL``, ``CLICKHOUSE_URL`` and ``CLICKHOUSE_ANALYST_URL``.
    """

    model_config = SettingsConfigDict(env_prefix="FRUGALMESH_", extra="ignore")

    nats_url: str = Field(
        "nats://127.0.0.1:4222", validation_alias=AliasChoices("NATS_URL", "FRUGALMESH_NATS_URL")
    )
    # This process's NATS identity: the file holding its nkey seed, named <kind>.<name>.nk
    # (services/runtime/identities.py; `frugalmesh creds create`). None: connect without one (a server
    # without authorization). `frugalmesh up` gives each process its own.
    nats_creds: Path | None = Field(None, validation_alias=AliasChoices("NATS_CREDS", "FRUGALMESH_NATS_CREDS"))
    # TLS to NATS: the CA that signed the servers' certificates; this client's certificate and key when
    # the servers ask for one (mutual TLS). Unset: plain TCP (loopback, or a network you trust).
    nats_tls_ca: Path | None = None
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None
    # The writer: the accountant's user (INSERT, CREATE, ALTER; `frugalmesh sql --write`). No
    # password here: `frugalmesh up` makes random ones (services/embedded/servers.py) and passes this URL.
    clickhouse_url: str = Field(
        "http://writer@127.0.0.1:8123/frugalmesh",
        validation_alias=AliasChoices("CLICKHOUSE_URL", "FRUGALMESH_CLICKHOUSE_URL"),
    )
    # The read-only analyst (SELECT only), which `frugalmesh sql` uses; "": the one of a running `up`
    # stack, else the writer's URL in a readonly=1 session.
    clickhouse_analyst_url: str = Field(
        "", validation_alias=AliasChoices("CLICKHOUSE_ANALYST_URL", "FRUGALMESH_CLICKHOUSE_ANALYST_URL")
    )
    # Copies JetStream keeps of every stream, KV bucket and object store: 1, or 3 (5) on a cluster of at
    # least that many servers. Applied when a service declares them, to existing ones as well.
    replicas: int = Field(1, ge=1, le=5)
    subject_prefix: str = DEFAULT_PREFIX
    # Where the recorded data sets live (routing outcomes, traces); see services.runtime.data.
    data: Path | None = None
    # Price table, routing table, workflows.
    deploy_dir: Path = REPO_DEPLOY_DIR
    # State of the embedded stack (nats-server and ClickHouse data) for `frugalmesh up`.
    home: Path = Path.home() / ".frugalmesh"
    log_level: str = "WARNING"
    # How long a call may wait for a reply on the bus when nothing tighter is known.
    request_timeout_s: float = 30.0
    # Pinning, strict mode: a call the provider reports as served by another model than the one
    # requested fails (it is still metered, as reported). Off by default: providers commonly
    # report a dated snapshot name (gpt-4o -> gpt-4o-2024-08-06) for the model asked for.
    strict_pinning: bool = False
    # The OpenAI-compatible local engine (base URL, ending /v1) that serves the providers marked
    # ``local_engine = true`` in models.toml; `frugalmesh up` sets it to the engine it starts.
    local_engine_url: str = ""
    # The gateway's HTTP listener (`frugalmesh run gateway`; `frugalmesh up` passes --gateway-port).
    # Loopback by default: set 0.0.0.0 to serve other machines. Port 0 picks a free port.
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 4080
    # A JSONL file each gateway replica appends one line per chat request to (arrival, request,
    # usage, cost, latency; never a key): services/gateway/recording.py. "": no recording.
    gateway_record: str = ""

    @property
    def nats_servers(self) -> list[str]:
        """The seed servers ``nats_url`` names, comma-separated (a cluster's: any one that answers
        serves, and the client learns the others from it)."""
        return [url.strip() for url in self.nats_url.split(",") if url.strip()]

    def nats_options(self) -> dict[str, Any]:
        """nats-py ``connect`` keywords for this process's identity and TLS (every connection's)."""
        tls = tls_context(self.nats_tls_ca, self.nats_tls_cert, self.nats_tls_key)
        return connect_options(self.nats_creds, tls)

    def broker_options(self) -> dict[str, Any]:
        """The same, as FastStream's NatsBroker takes them."""
        return broker_options(self.nats_creds, tls_context(self.nats_tls_ca, self.nats_tls_cert, self.nats_tls_key))

    @property
    def operator(self) -> str:
        """Who this process is as an operator: the name in its credential, else the login name."""
        return operator_name(self.nats_creds)

    @property
    def subjects(self) -> Subjects:
        # Not cached: a copy with another prefix (model_copy) must not keep the original's subjects.
        return Subjects(self.subject_prefix)
