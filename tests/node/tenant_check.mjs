// A tenant's client written with the official `nats` npm package, as a customer would write one
// (tests/test_nats_identities.py runs it): its nkey seed and its own inboxes, a task submitted on its
// tenant's subject, its events followed live, its stored ending read by JetStream's direct get, and a
// submission as another tenant, which the server refuses. Prints one JSON object.
//   node tenant_check.mjs URL SEED_FILE PREFIX TENANT OTHER_TENANT
import { readFileSync } from "node:fs";
import { connect, headers, JSONCodec, nkeyAuthenticator, nkeys } from "nats";

const [url, seedFile, prefix, tenant, other] = process.argv.slice(2);
const seed = new TextEncoder().encode(readFileSync(seedFile, "utf8").trim());
const publicKey = nkeys.fromSeed(seed).getPublicKey();
const nc = await connect({ servers: url, authenticator: nkeyAuthenticator(seed), inboxPrefix: `_INBOX.${publicKey}` });
const refusals = [];
(async () => {
  // A refusal: {type: "error", data: "PERMISSIONS_VIOLATION", permissionContext: {operation, subject}}.
  for await (const status of nc.status()) {
    if (status.type === "error") refusals.push({ error: String(status.data), ...status.permissionContext });
  }
})();
const json = JSONCodec();
const TERMINAL = ["done", "partial", "failed", "killed"];

// Its own task: a workflow that does not exist, so it fails at once with a stored ending.
const id = `node-${Date.now()}`;
const events = nc.subscribe(`${prefix}.task.event.${tenant}.${id}.>`);
const dedupe = headers();
dedupe.set("Nats-Msg-Id", `${tenant}.${id}`);
const task = { v: 1, id, tenant, workflow: "no-such-workflow", goal: "hi", submitted_ms: Date.now() };
await nc.jetstream().publish(`${prefix}.task.submit.${tenant}`, json.encode(task), { headers: dedupe });
const kinds = [];
for await (const msg of events) {
  const event = json.decode(msg.data);
  kinds.push(event.kind);
  if (TERMINAL.includes(event.kind)) break;
}
// Its stored ending: a direct get by subject, the form its permissions allow.
const stream = `${prefix.toUpperCase()}_TASK_EVENTS`;
const stored = await nc.request(`$JS.API.DIRECT.GET.${stream}.${prefix}.task.event.${tenant}.${id}.>`);

// Another tenant's subject: the server refuses the publish and says so on the connection.
nc.publish(`${prefix}.task.submit.${other}`, json.encode({ ...task, id: `${id}-other`, tenant: other }));
await nc.flush();
await new Promise((resolve) => setTimeout(resolve, 500));

console.log(JSON.stringify({ kinds, stored_kind: json.decode(stored.data).kind, refusals }));
await nc.close();
