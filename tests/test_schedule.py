"""Scheduled tasks: stored in KV by the CLI, fired by every planner on its (injected) clock, once per run."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
import pytest
from click.testing import CliRunner
from fakes.router_peer import result
from helpers import eventually
from mesh_client import wait_for_ack

from schemas.messages import TERMINAL_EVENTS, Task, TaskEvent
from services.cli.schedule_commands import schedule
from services.planner.schedule import Schedule, add_schedule, remove_schedule, schedules_bucket
from services.runtime.bus import now_ms


class FakeClock:
    """The planners' time, moved by the test. Each replica reads it through its own ``reader``,
    which counts the reads: a scheduler tick reads the time once, then fires what is due."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.reads: list[int] = []

    def reader(self) -> Callable[[], datetime]:
        replica = len(self.reads)
        self.reads.append(0)

        def read() -> datetime:
            self.reads[replica] += 1
            return self.now

        return read

    async def ticked(self) -> None:
        """Until every replica has read the time three more times. A tick reads it once, fires
        what is due, sleeps; so by the second tick read after the first, a whole tick has run at
        ``now`` (three, not two: the scheduler also reads it once as it starts, before any tick)."""
        marks = list(self.reads)
        await eventually(lambda: all(r >= m + 3 for r, m in zip(self.reads, marks, strict=True)), timeout_s=5)


def at(hour: int, minute: int, second: int = 0) -> datetime:
    # In the future, so a schedule created now is older than every fire time below.
    return datetime(2031, 1, 1, hour, minute, second, tzinfo=UTC)


async def nothing_submitted(nc, submitted) -> None:
    """No task was submitted: after a round trip, whatever the server sent before is here."""
    await nc.flush()
    assert submitted.pending_msgs == 0, "a run was submitted that was not due"


@pytest.mark.infra
async def test_a_schedule_fires_each_run_once_across_replicas_with_its_timeout(
    settings, nc, bus, start_service, router_peers
):
    kv = await schedules_bucket(bus)
    entry = Schedule(
        id="sreport", cron="*/5 * * * *", timeout_s=7.0, workflow="answer", goal="q", tenant="ops", created_ms=now_ms()
    )
    await add_schedule(kv, entry)
    submitted = await nc.subscribe(settings.subjects.task_submit_all)  # every replica's copy, before dedupe
    events = await nc.subscribe(settings.subjects.task_events)
    await nc.flush()
    clock = FakeClock(at(12, 4, 30))
    await start_service("artifact-store", settings)
    for _ in range(2):
        await start_service("planner", settings, clock=clock.reader(), schedule_tick_s=0.05)
    peer = await router_peers(settings, lambda r: result(r, "report"))

    async def run_fired_at(fire: datetime) -> tuple[list[Task], list[TaskEvent]]:
        copies = [msgspec.json.decode((await submitted.next_msg(timeout=5)).data, type=Task) for _ in range(2)]
        seen: list[TaskEvent] = []
        while not seen or seen[-1].kind not in TERMINAL_EVENTS:
            seen.append(msgspec.json.decode((await events.next_msg(timeout=5)).data, type=TaskEvent))
        assert {c.id for c in copies} == {e.task_id for e in seen} == {f"sreport-{int(fire.timestamp())}"}
        return copies, seen

    await clock.ticked()  # ticks at 12:04:30: nothing is due
    await nothing_submitted(nc, submitted)
    assert peer.requests == []

    clock.now = at(12, 5, 1)
    copies, seen = await run_fired_at(at(12, 5))
    assert [e.kind for e in seen].count("accepted") == 1 and seen[-1].kind == "done"
    assert all((c.deadline_s, c.tenant, c.workflow, c.goal) == (7.0, "ops", "answer", "q") for c in copies)
    # The run's hard timeout is its deadline, from the copy JetStream kept.
    assert len(peer.requests) == 1
    assert any(peer.requests[0].deadline_ms == c.submitted_ms + 7000 for c in copies)

    # Down for an hour: only the runs of the last CATCH_UP_S fire, not eleven late ones.
    clock.now = at(13, 2)
    await run_fired_at(at(13, 0))
    await clock.ticked()
    await nothing_submitted(nc, submitted)
    assert len(peer.requests) == 2

    assert await remove_schedule(kv, "sreport")
    clock.now = at(13, 6)
    await clock.ticked()  # ticks past 13:05, without the schedule
    await nothing_submitted(nc, submitted)
    assert len(peer.requests) == 2
    await wait_for_ack(nc, settings)
    await submitted.unsubscribe()
    await events.unsubscribe()


@pytest.mark.unit
def test_fire_times_are_the_cron_times_in_between():
    entry = Schedule(id="s", cron="*/5 * * * *", timeout_s=1, workflow="answer", goal="g", created_ms=0)
    assert entry.fire_times(at(12, 0), at(12, 15)) == [at(12, 5), at(12, 10), at(12, 15)]
    assert entry.fire_times(at(12, 1), at(12, 4, 59)) == []
    assert entry.task(at(12, 5)).id == f"s-{int(at(12, 5).timestamp())}"


def cli(settings, *args: str):
    env = {"NATS_URL": settings.nats_url, "FRUGALMESH_SUBJECT_PREFIX": settings.subject_prefix}
    return CliRunner().invoke(schedule, list(args), env=env)


@pytest.mark.infra
def test_schedule_add_list_remove(settings):
    options = ["--cron", "*/5 * * * *", "--timeout", "90s", "--tenant", "ops", "--budget", "0.5"]
    added = cli(settings, "add", *options, "daily report")
    assert added.exit_code == 0, added.output
    schedule_id = added.output.strip()
    listed = cli(settings, "list")
    assert listed.exit_code == 0
    assert schedule_id in listed.output and "*/5 * * * *" in listed.output and "90s" in listed.output
    assert "daily report" in listed.output and "$0.5" in listed.output
    assert cli(settings, "remove", schedule_id).exit_code == 0
    assert schedule_id not in cli(settings, "list").output
    gone = cli(settings, "remove", schedule_id)
    assert gone.exit_code == 1 and f"no schedule '{schedule_id}'" in gone.output


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cron", "*/5 * * *", "--timeout", "60s"], "'*/5 * * *' is not a cron expression: give five fields"),
        (["--cron", "61 * * * *", "--timeout", "60s"], 'e.g. "*/5 * * * *" for every five minutes'),
        (["--cron", "*/5 * * * *", "--timeout", "60x"], "'60x' is not a duration: write a number and a unit"),
        (["--cron", "*/5 * * * *", "--timeout", "60"], "e.g. 60s or 5m"),
        (["--cron", "*/5 * * * *", "--timeout", "0s"], "a run needs a timeout above zero"),
        (["--cron", "*/5 * * * *", "--timeout", "1m", "--tenant", "a.b"], "cannot be a subject token"),
        (["--cron", "*/5 * * * *", "--timeout", "1m", "--workflow", "nope"], "unknown workflow 'nope'; known: answer"),
        (["--cron", "*/5 * * * *", "--timeout", "1m", "--budget", "0"], "--budget"),
        (["--timeout", "1m"], "Missing option '--cron'"),
    ],
)
def test_schedule_add_explains_bad_input(args, message):
    outcome = CliRunner().invoke(schedule, ["add", *args, "goal"])
    assert outcome.exit_code == 2
    assert message in outcome.output


@pytest.mark.unit
def test_durations_convert_to_seconds():
    from services.cli.schedule_commands import Duration

    converted = [Duration().convert(v, None, None) for v in ("250ms", "60s", "5m", "1.5h", " 2S ")]
    assert converted == [0.25, 60, 300, 5400, 2]
