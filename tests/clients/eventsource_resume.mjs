// The `eventsource` package under Node, as its users run it: `new EventSource(url)` on the GET
// route; it reconnects by itself with Last-Event-ID and stops for good at a 204. Prints a JSON
// report of what it delivered once it is closed (or at the job's deadline).
//   node eventsource_resume.mjs '{"url": "...", "timeoutMs": 15000}'
import { EventSource } from "eventsource";

const job = JSON.parse(process.argv[2]);
const out = { data: [], ids: [], opens: [], errors: 0, closed: false, error: null };
const source = new EventSource(job.url);
const end = () => {
  clearTimeout(timer);
  source.close();
  process.stdout.write(JSON.stringify(out));
};
const timer = setTimeout(() => {
  out.error = `not closed within ${job.timeoutMs} ms`;
  end();
}, job.timeoutMs);
source.onopen = () => out.opens.push(200);
source.onmessage = (ev) => {
  out.data.push(ev.data);
  out.ids.push(ev.lastEventId);
};
source.onerror = (ev) => {
  out.errors += 1;
  if (source.readyState === source.CLOSED) {
    out.closed = true;
    out.lastError = { code: ev.code ?? null, message: ev.message ?? null };
    end();
  }
};
