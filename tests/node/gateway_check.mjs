// The gateway driven by the official openai npm package: a client nobody here wrote.
// Usage: node gateway_check.mjs <base URL ending /v1> <key> <model>
// Prints one JSON object: what each call returned, or the SDK error class it raised.
import OpenAI from "openai";

const [baseURL, apiKey, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const messages = [{ role: "user", content: "Say the answer." }];
const out = {};

async function errorOf(call) {
  try {
    await call();
    return null;
  } catch (error) {
    return { class: error.constructor.name, status: error.status, param: error.param ?? null, code: error.code ?? null };
  }
}

const completion = await client.chat.completions.create({ model, messages });
out.completion = {
  content: completion.choices[0].message.content,
  usage: completion.usage,
  frugalmesh: completion.frugalmesh,
};

const stream = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "Stream the answer." }],
  stream: true,
  stream_options: { include_usage: true },
});
const chunks = [];
for await (const chunk of stream) chunks.push(chunk);
const finishing = chunks.find((c) => c.choices.length && c.choices[0].finish_reason);
out.stream = {
  content: chunks.map((c) => (c.choices.length ? c.choices[0].delta.content ?? "" : "")).join(""),
  finish_reason: finishing.choices[0].finish_reason,
  finishing_usage: finishing.usage,
  finishing_frugalmesh: finishing.frugalmesh,
  last_choices: chunks[chunks.length - 1].choices.length,
  last_usage: chunks[chunks.length - 1].usage,
};

out.unknown_model = await errorOf(() => client.chat.completions.create({ model: "gpt-9", messages }));
out.unsupported = await errorOf(() => client.chat.completions.create({ model, messages, logprobs: true }));
out.bad_key = await errorOf(() =>
  new OpenAI({ baseURL, apiKey: "fm-nope", maxRetries: 0 }).chat.completions.create({ model, messages }),
);
console.log(JSON.stringify(out));
