// aiStream.js (the project's own client, client/) under Node, driven line by line:
//   node ai_stream.mjs '{"baseUrl": "...", "path": "/api/ai/generate-stream", "body": {...},
//                        "then": "pause"}'
// With "then": "pause" it pauses at the first text, prints {"paused": true, "streamId": ...} on a
// line of its own, and resumes when a line "resume" arrives on stdin. At the end it prints its
// report (one JSON line): what the callbacks saw and the result.
import { createInterface } from "node:readline";

import { chatStream, generateContentStream } from "../../client/aiStream.js";

const job = JSON.parse(process.argv[2]);
const run = job.path === "/api/ai/generate-stream" ? generateContentStream : chatStream;
const out = { pieces: [], reconnects: [], done: null, error: null, aborted: null, streamId: null };
let handle = null;
const lines = createInterface({ input: process.stdin });
lines.on("line", (line) => {
  if (line.trim() === "resume") handle?.resume();
});
const piece = (text) => {
  out.pieces.push(text);
  if (out.pieces.length === 1 && job.then === "pause") {
    handle.pause();
    process.stdout.write(JSON.stringify({ paused: true, streamId: handle.streamId }) + "\n");
  }
};
const result = await run(
  job.body,
  {
    onStream: (h) => {
      handle = h;
      out.streamId = h.streamId;
    },
    onContent: (e) => piece(e.delta),
    onToken: (e) => piece(e.content),
    onReconnect: (r) => out.reconnects.push(r),
    onDone: (d) => (out.done = d),
    onError: (e) => (out.error = e),
    onAbort: (a) => (out.aborted = a),
  },
  { baseUrl: job.baseUrl, batchMs: 0, reconnect: { tries: 3, baseMs: 20, maxMs: 200 } },
);
process.stdout.write(JSON.stringify({ ...out, status: result.status, text: result.text }) + "\n");
lines.close();
