"""The router service: each StepRequest becomes a model call, or a cache hit, on the model its
routing policy picks; the reply is always an InferenceResult (an error one when the step cannot
run), or ``Bus.rejection`` for a message that is not a step. This module is the wiring:

- queue group ``router`` on ``mesh.step.request``, each step its own asyncio task, ``capacity`` in
  flight at most, a full replica leaving the group (services/runtime/serve.py): the step, routed
  (services/router/steps.py: the policy, the step's own when it names one, and spillover), each
  call from the cache or sent
  (calls.py) after the cost defences that act at the caller (cost_defence.py: kill switch,
  pacing's throttle, reservation, then settle); an agent's step is counted by layer 2 before any
  of that (agent_calls.py, limits from deploy/planner.toml); a call the router ends itself is
  metered there too (metering.py); a step naming a policy the router cannot build is refused
  (``Rejection``);
- ``mesh.local.load.>`` (no queue group: every replica needs every report): the local models' load,
  which steers spillover (load.py);
- start-up opens the response cache and the task call counts and reads the control state before any
  step is taken;
- a new version of the router file is picked up without a restart (reload.py), and shadow calls in
  flight finish before the bus closes (shadow.py).
"""

from __future__ import annotations

from faststream import FastStream
from nats.aio.msg import Msg

from schemas.messages import LocalLoad, StepRequest
from schemas.subjects import HEADER_BUDGET, HEADER_TRACEPARENT, token
from services.inference.streaming import check_stream_to
from services.router.load import DEFAULT_STALE_S, LoadBoard
from services.router.reload import DEFAULT_INTERVAL_S, RouterFileWatch
from services.router.steps import StepRouter
from services.router.throttle import DEFAULT_BURST, DEFAULT_RATE_PER_S, Throttle
from services.routing.policies import PolicySet
from services.routing.table import RoutingTable
from services.runtime.bus import Bus, Message, encode
from services.runtime.catalog import Catalog
from services.runtime.reservations import parse_budget
from services.runtime.serve import DEFAULT_CAPACITY, RequestServer
from services.runtime.settings import MeshSettings
from services.runtime.task_limits import TaskLimits

SERVICE = "router"
QUEUE = "router"
# A cached answer is as good as the call that made it, but models and prompts drift: a day
# bounds how stale a served answer can be while still catching a day's repeats.
DEFAULT_CACHE_TTL_S = 24 * 3600.0


def create_app(
    settings: MeshSettings,
    *,
    table: RoutingTable | None = None,
    catalog: Catalog | None = None,
    policies: PolicySet | None = None,
    cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
    throttle_rate_per_s: float = DEFAULT_RATE_PER_S,
    throttle_burst: int = DEFAULT_BURST,
    capacity: int = DEFAULT_CAPACITY,
    load_stale_s: float = DEFAULT_STALE_S,
    task_limits: TaskLimits | None = None,
    reload_interval_s: float = DEFAULT_INTERVAL_S,
) -> FastStream:
    """The router; ``table`` and ``catalog`` default to deploy/routing.toml and deploy/models.toml,
    ``policies`` to routing.toml's [policies] (the rules alone when it has none).
    ``throttle_*``: the paid calls per second (and burst) of a tenant whose pace says "throttle".
    ``load_stale_s``: how old a local model's load report may be and still steer spillover.
    ``capacity``: steps in flight in this replica at once (a step waiting on a model is a coroutine).
    ``task_limits``: layer 2 for the agents' calls (default: deploy/planner.toml).
    ``reload_interval_s``: how often the router file is checked for a new version (reload.py; 0: never)."""
    bus = Bus(settings, SERVICE)
    table = table or RoutingTable.load(settings.deploy_dir)
    catalog = catalog or Catalog.load(settings.deploy_dir)
    catalog.load_tokenizers()
    router = StepRouter(
        bus,
        policies or PolicySet.load(settings.deploy_dir, table, catalog),
        catalog,
        cache_ttl_s,
        Throttle(throttle_rate_per_s, throttle_burst),
        task_limits or TaskLimits.load(settings.deploy_dir),
        LoadBoard(load_stale_s),
    )
    app = bus.app()
    # Registered after bus.app()'s own hook, which connects the broker; subscribers start after both.
    app.on_startup(router.start)
    app.after_shutdown(router.stop)
    watch = RouterFileWatch(router, settings.deploy_dir, table, catalog, reload_interval_s)
    app.on_startup(watch.start)
    app.on_shutdown(watch.stop)

    async def on_step(msg: Msg) -> bytes:
        step = await bus.decode(msg, StepRequest)
        headers = msg.headers or {}
        if step is None:
            return bus.rejection(f"not a valid StepRequest; kept on {settings.subjects.dlq(SERVICE)}")
        try:
            # The tenant names the usage subject; a bad one must fail here, not after a paid call.
            token(step.tenant)
            if step.agent:
                # Layer 2 counts an agent's calls per task in KV, under a key made of the task id.
                token(step.task_id)
            if step.stream_to:
                check_stream_to(step.stream_to, settings.subjects)
            # A task cap that cannot be read cannot be enforced: refuse the step rather than run it uncapped.
            task_budget_usd = parse_budget(headers.get(HEADER_BUDGET))
            # A policy the step names (a virtual key's) that this router cannot build: refused, never guessed.
            policy = router.policies.for_step(step)
        except ValueError as exc:
            await bus.dead_letter(msg.subject, msg.data, headers, str(exc))
            return bus.rejection(str(exc))
        return encode(await router.route(step, headers.get(HEADER_TRACEPARENT), task_budget_usd, policy))

    steps = RequestServer(bus, settings.subjects.step_request, QUEUE, on_step, capacity=capacity)
    # After the router's own start (hooks run in order): the cache and control state are open first.
    app.on_startup(steps.start)
    app.on_shutdown(steps.stop)
    app.on_shutdown(router.drain_shadows)

    # Every replica needs every report: no queue group.
    @bus.broker.subscriber(settings.subjects.local_load_all)
    async def on_local_load(msg: Message) -> None:
        load = await bus.decode(msg, LocalLoad)
        if load is not None:
            router.on_load(load)

    return app
