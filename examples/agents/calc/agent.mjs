// calc: a frugalmesh tool agent in Node.js, written against the JSON Schemas only (schemas/json/).
// It reads the text of its input artifact (an arithmetic expression a model wrote, maybe with words
// around it), evaluates it without eval, and stores the result as an `answer` artifact.
// Run: FRUGALMESH_NATS_URL=nats://127.0.0.1:4222 FRUGALMESH_SUBJECT_PREFIX=mesh AGENT_NAME=calc \
//   FRUGALMESH_NATS_CREDS=~/.frugalmesh/creds/agent.calc.nk node agent.mjs
// (the credential: `frugalmesh creds create --agent calc`; without one, a server that lets anyone in)
import { readFileSync } from "node:fs";
import { connect, JSONCodec, nkeyAuthenticator, nkeys } from "nats";

const NATS_URL = process.env.FRUGALMESH_NATS_URL ?? "nats://127.0.0.1:4222";
const PREFIX = process.env.FRUGALMESH_SUBJECT_PREFIX ?? "mesh";
const NAME = process.env.AGENT_NAME ?? "calc";
const json = JSONCodec();

// --- the calculator: a recursive-descent parser for + - * / ^, parentheses and decimals ---
// expr := term (("+"|"-") term)*   term := unary (("*"|"/") unary)*   unary := ("-"|"+") unary | power
// power := atom ("^" unary)?       atom := number | "(" expr ")"        (so -2^2 = -4 and 2^-1 = 0.5)
function evaluate(source) {
  const tokens = source.match(/\d+(?:\.\d+)?|\.\d+|\S/g) ?? [];
  let i = 0;
  const peek = () => tokens[i];
  const take = (t) => (tokens[i] === t ? (i++, true) : false);
  const fail = (why) => { throw new Error(`cannot evaluate ${JSON.stringify(source)}: ${why}`); };
  function expr() {
    let v = term();
    for (;;) if (take("+")) v += term(); else if (take("-")) v -= term(); else return v;
  }
  function term() {
    let v = unary();
    for (;;) {
      if (take("*")) v *= unary();
      else if (take("/")) { const d = unary(); if (d === 0) fail("division by zero"); v /= d; }
      else return v;
    }
  }
  const unary = () => (take("-") ? -unary() : take("+") ? unary() : power());
  const power = () => { const base = atom(); return take("^") ? base ** unary() : base; };
  function atom() {
    if (take("(")) { const v = expr(); if (!take(")")) fail("missing )"); return v; }
    const t = peek();
    if (t !== undefined && /^[\d.]/.test(t)) { i++; return Number(t); }
    return fail(t === undefined ? "it ends too soon" : `unexpected ${JSON.stringify(t)}`);
  }
  const value = expr();
  if (i < tokens.length) fail(`unexpected ${JSON.stringify(peek())}`);
  if (!Number.isFinite(value)) fail("the result is not a finite number");
  return value;
}

// The expression inside a model's prose: the longest run of digits, operators and parentheses.
function extract(text) {
  const runs = (text.replace(/\*\*/g, "^").replace(/×/g, "*").replace(/÷/g, "/").match(/[-+*/^().\d\s]+/g) ?? [])
    .map((run) => run.trim().replace(/[.\s]+$/, "")) // a sentence's full stop is not part of it
    .filter((run) => /\d/.test(run));
  if (runs.length === 0) throw new Error(`no arithmetic expression in ${JSON.stringify(text.slice(0, 200))}`);
  return runs.reduce((a, b) => (b.length > a.length ? b : a));
}

const format = (value) => String(Number(value.toPrecision(12))); // 0.1 + 0.2 -> "0.3"

// --- talking to the mesh ---
class Invalid extends Error {} // the input is unusable: the step fails `invalid`, never retried

// A request to the artifact store; what it refuses throws `Refused` (a timeout throws, retryable).
// On the tenant's own subject (mesh.artifact.<verb>.<tenant>): the store takes the tenant from it.
async function call(nc, verb, message, deadlineMs, Refused = Error) {
  const timeout = Math.max(500, Math.min(5000, deadlineMs - Date.now()));
  const subject = `${PREFIX}.artifact.${verb}.${message.tenant}`;
  const reply = json.decode((await nc.request(subject, json.encode(message), { timeout })).data);
  if (reply.error) throw new Refused(`artifact ${verb}: ${reply.error.message ?? reply.error}`);
  return reply;
}

