"""Grants signed as the accountant signs them, for tests that stand in for the accountant
(``BudgetPeer``) or send paid InferenceRequests straight to an inference service.

They sign with the key the in-process services load (services/runtime/grants.py ``load_signer``:
``FRUGALMESH_GRANT_SEED``, else ``FRUGALMESH_GRANT_SEED_FILE``, else ``<home>/grant.seed``), so a
grant made here verifies in an inference service started by the same test, as the real
accountant's would. Never a way around the check: a request without a grant is still refused.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
from helpers import shipped_catalog

from schemas.messages import InferenceRequest, Reservation
from services.runtime.catalog import Catalog
from services.runtime.grants import GrantSigner, load_signer, reservation_for
from services.runtime.settings import MeshSettings


def local_signer(home: Path | None = None) -> GrantSigner:
    """The signer the services of this process would use (``home``: MeshSettings' by default)."""
    return load_signer(home or MeshSettings().home)


def reservation_of(
    request: InferenceRequest, catalog: Catalog | None = None, amount_usd: float | None = None
) -> Reservation:
    """The reservation the router would make for ``request``: its worst case at ``catalog``'s prices."""
    reservation = reservation_for(request, (catalog or shipped_catalog()).model(request.model))
    return reservation if amount_usd is None else msgspec.structs.replace(reservation, amount_usd=amount_usd)


def granted(
    request: InferenceRequest,
    *,
    catalog: Catalog | None = None,
    signer: GrantSigner | None = None,
    **reservation_fields,
) -> InferenceRequest:
    """``request`` with the grant the accountant would sign for it (``reservation_fields`` change what
    is signed, e.g. ``model=`` or ``expires_ms=``, to make a grant for something else)."""
    reservation = msgspec.structs.replace(reservation_of(request, catalog), **reservation_fields)
    grant = (signer or local_signer()).grant(reservation)
    return msgspec.structs.replace(request, reservation_id=reservation.id, grant=grant)
