// The admin page: loads config.json, keeps the API key, switches tabs, starts both views.
import { setupChat } from "./chat.js";
import { setupGenerate } from "./generate.js";
import { setupOps } from "./ops.js";

const KEY_STORAGE = "aiStream.apiKey";
const $ = (id) => document.getElementById(id);

/** Where API calls go (see ADMIN_API_BASE in the README). "" means this page's own origin. */
export function resolveApiBase(config, where = location) {
  if (config.apiBase !== null && config.apiBase !== undefined) return config.apiBase;
  if (where.port === String(config.adminPort)) {
    return `${where.protocol}//${where.hostname}:${config.apiPort}`;
  }
  return ""; // opened through a proxy that fronts both: same origin
}

function setupApiKey(config, apiBase) {
  const input = $("api-key");
  input.value = localStorage.getItem(KEY_STORAGE) ?? "";
  input.addEventListener("input", () => {
    const key = input.value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  });
  $("api-base").textContent =
    `API: ${apiBase || `${location.origin} (this origin)`}` +
    (config.authRequired ? " · this API needs a key" : " · no key needed");
  if (config.authRequired && !input.value) $("settings").open = true;
  return () => localStorage.getItem(KEY_STORAGE) || undefined;
}

function setupTabs(views) {
  const show = () => {
    const name = { "#chat": "chat", "#ops": "ops" }[location.hash] ?? "generate";
    for (const other of ["generate", "chat", "ops"]) {
      const active = other === name;
      $(`panel-${other}`).hidden = !active;
      $(`tab-${other}`).setAttribute("aria-selected", String(active));
    }
    views[name]?.shown?.();
  };
  window.addEventListener("hashchange", show);
  show();
}

async function main() {
  let config;
  try {
    const response = await fetch(new URL("config.json", document.baseURI), { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    config = await response.json();
  } catch (err) {
    const note = $("config-error");
    note.hidden = false;
    note.textContent = `Could not load the page's settings (config.json): ${err.message}`;
    return;
  }
  const apiBase = resolveApiBase(config);
  const apiKey = setupApiKey(config, apiBase);
  const options = () => ({ baseUrl: apiBase, apiKey: apiKey() });
  const views = {
    generate: setupGenerate(config, options),
    chat: setupChat(config, options),
    ops: setupOps(options),
  };
  setupTabs(views);
  document.body.dataset.ready = "true";
}

main();
