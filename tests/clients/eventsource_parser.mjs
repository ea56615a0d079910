// eventsource-parser under Node, as its README pairs it with fetch: POST with
// `Accept: text/event-stream`, feed the decoded body to the parser, `JSON.parse` each event.
// Usage: node eventsource_parser.mjs '<job JSON>'; prints what it read as one JSON object.
import { createParser } from "eventsource-parser";

const job = JSON.parse(process.argv[2]);
const out = {
  status: null, headers: {}, data: [], ids: [], events: [], other: [], otherAt: [], error: null,
};
try {
  const response = await fetch(job.url, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
    body: JSON.stringify(job.body),
    signal: AbortSignal.timeout(job.timeoutMs),
  });
  out.status = response.status;
  response.headers.forEach((value, name) => {
    out.headers[name] = value;
  });
  const parser = createParser({
    onEvent(event) {
      out.data.push(event.data);
      out.ids.push(event.id ?? null);
      out.events.push(JSON.parse(event.data));
    },
    onComment(comment) {
      out.other.push(`: ${comment}`); // the parser hands over the text after ": "
      out.otherAt.push(out.events.length);
    },
  });
  const decoder = new TextDecoder();
  for await (const chunk of response.body) {
    parser.feed(decoder.decode(chunk, { stream: true }));
  }
  parser.feed(decoder.decode());
} catch (error) {
  out.error = String(error?.stack ?? error);
}
process.stdout.write(JSON.stringify(out));
