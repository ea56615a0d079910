// The Chat tab: a conversation with history. Its id lives in the URL (?conversation=...) and in
// local storage, so a reload (or a shared link) shows the same conversation from the API.
// Each turn is sent with the model picked for it (the page's models, from config.json); every
// answer names the model that wrote it and says when it was cut short (its finishReason), live
// and in the saved history. Answers are rendered as Markdown (markdown.js); the user's own
// messages are shown as text.
import { chatStream, getConversation } from "./aiStream.js";
import { describeError, describeFinish } from "./generate.js";
import { MarkdownView } from "./markdown.js";

const STORAGE = "aiStream.conversationId";
const $ = (id) => document.getElementById(id);
const NOTES = { partial: "cut short", error: "failed" };

export function setupChat(config, options) {
  const list = $("messages");
  const modelPicker = $("chat-model");
  const form = $("chat-form");
  const input = $("chat-input");
  const send = $("send");
  const stop = $("chat-stop");
  const status = $("chat-status");
  const label = $("conversation-label");

  for (const name of config.models) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    option.selected = name === config.model;
    modelPicker.append(option);
  }

  let conversationId =
    new URLSearchParams(location.search).get("conversation") || localStorage.getItem(STORAGE) || null;
  let loaded = false;
  let running = null; // the AbortController of the turn in flight

  const setStatus = (text, kind = "") => {
    status.textContent = text;
    status.className = `status ${kind}`.trim();
  };

  const remember = (id) => {
    conversationId = id;
    if (id) localStorage.setItem(STORAGE, id);
    else localStorage.removeItem(STORAGE);
    const url = new URL(location.href);
    if (id) url.searchParams.set("conversation", id);
    else url.searchParams.delete("conversation");
    history.replaceState(null, "", url);
    label.textContent = id ? `Conversation ${id}` : "New conversation";
  };

  const addMessage = (role, content = "", note = "", { model = "", finishReason = null } = {}) => {
    const item = document.createElement("li");
    item.className = `message ${role}`;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    const modelLabel = document.createElement("span");
    modelLabel.className = "model";
    modelLabel.textContent = model ?? "";
    if (role === "assistant") who.append(modelLabel);
    const body = document.createElement("div");
    body.className = role === "user" ? "body" : "body markdown";
    let view = null;
    if (role === "user") body.textContent = content;
    else {
      view = new MarkdownView(body, { onRender: () => item.scrollIntoView({ block: "nearest" }) });
      if (content) view.show(content);
    }
    const small = document.createElement("div");
    small.className = "note";
    small.textContent = note;
    const finish = document.createElement("div");
    finish.className = "finish";
    finish.textContent = describeFinish(finishReason);
    item.append(who, body, small, finish);
    list.append(item);
    return { item, view, note: small, finish, model: modelLabel };
  };

  const usageNote = (usage) => (usage ? `${usage.completion_tokens} tokens` : "");

  async function load() {
    remember(conversationId);
    if (!conversationId) return;
    setStatus("Loading the conversation…");
    try {
      const conversation = await getConversation(conversationId, options());
      list.replaceChildren();
      for (const m of conversation.messages) {
        const note = [NOTES[m.status] ?? "", m.role === "assistant" ? usageNote(m.usage) : ""];
        addMessage(m.role, m.content, note.filter(Boolean).join(" · "), m);
      }
      setStatus("");
    } catch (err) {
      if (err.code === "not_found") {
        remember(null);
        setStatus("That conversation no longer exists; a new one starts with your next message.");
      } else {
        setStatus(describeError({ code: err.code, error: err.message }), "error");
      }
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const message = input.value.trim();
    if (!message || running) return;
    input.value = "";
    const mine = addMessage("user", message);
    const reply = addMessage("assistant", "", "", { model: modelPicker.value });
    reply.item.classList.add("streaming");
    reply.view.start();
    reply.item.scrollIntoView({ block: "nearest" });
    setStatus("");
    running = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    const request = conversationId ? { message, conversationId } : { message };
    if (modelPicker.value) request.model = modelPicker.value;
    let started = false;
    await chatStream(
      request,
      {
        onMetadata: (e) => {
          started = true;
          remember(e.conversationId);
          reply.model.textContent = e.model;
        },
        onToken: (e) => reply.view.append(e.content),
        onDone: (e) => {
          reply.note.textContent = usageNote(e.usage);
          reply.finish.textContent = describeFinish(e.finishReason);
        },
        onError: (e) => {
          if (!started) {
            // refused before the turn started: nothing was saved, the message can be sent again
            reply.item.remove();
            mine.note.textContent = "not sent";
            input.value = message;
          } else {
            reply.note.textContent = "failed";
          }
          setStatus(describeError(e), "error");
        },
        onAbort: () => {
          reply.note.textContent = "stopped";
        },
      },
      { ...options(), signal: running.signal },
    );
    reply.item.classList.remove("streaming");
    if (reply.item.isConnected) reply.view.end();
    running = null;
    send.disabled = false;
    stop.disabled = true;
  });

  stop.addEventListener("click", () => running?.abort());

  $("new-conversation").addEventListener("click", () => {
    running?.abort();
    remember(null);
    list.replaceChildren();
    setStatus("");
    input.focus();
  });

  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  return {
    shown: () => {
      if (loaded) return;
      loaded = true;
      load();
    },
  };
}
