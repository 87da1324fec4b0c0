"""Hostile input at the edges tests/test_fuzz.py leaves out (issue 16, item 8), on the real services and
a real nats-server, with the fake OpenAI provider behind cloud-inference:

- ``<stream_to>.cancel``: any message there is the caller's cancel, whatever its bytes and headers
  (nothing in it is read, so nothing can be unreadable): the streamed call stops, answered
  ``cancelled``, and the next streamed call streams;
- the gateway's HTTP API, with a valid key: a hostile JSON body to ``POST /v1/chat/completions`` or
  ``POST /v1/feedback`` is answered, within the timeout, either as a valid request (200, 202) or with
  a 4xx and OpenAI's error body (``{"error": {"message", "type", "param", "code"}}``), never a 5xx;
  and a valid request right after it is answered.

Payloads: tests/hostile.py; examples per test as tests/test_fuzz.py (``FRUGALMESH_FUZZ_EXAMPLES``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx
import msgspec
import pytest
from fakes.budget_peer import BudgetPeer
from fakes.grants import granted
from helpers import eventually, make_request
from hostile import headers, payloads
from hypothesis import assume, given
from hypothesis import strategies as st
from mesh_client import call
from test_fuzz import FUZZ
from test_gateway import create_key

from schemas.messages import ChatMessage, Feedback, InferenceRequest, StreamChunk
from schemas.subjects import Subjects
from services.gateway.errors import ErrorEnvelope
from services.gateway.feedback import FeedbackBody
from services.gateway.openai_wire import decode_request

pytestmark = [pytest.mark.infra, pytest.mark.slow]

FRONTIER = "gpt-4-1106-preview"  # on provider openai: the fake API
LONG_REPLY = " ".join(f"word{i}" for i in range(300))


# -- the streamed call's cancel subject --


@pytest.fixture
async def slow_stream(openai_settings, start_service, fake_openai):
    """cloud-inference on a fake provider that streams a long reply a word every 10 ms (the fixture is
    set up once for all of a test's examples)."""
    fake_openai.behaviour.reply = LONG_REPLY
    fake_openai.behaviour.token_delay_s = 0.01
    await start_service("cloud-inference", openai_settings)
    return openai_settings


def _streamed(inbox: str) -> InferenceRequest:
    request = make_request(FRONTIER, "Count to three hundred.", max_tokens=400, deadline_s=20)
    return granted(msgspec.structs.replace(request, task_id="fuzz-cancel", stream_to=inbox))


@FUZZ
@given(data=st.data())
async def test_any_message_on_the_cancel_subject_stops_the_streamed_call(slow_stream, nc, data):
    payload = data.draw(st.binary(max_size=512) | payloads(ChatMessage(role="user", content="stop")), label="payload")
    assume(len(payload) < nc.max_payload - 8192)
    chunks: list[StreamChunk] = []

    async def keep(msg) -> None:
        chunks.append(msgspec.json.decode(msg.data, type=StreamChunk))

    inbox = nc.new_inbox()
    stream = await nc.subscribe(inbox, cb=keep)
    running = asyncio.create_task(call(nc, slow_stream.subjects.infer_cloud("openai"), _streamed(inbox), 20))
    try:
        await eventually(lambda: chunks, message="the streamed call streamed nothing")  # the service goes on
        await nc.publish(Subjects.stream_cancel(inbox), payload, headers=data.draw(headers, label="headers"))
        result = await running
    finally:
        await stream.unsubscribe()

    assert result.error is not None and result.error.kind == "cancelled", result.error
    assert len(chunks) < len(LONG_REPLY.split())


# -- the gateway's HTTP API --


@dataclass(repr=False)
class Gateway:
    url: str
    secret: str
    # Every verdict the gateway published, as sent, by its id.
    verdicts: dict[str, bytes]

    def __repr__(self) -> str:  # what a failing example prints: not every verdict of the test
        return f"Gateway({self.url}, {len(self.verdicts)} verdicts)"

    def _repr_pretty_(self, printer, cycle: bool) -> None:  # hypothesis prints arguments with this
        printer.text(repr(self))


@pytest.fixture
async def gateway(openai_settings, start_service, nc, bus) -> Gateway:
    """A gateway over the router and cloud-inference (a granting budget peer), a valid key of tenant
    acme, and the verdicts published for that tenant."""
    await BudgetPeer(nc, openai_settings.subjects).start()
    await start_service("cloud-inference", openai_settings)
    await start_service("router", openai_settings)
    urls: list[str] = []
    await start_service("gateway", openai_settings, port=0, listening=urls.append)
    secret, key = await create_key(bus, name="fuzz")
    verdicts: dict[str, bytes] = {}

    async def keep(msg) -> None:
        verdicts[msgspec.json.decode(msg.data)["feedback_id"]] = msg.data

    await nc.subscribe(openai_settings.subjects.feedback(key.tenant), cb=keep)
    return Gateway(urls[0] + "/v1", secret, verdicts)


ENDPOINTS = {
    "chat/completions": decode_request(
        msgspec.json.encode({"model": FRONTIER, "messages": [{"role": "user", "content": "Say the answer."}]})
    ),
    "feedback": FeedbackBody(call_id="chatcmpl-" + "0" * 32, score=1.0),
}
ACCEPTED = {"chat/completions": 200, "feedback": 202}


@FUZZ
@given(data=st.data())
async def test_every_hostile_body_is_a_4xx_with_an_openai_error_and_never_a_5xx(gateway, data):
    endpoint = data.draw(st.sampled_from(sorted(ENDPOINTS)), label="endpoint")
    valid = ENDPOINTS[endpoint]
    body = data.draw(payloads(valid), label="body")
    auth = {"authorization": f"Bearer {gateway.secret}", "content-type": "application/json"}

    async with httpx.AsyncClient(base_url=gateway.url, headers=auth, timeout=30) as http:
        answer = await http.post(f"/{endpoint}", content=body)
        again = await http.post(f"/{endpoint}", content=msgspec.json.encode(valid))

    if answer.status_code != ACCEPTED[endpoint]:
        assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:500])
        error = msgspec.json.decode(answer.content, type=ErrorEnvelope).error
        assert error.message and error.type, error
    elif endpoint == "feedback":  # accepted: a verdict the accountant stores, not one it will dead-letter
        verdict = await eventually(lambda: gateway.verdicts.get(answer.json()["id"]))
        msgspec.json.decode(verdict, type=Feedback)
    assert again.status_code == ACCEPTED[endpoint], (again.status_code, again.text[:500])  # the gateway goes on
