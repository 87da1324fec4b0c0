"""The FastStream app both inference services run (``local-inference``, ``cloud-inference``): one
backend per provider of the service's models, the metered handler (services/inference/service.py)
on the service's subjects in its queue group, the control state read before the first call, and the
accountant's public grant key (services/runtime/grants.py ``load_verifier``: ``FRUGALMESH_GRANT_PUBLIC_KEY``,
else the public key of the seed the accountant uses on this machine), read once at build time: a
service that cannot read it does not start.

Each call is its own asyncio task, ``capacity`` in flight at most, and a full replica leaves its
queue group until it has room (services/runtime/serve.py): a call waiting seconds on a model costs a
coroutine, not one of a few worker slots."""

from __future__ import annotations

from collections.abc import Callable

from faststream import FastStream

from services.inference.backend import Backend
from services.inference.backend_factories import BACKENDS
from services.inference.service import InferenceService, ServiceKind
from services.runtime.bus import Bus
from services.runtime.catalog import Catalog
from services.runtime.grants import GrantVerifier, load_verifier
from services.runtime.serve import DEFAULT_CAPACITY, RequestServer
from services.runtime.settings import MeshSettings


def create_inference_app(
    settings: MeshSettings,
    kind: ServiceKind,
    capacity: int = DEFAULT_CAPACITY,
    setup: Callable[[FastStream, InferenceService], None] | None = None,
    verifier: GrantVerifier | None = None,
) -> FastStream:
    """The FastStream app of ``<kind>-inference``: one backend per provider of this service's models,
    chosen by the provider's ``backend`` in models.toml (services/inference/backend_factories.py).
    ``setup`` lets a service add its own hooks (local-inference publishes its engines' load) once
    the app is built. ``verifier``: the accountant's public grant key (default ``load_verifier``)."""
    service = f"{kind}-inference"
    bus = Bus(settings, service)
    catalog = Catalog.load(settings.deploy_dir)
    catalog.load_tokenizers(kind)  # only the models this service serves are counted here
    backends: dict[str, Backend] = {}
    for provider_name in sorted({m.provider for m in catalog.models.values() if m.service == kind}):
        provider = catalog.providers[provider_name]
        if provider.backend not in BACKENDS:
            raise ValueError(
                f"providers.{provider_name}: {service} has no backend {provider.backend!r}; "
                f"it has: {', '.join(sorted(BACKENDS))}"
            )
        backends[provider_name] = BACKENDS[provider.backend](provider, settings)
    verifier = verifier or load_verifier(settings.home)
    handler = InferenceService(bus, kind, catalog, backends, verifier)
    subject = settings.subjects.infer_local_all if kind == "local" else settings.subjects.infer_cloud_all

    calls = RequestServer(bus, subject, service, handler.handle, capacity=capacity)
    app = bus.app()
    # After bus.app()'s hook, which connects the broker: the control state is read before any call is taken.
    app.on_startup(handler.open_control)

    @app.on_startup
    async def show_grant_key() -> None:
        # Not a secret: it must be the accountant's (its log line grant_key), or every paid call is refused.
        bus.log.info("grant_key", public_key=verifier.public_key)

    app.on_startup(calls.start)
    app.on_shutdown(calls.stop)

    @app.after_shutdown
    async def close_backends() -> None:
        await handler.close_control()
        for backend in backends.values():
            await backend.aclose()

    if setup is not None:
        setup(app, handler)
    return app
