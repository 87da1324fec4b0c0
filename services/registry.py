"""The seven services by name, for `frugalmesh run <service>`, `frugalmesh up` and the tests."""

from __future__ import annotations

from importlib import import_module

from faststream import FastStream

from services.runtime.settings import MeshSettings

SERVICES = {
    "planner": "services.planner.app",
    "router": "services.router.app",
    "local-inference": "services.local_inference.app",
    "cloud-inference": "services.cloud_inference.app",
    "artifact-store": "services.artifact_store.app",
    "accountant": "services.accountant.app",
    "gateway": "services.gateway.app",
}


def create_app(name: str, settings: MeshSettings, **options) -> FastStream:
    """Build the FastStream app of service ``name`` (each module exposes ``create_app``)."""
    try:
        module = SERVICES[name]
    except KeyError:
        raise KeyError(f"unknown service {name!r}; services: {', '.join(SERVICES)}") from None
    return import_module(module).create_app(settings, **options)