async function run(nc, request) {
  if (request.artifact !== "answer") throw new Invalid(`${NAME} produces answer, not ${request.artifact}`);
  const input = Object.values(request.needs ?? {})[0] ?? (request.inputs ?? [])[0];
  if (!input) throw new Invalid("no input artifact: give the step a need or the task an input");
  // Artifacts are the task's tenant's: the store refuses a get or put as any other tenant.
  const tenant = request.tenant ?? "default";
  const { artifact } = await call(nc, "get", { v: 1, id: input.id, tenant }, request.deadline_ms, Invalid);
  if (typeof artifact?.body?.text !== "string") throw new Invalid(`input ${input.type} ${input.id} has no text`);
  let result;
  try {
    result = format(evaluate(extract(artifact.body.text)));
  } catch (error) {
    throw new Invalid(error.message);
  }
  const answer = {
    v: 1, type: "answer", body: { text: result, model: NAME }, // an answer names its maker: here, the tool
    parents: [input.id], tenant, task_id: request.task_id, step_id: request.step_id,
  };
  const { ref } = await call(nc, "put", answer, request.deadline_ms);
  return { v: 1, artifacts: [ref], cost_usd: 0, calls: [] };
}

// Bad input never stops a service: reply why, keep the bytes in the mesh's DLQ, serve the next one.
function reject(nc, msg, why) {
  const error = { kind: "invalid", message: why, retryable: false };
  msg.respond(json.encode({ v: 1, error }));
  const headers = Object.fromEntries([...(msg.headers ?? [])].map(([k, v]) => [k, v.join(",")]));
  nc.publish(`${PREFIX}.dlq.agent-${NAME}`, json.encode({
    v: 1, service: `agent-${NAME}`, subject: msg.subject, error: why, headers,
    data: Buffer.from(msg.data).toString("base64"), time_ms: Date.now(),
  }));
}

function readRequest(msg) {
  let request;
  try {
    request = json.decode(msg.data);
  } catch {
    return [null, "not JSON: expected an AgentRequest"];
  }
  if (typeof request !== "object" || request === null || Array.isArray(request)) {
    return [null, "expected an AgentRequest object"];
  }
  const missing = ["task_id", "step_id", "agent", "artifact", "deadline_ms"].filter((k) => request[k] === undefined);
  return missing.length ? [null, `AgentRequest without ${missing.join(", ")}`] : [request, null];
}

// What this instance measured of its requests (its endpoint's stats data): the mesh's estimate reads it.
const stats = { served: 0, succeeded: 0, in_flight: 0, cost_usd: 0, busy_s: 0 };

async function handle(nc, msg) {
  const [request, why] = readRequest(msg);
  if (why) return reject(nc, msg, why);
  const started = performance.now();
  stats.in_flight++;
  let reply;
  try {
    reply = await run(nc, request);
  } catch (error) {
    const invalid = error instanceof Invalid;
    console.error(`${NAME}: task ${request.task_id} step ${request.step_id}: ${error.message}`);
    reply = { v: 1, artifacts: [], cost_usd: 0, calls: [],
      error: { kind: invalid ? "invalid" : "agent", message: error.message, retryable: !invalid } };
  } finally {
    stats.in_flight--;
  }
  stats.served++;
  stats.busy_s += (performance.now() - started) / 1000;
  if (!reply.error) stats.succeeded++;
  msg.respond(json.encode(reply));
}

// The agent's NATS identity: its nkey seed, and its own inboxes (_INBOX.<public key>), the only ones the
// server lets it read (docs/security.md).
function identity() {
  const path = process.env.FRUGALMESH_NATS_CREDS;
  if (!path) return {};
  const seed = new TextEncoder().encode(readFileSync(path, "utf8").trim());
  const publicKey = nkeys.fromSeed(seed).getPublicKey();
  return { authenticator: nkeyAuthenticator(seed), inboxPrefix: `_INBOX.${publicKey}` };
}

const nc = await connect({ servers: NATS_URL, name: `agent-${NAME}`, ...identity() });
const service = await nc.services.add({
  name: NAME,
  version: "1.0.0",
  description: "Evaluates the arithmetic expression in its input's text; stores the result as an answer.",
  queue: NAME, // replicas share the work
  statsHandler: async () => stats,
  // What the mesh reads (strings): its mesh, the artifact types it reads and writes, its declared figures.
  metadata: {
    frugalmesh_prefix: PREFIX, consumes: "text,answer", produces: "answer", cost_usd: "0", latency_s: "0.01",
  },
});
const inFlight = new Set(); // requests being answered, each concurrently
service.addEndpoint(NAME, {
  subject: `${PREFIX}.agent.${NAME}`,
  handler: (err, msg) => {
    if (err) return console.error(`${NAME}: ${err.message}`);
    const work = handle(nc, msg).catch((error) => console.error(`${NAME}: ${error.message}`));
    inFlight.add(work);
    work.finally(() => inFlight.delete(work));
  },
});
console.log(`${NAME}: serving ${PREFIX}.agent.${NAME} on ${NATS_URL}`);

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, async () => {
    await service.stop(); // leave the registry and the queue group: no new work comes
    await Promise.allSettled(inFlight); // answer what was taken
    await nc.drain();
    process.exit(0);
  });
}
