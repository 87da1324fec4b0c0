"""Grants: the accountant's signature on a reservation, which an inference service checks before it
runs a paid call, with no round trip to anyone.

On a granted reserve the accountant signs the call's claims with its Ed25519 key (an nkey seed, the
NATS ecosystem's key format) and returns the grant in ``ReservationDecision.grant``; the router
copies it into ``InferenceRequest.grant``; the inference service verifies it with the accountant's
public key (``GrantVerifier.check``). A paid call (``services/runtime/reservations.py`` ``is_paid``)
without a grant that verifies is refused before it starts and metered once, at $0.

The grant, compact and readable from any language (like a JWS compact serialisation)::

    base64url(claims) "." base64url(Ed25519 signature of the claims' bytes)     (no padding)

    claims = [2, call_id, tenant, task_id, model, key_id, amount_pico, expires_ms, prompt_digest]
                                                                             (a JSON array)

``amount_pico`` is the reservation's worst case in picodollars (rounded up, as the ledger books it),
``expires_ms`` the reservation's expiry (the step's deadline, when its hold lapses),
``prompt_digest`` the router's ``prompt_digest`` of the call's messages, tools and ``max_tokens``. A
grant holds for the one call it names: its call id (= reservation id), tenant, task, model, virtual
key and prompt digest must be the request's, the request's deadline must not pass the expiry, and
it must not have expired.

Why a digest and not the amount: the worst case is a function of the model, the prompt and
``max_tokens``, so binding all three binds the amount the router reserved, and checking a digest
costs microseconds where counting a 2,000-token prompt again costs a millisecond or two of the
inference service's one core, per call (docs/benchmarks.md, "Calls in flight and the lean task path").

What it protects against:
- a bus client sending a paid ``InferenceRequest`` straight to ``mesh.infer.*``, around the router
  and the accountant: without the accountant's key it cannot make a grant;
- a granted request changed on its way: another model, another prompt or ``max_tokens`` (so never a
  worst case above the hold), another call id, tenant, task or key, a later deadline;
- a grant used after its hold lapsed (expiry), or twice on one replica (``GrantVerifier`` keeps the
  call ids it let through until they expire);
- a substituted key: the public key is never read from the bus (a KV value any client could
  write), only from the process's own environment or a file on its machine (``load_verifier``).

What it does not protect against:
- a stolen seed (the accountant's environment or its seed file, mode 0600): the thief can mint
  grants. Rotate by replacing the seed and restarting the accountant and every inference service
  (grants signed with the old key are then refused);
- a granted request replayed, before it expires, to another replica of the inference queue group
  (each replica remembers only its own calls; closing that needs a shared store, a round trip).
  The replay spends at most one more worst case per replica within the step's deadline, and its
  usage row dedupes on the call id, so NATS permissions (who may publish and read ``mesh.infer.*``)
  are the defence there;
- clock skew: expiry is checked on the inference service's clock;
- free calls (price 0) carry no grant and need none.

Keys (the one place they are read; MeshSettings does not carry them yet):
- the accountant signs with ``FRUGALMESH_GRANT_SEED`` (the seed itself, ``SA...``), else the seed in
  the file ``FRUGALMESH_GRANT_SEED_FILE``, else ``<home>/grant.seed``; a missing file is created,
  mode 0600, with a fresh key;
- an inference service verifies with ``FRUGALMESH_GRANT_PUBLIC_KEY`` (``A...``), else the public key
  of the seed the accountant would use (so on one machine with no setting, both use
  ``<home>/grant.seed``, whichever starts first creating it);
- a launcher of several services (``frugalmesh up``) gives every service the public key and only the
  accountant the seed's location (``key_environments``). Services on other machines need
  ``FRUGALMESH_GRANT_PUBLIC_KEY`` set to the accountant's (both log it at start, ``grant_key``): one
  that makes its own seed instead refuses every paid call (it fails closed).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import math
import os
import secrets
from collections.abc import Sequence
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import cast

import msgspec
import nacl.exceptions
import nacl.signing
import nkeys

from schemas.messages import ChatMessage, InferenceRequest, Reservation, Tool
from services.runtime.catalog import ModelSpec
from services.runtime.usage import worst_case_usage

SEED_ENV = "FRUGALMESH_GRANT_SEED"
SEED_FILE_ENV = "FRUGALMESH_GRANT_SEED_FILE"
PUBLIC_KEY_ENV = "FRUGALMESH_GRANT_PUBLIC_KEY"
SEED_FILE = "grant.seed"

VERSION = 2
PICO = 10**12
# The nkey role of the grant key: an account key (seed "SA...", public key "A...").
PREFIX = nkeys.PREFIX_BYTE_ACCOUNT
NO_GRANT = "no valid grant"


def pico(usd: float) -> int:
    """USD as picodollars, rounded up (a reservation or a cost is never booked below its value)."""
    if not math.isfinite(usd) or usd < 0:
        raise ValueError(f"amount {usd!r} is not a non-negative finite number")
    return int((Decimal(repr(usd)) * PICO).to_integral_value(ROUND_CEILING))


class GrantKeyError(RuntimeError):
    """The grant key is missing, unreadable or malformed: the service cannot start."""


class GrantError(ValueError):
    """A grant that does not allow the call; the message says why."""


class GrantReused(GrantError):
    """A grant presented again for a call this verifier already let through."""


class GrantClaims(msgspec.Struct, array_like=True, frozen=True):
    """What a grant says (a JSON array on the wire, in this field order)."""

    v: int
    call_id: str
    tenant: str
    task_id: str
    model: str
    key_id: str
    amount_pico: int
    expires_ms: int
    prompt_digest: str

    @classmethod
    def of(cls, r: Reservation) -> GrantClaims:
        return cls(
            VERSION, r.id, r.tenant, r.task_id, r.model, r.key_id, pico(r.amount_usd), r.expires_ms, r.prompt_digest
        )


_encode_prompt = msgspec.json.Encoder().encode


def prompt_digest(messages: Sequence[ChatMessage], tools: Sequence[Tool] | None, max_tokens: int) -> str:
    """What a grant binds of a call besides its names: BLAKE2b-128 of its messages, tools and
    ``max_tokens`` as msgspec encodes them (the router and the inference service both run this code
    on the same wire types, so equal calls give equal digests), base64url without padding."""
    digest = hashlib.blake2b(_encode_prompt((messages, tools or (), max_tokens)), digest_size=16).digest()
    return _b64(digest)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_encode_claims = msgspec.json.Encoder().encode
_decode_claims = msgspec.json.Decoder(GrantClaims).decode


class GrantSigner:
    """The accountant's side: signs the claims of a granted reservation."""

    def __init__(self, seed: bytes) -> None:
        try:
            prefix, raw = nkeys.decode_seed(seed)
        except (nkeys.NkeysError, ValueError, TypeError, IndexError) as exc:
            raise GrantKeyError(f"not an nkey seed: {type(exc).__name__}") from None
        if prefix != PREFIX:
            raise GrantKeyError("the grant key must be an account nkey seed (it begins 'SA')")
        self._key = nacl.signing.SigningKey(bytes(raw))
        self.public_key = public_key_of(bytes(self._key.verify_key))

    def sign(self, claims: GrantClaims) -> str:
        payload = _encode_claims(claims)
        return f"{_b64(payload)}.{_b64(self._key.sign(payload).signature)}"

    def grant(self, reservation: Reservation) -> str:
        """The grant of a reservation the accountant holds."""
        return self.sign(GrantClaims.of(reservation))


