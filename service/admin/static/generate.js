// The Generate tab: one streamed article with progress, Stop, the done metadata and errors.
// Stop is aiStream.js's abort, which cancels the stream on the server; a dropped connection is
// reconnected by aiStream.js, and the status line says so while it does.
// The answer is rendered as Markdown as it arrives (markdown.js says how model text enters the
// page, safely); an answer the model did not end itself (cut at max tokens, stopped by a content
// filter) says so under it. Other model-sent text (placeholders) only enters as textContent.
import { generateContentStream } from "./aiStream.js";
import { MarkdownView } from "./markdown.js";

const $ = (id) => document.getElementById(id);

export function describeError(e) {
  return `Error (${e.code}): ${e.error}`;
}

const FINISH = {
  length: "Cut short: the answer reached its token limit",
  content_filter: "Cut short: the model server's content filter stopped the answer",
};

/** What to say about an answer's `finishReason`: "" when the model ended it itself. */
export function describeFinish(reason) {
  if (!reason || reason === "stop") return "";
  return `${FINISH[reason] ?? "The answer ended early"} (finish reason: ${reason}).`;
}

export function setupGenerate(config, options) {
  const form = $("generate-form");
  const model = $("model");
  const maxTokens = $("max-tokens");
  const stopButton = $("stop");
  const goButton = $("generate");
  const status = $("generate-status");
  const output = $("output");
  const finishNote = $("generate-finish");
  const bar = $("progress-bar");
  let atBottom = true;
  const view = new MarkdownView(output, {
    onRender: () => {
      if (atBottom) output.scrollTop = output.scrollHeight;
    },
  });
  output.addEventListener("scroll", () => {
    atBottom = output.scrollHeight - output.scrollTop - output.clientHeight < 24;
  });

  for (const name of config.models) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    option.selected = name === config.model;
    model.append(option);
  }
  maxTokens.value = String(config.defaultMaxTokens);
  maxTokens.max = String(config.maxTokensLimit);

  let running = null; // {controller, started, firstAt, tokens, timer}

  const setStatus = (text, kind = "") => {
    status.textContent = text;
    status.className = `status ${kind}`.trim();
  };

  const showStats = () => {
    if (!running) return;
    const now = performance.now();
    $("stat-tokens").textContent = String(running.tokens);
    $("stat-elapsed").textContent = ((now - running.started) / 1000).toFixed(1);
    const decoding = running.firstAt === null ? 0 : (now - running.firstAt) / 1000;
    $("stat-rate").textContent = decoding > 0.2 ? (running.tokens / decoding).toFixed(1) : "–";
    bar.value = Math.min(running.tokens, bar.max);
  };

  const showMeta = (done, images) => {
    $("meta-summary").textContent = `Generated ${done.tokenCount} tokens in ${done.elapsedMs} ms`;
    $("meta-model").textContent = done.model;
    $("meta-finish").textContent = done.finishReason ?? "–";
    finishNote.textContent = describeFinish(done.finishReason);
    finishNote.hidden = !finishNote.textContent;
    $("meta-request").textContent = done.requestId;
    const list = $("meta-placeholders");
    list.replaceChildren();
    for (const placeholder of done.imagePlaceholders) {
      const item = document.createElement("li");
      const n = /^\[\[image:(\d+)\]\]$/.exec(placeholder);
      const url = n ? images[Number(n[1]) - 1] : undefined;
      item.textContent = url ? `${placeholder} → ${url}` : placeholder;
      list.append(item);
    }
    if (!done.imagePlaceholders.length) {
      const item = document.createElement("li");
      item.textContent = "none";
      list.append(item);
    }
    $("meta").hidden = false;
  };

  const finish = () => {
    clearInterval(running.timer);
    showStats();
    running = null;
    view.end();
    goButton.disabled = false;
    stopButton.disabled = true;
    output.setAttribute("aria-busy", "false");
  };

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (running) return;
    const images = $("image-urls")
      .value.split("\n")
      .map((line) => line.trim())
      .filter(Boolean);
    const limit = Number(maxTokens.value) || config.defaultMaxTokens;
    const request = {
      prompt: $("prompt").value,
      selectedImageUrls: images,
      model: model.value || undefined,
      maxTokens: limit,
    };
    atBottom = true;
    view.start();
    finishNote.hidden = true;
    output.setAttribute("aria-busy", "true");
    $("meta").hidden = true;
    $("progress").hidden = false;
    bar.max = limit;
    bar.value = 0;
    setStatus("Waiting for the first tokens…");
    goButton.disabled = true;
    stopButton.disabled = false;
    const controller = new AbortController();
    running = { controller, started: performance.now(), firstAt: null, tokens: 0, timer: 0, reconnecting: false };
    running.timer = setInterval(showStats, 200);
    showStats();

    await generateContentStream(
      request,
      {
        onStart: () => setStatus("Streaming…"),
        onReconnect: (r) => {
          running.reconnecting = true;
          setStatus(`Connection lost; reconnecting (try ${r.attempt})…`);
        },
        onContent: (e) => {
          if (running.reconnecting) {
            running.reconnecting = false;
            setStatus("Streaming…");
          }
          if (running.firstAt === null) running.firstAt = performance.now();
          view.append(e.delta);
          running.tokens = e.tokenCount;
          showStats();
        },
        onDone: (done) => {
          running.tokens = done.tokenCount;
          setStatus("Done.", "ok");
          showMeta(done, images);
        },
        onError: (e) => {
          const kept = view.text ? " The text received so far is kept below." : "";
          setStatus(describeError(e) + kept, "error");
        },
        onAbort: () => setStatus(`Stopped after ${running.tokens} tokens.`, "stopped"),
      },
      { ...options(), signal: controller.signal },
    );
    finish();
  });

  stopButton.addEventListener("click", () => running?.controller.abort());
  return {};
}
