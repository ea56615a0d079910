// The Chat tab: a conversation with history. Its id lives in the URL (?conversation=...) and in
// local storage, so a reload (or a shared link) shows the same conversation from the API.
import { chatStream, getConversation } from "./aiStream.js";
import { describeError } from "./generate.js";

const STORAGE = "aiStream.conversationId";
const $ = (id) => document.getElementById(id);
const NOTES = { partial: "cut short", error: "failed" };

export function setupChat(options) {
  const list = $("messages");
  const form = $("chat-form");
  const input = $("chat-input");
  const send = $("send");
  const stop = $("chat-stop");
  const status = $("chat-status");
  const label = $("conversation-label");

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

  const addMessage = (role, content = "", note = "") => {
    const item = document.createElement("li");
    item.className = `message ${role}`;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    const body = document.createElement("div");
    body.className = "body";
    const text = document.createTextNode(content);
    body.append(text);
    const small = document.createElement("div");
    small.className = "note";
    small.textContent = note;
    item.append(who, body, small);
    list.append(item);
    return { item, text, note: small };
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
        addMessage(m.role, m.content, note.filter(Boolean).join(" · "));
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
    const reply = addMessage("assistant");
    reply.item.classList.add("streaming");
    reply.item.scrollIntoView({ block: "nearest" });
    setStatus("");
    running = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    const request = conversationId ? { message, conversationId } : { message };
    let started = false;
    await chatStream(
      request,
      {
        onMetadata: (e) => {
          started = true;
          remember(e.conversationId);
        },
        onToken: (e) => {
          reply.text.appendData(e.content);
          reply.item.scrollIntoView({ block: "nearest" });
        },
        onDone: (e) => {
          reply.note.textContent = usageNote(e.usage);
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