class GrantVerifier:
    """The inference service's side: checks a call's grant with the accountant's public key alone."""

    def __init__(self, public_key: str) -> None:
        self.public_key = public_key
        self._key = nacl.signing.VerifyKey(raw_public_key(public_key))
        # Call ids this verifier let through, until their grants expire: one grant, one call.
        self._used: set[str] = set()
        self._expiries: list[tuple[int, str]] = []

    def claims(self, grant: str) -> GrantClaims:
        """The claims of a grant whose signature verifies; GrantError otherwise."""
        if not grant:
            raise GrantError("the call carries no grant")
        payload_text, dot, signature_text = grant.partition(".")
        try:
            if not dot:
                raise ValueError("no '.'")
            payload, signature = _unb64(payload_text), _unb64(signature_text)
        except (ValueError, binascii.Error):
            raise GrantError("the grant is malformed") from None
        try:
            self._key.verify(payload, signature)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            raise GrantError("the grant's signature does not verify with the accountant's key") from None
        try:
            claims = _decode_claims(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise GrantError(f"the grant's claims are unreadable: {exc}") from None
        if claims.v != VERSION:
            raise GrantError(f"grant version {claims.v} is not {VERSION}")
        return claims

    def check(self, request: InferenceRequest, model: ModelSpec, now_ms: int) -> GrantClaims:
        """Whether ``request``'s grant allows it (on ``model``) now; GrantError (the reason) if not. A
        call let through is remembered, so its grant allows no second call here before it expires."""
        self._forget_expired(now_ms)
        claims = self.claims(request.grant)
        call_id, deadline_ms = request.call_id, request.deadline_ms
        for name, granted, asked in (
            ("call", claims.call_id, call_id),
            ("tenant", claims.tenant, request.tenant),
            ("task", claims.task_id, request.task_id),
            ("model", claims.model, model.name),
            ("virtual key", claims.key_id, request.key_id),
            ("prompt (messages, tools, max_tokens) of digest", claims.prompt_digest, request_digest(request)),
        ):
            if granted != asked:
                raise GrantError(f"the grant is for {name} {granted!r}, not {asked!r}")
        if now_ms >= claims.expires_ms:
            raise GrantError(f"the grant expired at {claims.expires_ms} (now {now_ms})")
        if deadline_ms > claims.expires_ms:
            raise GrantError(f"the call's deadline {deadline_ms} is past the grant's expiry {claims.expires_ms}")
        if call_id in self._used:
            raise GrantReused(f"the grant of call {call_id!r} was already used")
        self._used.add(call_id)
        heapq.heappush(self._expiries, (claims.expires_ms, call_id))
        return claims

    def _forget_expired(self, now_ms: int) -> None:
        while self._expiries and self._expiries[0][0] <= now_ms:
            _, call_id = heapq.heappop(self._expiries)
            self._used.discard(call_id)


# -- keys --


def new_seed() -> bytes:
    """A fresh grant key: an account nkey seed (``SA...``)."""
    return cast(bytes, nkeys.encode_seed(secrets.token_bytes(32), PREFIX))


def public_key_of(raw: bytes) -> str:
    """The nkey text (``A...``) of a raw Ed25519 public key."""
    body = bytes([PREFIX]) + raw
    checksum: bytes = nkeys.crc16_checksum(body)
    return base64.b32encode(body + checksum).decode("ascii").rstrip("=")


def raw_public_key(public_key: str) -> bytes:
    """The raw Ed25519 key of an account public nkey (``A...``); GrantKeyError if it is not one."""
    try:
        text = public_key.strip()
        decoded = base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        raise GrantKeyError(f"{public_key!r} is not a public nkey (base32)") from None
    if len(decoded) != 35 or decoded[0] != PREFIX:
        raise GrantKeyError(f"{public_key!r} is not an account public nkey (it begins 'A')")
    body, checksum = decoded[:-2], decoded[-2:]
    expected: bytes = nkeys.crc16_checksum(body)
    if expected != checksum:
        raise GrantKeyError(f"{public_key!r}: bad checksum")
    return body[1:]


def seed_file(path: Path) -> bytes:
    """The seed in ``path``, created (mode 0600, a fresh key) if missing; safe when several
    processes start at once (the file appears whole or not at all, and the first one wins)."""
    try:
        return _read_seed(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(new_seed() + b"\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
    finally:
        temporary.unlink(missing_ok=True)
    return _read_seed(path)


def _read_seed(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & 0o077:
        raise GrantKeyError(f"grant seed file {path} is readable by others (mode {mode & 0o777:o}): chmod 600 it")
    seed = path.read_bytes().strip()
    if not seed:
        raise GrantKeyError(f"grant seed file {path} is empty")
    return seed


def signer_seed(home: Path) -> tuple[bytes, str]:
    """The accountant's seed and where it came from (for messages; never the seed itself)."""
    value = os.environ.get(SEED_ENV, "").strip()
    if value:
        return value.encode(), SEED_ENV
    path = Path(os.environ.get(SEED_FILE_ENV, "").strip() or home / SEED_FILE)
    try:
        return seed_file(path), str(path)
    except OSError as exc:
        raise GrantKeyError(f"cannot read or create the grant seed file {path}: {exc}") from None


def load_signer(home: Path) -> GrantSigner:
    """The accountant's signer (see the module docstring for where the seed comes from)."""
    seed, source = signer_seed(home)
    try:
        return GrantSigner(seed)
    except GrantKeyError as exc:
        raise GrantKeyError(f"the grant seed from {source}: {exc}") from None


def key_environments(home: Path) -> tuple[dict[str, str], dict[str, str]]:
    """For a launcher of the services (``frugalmesh up``): the grant-key variables for every service's
    environment (the public key; the seed settings blanked) and those added for the accountant's
    alone (where its seed is). The key is the one ``load_signer`` finds, created on first use."""
    seed, source = signer_seed(home)
    public_key = load_signer(home).public_key
    every = {PUBLIC_KEY_ENV: public_key, SEED_ENV: "", SEED_FILE_ENV: ""}
    accountant = {SEED_ENV: seed.decode()} if source == SEED_ENV else {SEED_FILE_ENV: source}
    return every, accountant


def load_verifier(home: Path) -> GrantVerifier:
    """An inference service's verifier: ``FRUGALMESH_GRANT_PUBLIC_KEY``, else the public key of the
    accountant's seed (one machine)."""
    value = os.environ.get(PUBLIC_KEY_ENV, "").strip()
    if value:
        try:
            return GrantVerifier(value)
        except GrantKeyError as exc:
            raise GrantKeyError(f"{PUBLIC_KEY_ENV}: {exc}") from None
    return GrantVerifier(load_signer(home).public_key)


def reservation_for(request: InferenceRequest, model: ModelSpec) -> Reservation:
    """The hold the router makes for ``request`` (its worst case at ``model``'s prices): what the
    accountant's grant for it signs. For a caller that stands in for router and accountant (a
    benchmark probing an inference service directly, with the accountant's seed)."""
    usage = worst_case_usage(model, request.messages, request.max_tokens, request.options.tools)
    return Reservation(
        id=request.call_id,
        tenant=request.tenant,
        task_id=request.task_id,
        model=request.model,
        amount_usd=model.worst_case_cost(usage.input_tokens, usage.output_tokens),
        expires_ms=request.deadline_ms,
        key_id=request.key_id,
        prompt_digest=request_digest(request),
    )


def request_digest(request: InferenceRequest) -> str:
    return prompt_digest(request.messages, request.options.tools, request.max_tokens)
