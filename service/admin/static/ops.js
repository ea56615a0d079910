// The operations view: polls this app's /admin/api/ops while the tab is shown and draws each
// series as a hand-drawn SVG polyline (no charting library, nothing from elsewhere). Every chart
// keeps what it drew in data attributes (data-latest, data-series) for people and tests alike.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 600;
const HEIGHT = 160;
const PAD = 4;
const $ = (id) => document.getElementById(id);

const CHARTS = [
  { id: "streams", title: "Open streams", unit: "", digits: 0, pick: (s) => ({ open: s.streamsActive }) },
  { id: "tokens", title: "Tokens per second", unit: "tokens/s", digits: 1, pick: (s) => ({ tokens: s.tokensPerSecond }) },
  { id: "ttft", title: "Time to first token (last minute)", unit: "s", digits: 3, floor: 0.01, pick: (s) => ({ p50: s.ttftP50, p95: s.ttftP95 }) },
  { id: "outcomes", title: "Streams ended in the last minute, by outcome", unit: "", digits: 0, pick: (s) => s.outcomesLastMinute },
  { id: "limited", title: "Rate-limit refusals in the last minute, by limit", unit: "", digits: 0, pick: (s) => s.rateLimitedLastMinute },
];

function el(name, attrs = {}, text) {
  const node = document.createElement(name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svgEl(name, attrs = {}) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function latest(values) {
  for (let i = values.length - 1; i >= 0; i -= 1) if (values[i] !== null) return values[i];
  return null;
}

const format = (value, chart) => (value === null ? "–" : value.toFixed(chart.digits));

/** Draws `series` ({name: [value|null]}) against times `t` (Unix seconds) over `windowS`. */
function draw(figure, chart, t, series, windowS) {
  const svg = figure.querySelector("svg");
  svg.replaceChildren();
  const names = Object.keys(series);
  const end = t.length ? t[t.length - 1] : 0;
  const start = t.length ? Math.max(t[0], end - windowS) : 0;
  const span = Math.max(end - start, 1e-9);
  let top = chart.floor ?? 1;
  for (const name of names) for (const v of series[name]) if (v !== null && v > top) top = v;
  top *= 1.1;
  const x = (when) => PAD + ((when - start) / span) * (WIDTH - 2 * PAD);
  const y = (v) => HEIGHT - PAD - (v / top) * (HEIGHT - 2 * PAD);
  svg.append(svgEl("line", { x1: PAD, y1: HEIGHT - PAD, x2: WIDTH - PAD, y2: HEIGHT - PAD, class: "axis" }));
  const legend = figure.querySelector(".legend");
  legend.replaceChildren();
  names.forEach((name, index) => {
    let points = [];
    const flush = () => {
      if (points.length) {
        const attrs = { points: points.join(" "), class: `line c${index % 6}` };
        svg.append(svgEl(points.length > 1 ? "polyline" : "circle", points.length > 1 ? attrs : {
          cx: points[0].split(",")[0], cy: points[0].split(",")[1], r: 2, class: `dot c${index % 6}`,
        }));
      }
      points = [];
    };
    series[name].forEach((v, i) => {
      if (v === null || t[i] < start) flush();
      else points.push(`${x(t[i]).toFixed(1)},${y(v).toFixed(1)}`);
    });
    flush();
    const item = el("li", { class: `c${index % 6}`, "data-name": name });
    item.append(el("span", { class: "swatch" }), ` ${name} `, el("b", {}, format(latest(series[name]), chart)));
    legend.append(item);
  });
  const scale = figure.querySelector(".scale");
  scale.textContent = `0 – ${format(top, chart)} ${chart.unit} · last ${Math.round(span)} s`;
  const first = names.length ? latest(series[names[0]]) : null;
  figure.dataset.latest = first === null ? "" : String(first);
  figure.dataset.series = JSON.stringify(series);
  figure.dataset.t = JSON.stringify(t);
  figure.dataset.samples = String(t.length);
  figure.querySelector(".now").textContent =
    names.length ? `${format(first, chart)} ${chart.unit}`.trim() : "none";
}

function renderInstances(list, instances) {
  list.replaceChildren();
  for (const inst of instances) {
    const item = el("li", { class: inst.up ? "up" : "down", "data-up": String(inst.up) });
    item.append(el("b", {}, inst.url), ` ${inst.up ? "up" : "down"}`);
    if (inst.error) item.append(el("span", { class: "hint" }, ` · ${inst.error}`));
    const ready = inst.ready;
    if (ready) {
      item.append(` · ready: `, el("b", { class: "ready" }, ready.status));
      const parts = [];
      for (const [name, word] of Object.entries(ready.checks ?? {})) parts.push(`${name}: ${word}`);
      for (const [name, word] of Object.entries(ready.upstreams ?? {})) {
        parts.push(`${name}: ${typeof word === "string" ? word : JSON.stringify(word)}`);
      }
      if (parts.length) item.append(el("span", { class: "hint" }, ` (${parts.join("; ")})`));
    } else if (inst.up) {
      item.append(el("span", { class: "hint" }, " · readiness unknown"));
    }
    list.append(item);
  }
}

export function setupOps(options) {
  const panel = $("panel-ops");
  const status = $("ops-status");
  const holder = $("ops-charts");
  const figures = {};
  for (const chart of CHARTS) {
    const figure = el("figure", { class: "chart", id: `chart-${chart.id}` });
    const caption = el("figcaption", {}, `${chart.title} `);
    caption.append(el("b", { class: "now" }, "–"));
    const svg = svgEl("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", "aria-label": chart.title });
    figure.append(caption, svg, el("p", { class: "scale hint" }), el("ul", { class: "legend" }));
    holder.append(figure);
    figures[chart.id] = figure;
  }
  let timer = null;
  let running = false;

  async function tick() {
    timer = null;
    if (panel.hidden) return;
    running = true;
    let delayS = 1;
    try {
      const headers = {};
      const key = options().apiKey;
      if (key) headers.Authorization = `Bearer ${key}`;
      const response = await fetch(new URL("admin/api/ops", document.baseURI), { headers, cache: "no-store" });
      if (response.status === 401) {
        status.textContent = "This view needs the API key (set it under “API key” above).";
        status.className = "status error";
        $("settings").open = true;
      } else if (!response.ok) {
        throw new Error(`HTTP ${response.status}`);
      } else {
        const body = await response.json();
        delayS = Math.max(0.25, body.intervalS);
        const { series } = body;
        for (const chart of CHARTS) draw(figures[chart.id], chart, series.t, chart.pick(series), body.windowS);
        renderInstances($("ops-instances"), body.instances);
        const down = body.instances.filter((i) => !i.up).length;
        status.textContent =
          `${body.instances.length} instance(s), ${down} down · a sample every ${body.intervalS} s`;
        status.className = down ? "status error" : "status";
        panel.dataset.updates = String(Number(panel.dataset.updates ?? 0) + 1);
      }
    } catch (err) {
      status.textContent = `Could not read the operations data: ${err.message}`;
      status.className = "status error";
    } finally {
      running = false;
    }
    if (!panel.hidden) timer = setTimeout(tick, delayS * 1000);
  }

  return {
    shown() {
      if (timer === null && !running) tick();
    },
  };
}
