// The first design note's reader ("Uses Fetch API with ReadableStream; parses SSE format
// (`data: {...}\n\n`); handles partial messages in buffer"): it sends no `Accept`, splits the body
// on blank lines, and reads a message only when it starts with `data: `. Anything else it skips
// silently, so this records what was skipped.
// Usage: node design_note_reader.mjs '<job JSON>'; prints what it read as one JSON object.
const job = JSON.parse(process.argv[2]);
const out = {
  status: null, headers: {}, data: [], ids: [], events: [], other: [], otherAt: [], error: null,
};
try {
  const response = await fetch(job.url, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(job.body),
    signal: AbortSignal.timeout(job.timeoutMs),
  });
  out.status = response.status;
  response.headers.forEach((value, name) => {
    out.headers[name] = value;
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    while (true) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const messages = buffer.split("\n\n");
      buffer = messages.pop() || "";
      for (const message of messages) {
        if (message.startsWith("data: ")) {
          const text = message.slice(6);
          out.data.push(text);
          out.events.push(JSON.parse(text));
        } else {
          out.other.push(message);
          out.otherAt.push(out.events.length);
        }
      }
    }
  } finally {
    reader.releaseLock();
  }
  if (buffer) {
    out.other.push(buffer);
    out.otherAt.push(out.events.length);
  }
} catch (error) {
  out.error = String(error?.stack ?? error);
}
process.stdout.write(JSON.stringify(out));
