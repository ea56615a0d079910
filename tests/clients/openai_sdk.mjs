// The official `openai` npm package, used as its README shows, pointed at the gateway's
// OpenAI-compatible surface. One call per run, named by the job; the SDK's own retries are off
// so that a status reaches the caller as the SDK's error class.
// Usage: node openai_sdk.mjs '<job JSON>'; prints what it read as one JSON object:
//   {chunks, result, ended, error}: `chunks` the streamed chunks as the SDK handed them over,
//   `result` a whole answer or the models list, `ended` true only when a stream ended normally,
//   `error` the thrown error's class chain, status, code, type and message.
import OpenAI from "openai";

const job = JSON.parse(process.argv[2]);
const out = { chunks: [], result: null, ended: false, error: null };
const client = new OpenAI({
  baseURL: job.baseURL,
  apiKey: job.apiKey,
  maxRetries: 0,
  timeout: job.timeoutMs,
});

function classes(error) {
  const names = [];
  for (let c = error?.constructor; c && c !== Object; c = Object.getPrototypeOf(c)) {
    names.push(c.name);
  }
  return names;
}

try {
  if (job.call === "models") {
    const models = [];
    for await (const model of client.models.list()) {
      models.push(model);
    }
    out.result = models;
  } else if (job.call === "stream") {
    const stream = await client.chat.completions.create({ ...job.body, stream: true });
    for await (const chunk of stream) {
      out.chunks.push(chunk);
    }
    out.ended = true;
  } else {
    out.result = await client.chat.completions.create({ ...job.body, stream: false });
  }
} catch (error) {
  out.error = {
    classes: classes(error),
    isAPIError: error instanceof OpenAI.APIError,
    status: error?.status ?? null,
    code: error?.code ?? null,
    type: error?.type ?? null,
    message: String(error?.message ?? error),
  };
}
process.stdout.write(JSON.stringify(out));
