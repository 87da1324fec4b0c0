"""The gateway driven by the official ``openai`` npm package (Node.js), the other client nobody here
wrote: tests/node/gateway_check.mjs makes a completion, a stream with usage and three failing calls
against the live gateway on the real stack, and prints what it got; this test checks it.

The package is installed into tests/node/node_modules from its lock file (``npm ci``) on first use;
without Node.js and npm on the machine the test fails, saying what to install."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from test_gateway import FRONTIER, IN_PRICE, OUT_PRICE, mesh, start_gateway  # noqa: F401 (fixtures)

pytestmark = pytest.mark.infra

NODE_DIR = Path(__file__).parent / "node"


async def run(*args: str, cwd: Path = NODE_DIR, timeout_s: float = 120) -> str:
    process = await asyncio.create_subprocess_exec(
        *args, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    assert process.returncode == 0, f"{' '.join(args)} exited {process.returncode}: {err.decode()[-2000:]}"
    return out.decode()


@pytest.fixture(scope="session")
def node() -> str:
    found = shutil.which("node")
    if found is None or shutil.which("npm") is None:
        # Node.js and npm are on every machine this project builds on; without them this client check
        # would silently not happen, so it fails and says what to install.
        pytest.fail(
            "Node.js and npm are needed for the npm openai client test: install them (`apt-get install nodejs npm`)"
        )
    return found


async def test_the_openai_npm_package_gets_completions_streams_usage_and_its_own_errors(node, mesh):
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        await run("npm", "ci", "--no-audit", "--no-fund")

    out = json.loads(await run(node, "gateway_check.mjs", mesh.url, mesh.secret, FRONTIER))

    completion = out["completion"]
    assert completion["content"] == "The answer is 42."
    assert completion["usage"]["total_tokens"] == 7
    assert completion["frugalmesh"]["cost_usd"] == pytest.approx(3 * IN_PRICE + 4 * OUT_PRICE)
    stream = out["stream"]
    assert (stream["content"], stream["finish_reason"]) == ("The answer is 42.", "stop")
    assert stream["finishing_usage"]["completion_tokens"] == 4
    assert stream["finishing_frugalmesh"]["cost_usd"] == pytest.approx(3 * IN_PRICE + 4 * OUT_PRICE)
    assert (stream["last_choices"], stream["last_usage"]) == (0, stream["finishing_usage"])
    not_found = {"class": "NotFoundError", "status": 404, "param": "model", "code": "model_not_found"}
    assert out["unknown_model"] == not_found
    assert out["unsupported"]["class"] == "BadRequestError" and out["unsupported"]["param"] == "logprobs"
    assert out["bad_key"]["class"] == "AuthenticationError"
