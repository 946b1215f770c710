// fedq dashboard: polls the REST API every POLL_MS and redraws each section.
// Only textContent and attributes are set from API data, never HTML, so client ids
// and notes cannot inject markup.
"use strict";

const POLL_MS = 2000;
const SVG_NS = "http://www.w3.org/2000/svg";

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error || `${path}: HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function byId(id) {
  return document.getElementById(id);
}

// Shows `text` in element `id` and keeps the raw value in data-value for scripts and tests.
function setValue(id, value, text) {
  const el = byId(id);
  el.dataset.value = value === null || value === undefined ? "" : String(value);
  el.textContent = text === undefined ? el.dataset.value || "–" : text;
}

function fmt(value, digits) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function pct(value) {
  return value === null || value === undefined ? "–" : `${(value * 100).toFixed(2)}%`;
}

function node(tag, attrs, text) {
  const el = tag.startsWith("svg:")
    ? document.createElementNS(SVG_NS, tag.slice(4))
    : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, value);
  if (text !== undefined) el.textContent = text;
  return el;
}

// ---- sections -------------------------------------------------------------------------

function renderFederation(fed) {
  const badge = byId("fed-status");
  if (fed === null) {
    badge.className = "badge waiting";
    setValue("fed-status", "", "no federation");
    return;
  }
  badge.className = `badge ${fed.status}`;
  setValue("fed-status", fed.status);
  setValue("current-round", fed.current_round);
  setValue("total-rounds", fed.total_rounds);
  byId("model-name").textContent = fed.model;
  byId("dataset").textContent = fed.dataset;
}

function renderRounds(rounds) {
  const body = byId("rounds-body");
  const rows = rounds.slice().reverse().map((r) => {
    const tr = node("tr", { "data-round": r.round, "data-status": r.status });
    const cells = [
      ["round", r.round],
      ["status", r.status],
      ["participants", r.participants.length],
      ["received", r.updates_received],
      ["aggregated", r.updates_aggregated],
      ["accuracy", pct(r.test_accuracy)],
      ["loss", fmt(r.test_loss, 4)],
      ["deadline", r.deadline ? new Date(r.deadline * 1000).toLocaleTimeString() : "–"],
    ];
    for (const [field, text] of cells) {
      const td = node("td", { "data-field": field }, String(text));
      if (field === "status") td.className = `state-${r.status}`;
      tr.appendChild(td);
    }
    return tr;
  });
  if (rows.length === 0) {
    rows.push(node("tr", { class: "empty" }));
    rows[0].appendChild(node("td", { colspan: "8" }, "no rounds yet"));
  }
  body.replaceChildren(...rows);

  const scored = rounds.filter((r) => r.test_accuracy !== null);
  const latest = scored.length ? scored[scored.length - 1] : null;
  setValue("latest-accuracy", latest && latest.test_accuracy, pct(latest && latest.test_accuracy));
  setValue("latest-loss", latest && latest.test_loss, fmt(latest && latest.test_loss, 4));
  byId("latest-accuracy-round").textContent = latest ? `after round ${latest.round}` : "";

  drawChart(byId("accuracy-chart"), seriesOf(rounds, "test_accuracy"), {
    color: "#2b9a5a", yMin: 0, yMax: 1, format: (v) => `${Math.round(v * 100)}%`,
  });
  drawChart(byId("loss-chart"), seriesOf(rounds, "test_loss"), {
    color: "#c93c3c", yMin: 0, format: (v) => v.toFixed(2),
  });
}

function renderModel(model) {
  setValue("model-round", model && model.round);
  byId("model-digest").textContent = model ? `sha256 ${model.digest.slice(0, 16)}…` : "";
}

function renderQueue(queue) {
  setValue("queue-ready", queue.ready);
  setValue("queue-consumers", queue.consumers);
  setValue("queue-backlog", queue.backlog_per_worker, fmt(queue.backlog_per_worker, 1));
  setValue("dead-letters", queue.dead);
  byId("dead-letters").style.color = queue.dead > 0 ? "var(--bad)" : "";
}

function renderPrivacy(data) {
  const box = byId("privacy-bars");
  byId("privacy-delta").textContent = `(δ = ${data.delta})`;
  if (data.clients.length === 0) {
    box.replaceChildren(node("div", { class: "muted" }, "no clients yet"));
    return;
  }
  box.replaceChildren(...data.clients.map((c) => {
    const spent = c.epsilon_spent; // null: trained without DP, ε is infinite
    const share = spent === null ? 1 : Math.min(spent / c.epsilon_budget, 1);
    const fill = node("div", { class: "bar-fill" });
    fill.style.width = `${(share * 100).toFixed(1)}%`;
    if (share >= 1) fill.classList.add("full");
    else if (share >= 0.8) fill.classList.add("high");

    const row = node("div", {
      class: "bar-row",
      "data-client": c.client_id,
      "data-epsilon-spent": spent === null ? "inf" : String(spent),
      "data-epsilon-budget": String(c.epsilon_budget),
    });
    const numbers = `ε ${spent === null ? "∞" : spent.toFixed(2)} / ${c.epsilon_budget.toFixed(2)}`;
    row.append(
      node("div", { class: "name", title: c.client_id }, c.client_id),
      node("div", { class: "bar-track" }),
      node("div", { class: "numbers" }, numbers),
    );
    row.children[1].appendChild(fill);
    return row;
  }));
}

// ---- charts ---------------------------------------------------------------------------

function seriesOf(rounds, field) {
  return rounds.filter((r) => r[field] !== null).map((r) => ({ x: r.round, y: r[field] }));
}

// A line chart of {x, y} points, sized to the SVG's viewBox.
function drawChart(svg, points, opts) {
  const { width: W, height: H } = svg.viewBox.baseVal;
  const left = 48, right = 12, top = 10, bottom = 26;
  svg.replaceChildren();
  if (points.length === 0) {
    svg.appendChild(node("svg:text", { x: W / 2, y: H / 2, "text-anchor": "middle",
      class: "note" }, "no evaluated rounds yet"));
    return;
  }

  const xs = points.map((p) => p.x), ys = points.map((p) => p.y);
  const xMin = Math.min(...xs), xMax = Math.max(Math.max(...xs), xMin + 1);
  const yMin = opts.yMin ?? Math.min(...ys);
  let yMax = opts.yMax ?? Math.max(...ys) * 1.1;
  if (yMax <= yMin) yMax = yMin + 1;
  const sx = (x) => left + ((x - xMin) / (xMax - xMin)) * (W - left - right);
  const sy = (y) => H - bottom - ((y - yMin) / (yMax - yMin)) * (H - top - bottom);

  for (let i = 0; i <= 4; i++) {
    const v = yMin + ((yMax - yMin) * i) / 4, y = sy(v);
    svg.appendChild(node("svg:line", { x1: left, x2: W - right, y1: y, y2: y, class: "grid" }));
    svg.appendChild(node("svg:text", { x: left - 6, y: y + 4, "text-anchor": "end",
      class: "tick" }, opts.format(v)));
  }
  for (const x of xTicks(xMin, xMax)) {
    svg.appendChild(node("svg:text", { x: sx(x), y: H - bottom + 16, "text-anchor": "middle",
      class: "tick" }, String(x)));
  }
  svg.appendChild(node("svg:line", { x1: left, x2: left, y1: top, y2: H - bottom, class: "axis" }));
  svg.appendChild(node("svg:line", { x1: left, x2: W - right, y1: H - bottom, y2: H - bottom,
    class: "axis" }));

  const path = points.map((p) => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(" ");
  svg.appendChild(node("svg:polyline", { points: path, class: "series", stroke: opts.color }));
  for (const p of points) {
    const dot = node("svg:circle", { cx: sx(p.x), cy: sy(p.y), r: 3.5, class: "dot",
      fill: opts.color, "data-round": p.x });
    dot.appendChild(node("svg:title", {}, `round ${p.x}: ${opts.format(p.y)}`));
    svg.appendChild(dot);
  }
}

// Integer round numbers for the x axis, at most about eight of them.
function xTicks(min, max) {
  const step = Math.max(1, Math.ceil((max - min) / 8));
  const ticks = [];
  for (let x = Math.ceil(min); x <= max; x += step) ticks.push(x);
  return ticks;
}

// ---- polling --------------------------------------------------------------------------

async function orNullOn404(promise) {
  try {
    return await promise;
  } catch (error) {
    if (error.status === 404) return null;
    throw error;
  }
}

async function refresh() {
  const tasks = {
    federation: orNullOn404(getJson("/v1/federation")).then(renderFederation),
    rounds: getJson("/v1/rounds").then((d) => renderRounds(d.rounds)),
    model: orNullOn404(getJson("/v1/model")).then(renderModel),
    queue: getJson("/v1/queue").then(renderQueue),
    clients: getJson("/v1/clients").then(renderPrivacy),
  };
  const names = Object.keys(tasks);
  const results = await Promise.allSettled(Object.values(tasks));
  const reasons = names
    .map((name, i) => [name, results[i]])
    .filter(([, result]) => result.status === "rejected")
    .map(([name, result]) => `${name}: ${result.reason.message}`);

  const status = byId("connection");
  status.textContent = reasons.length
    ? `refresh failed (${reasons.join("; ")})`
    : `updated ${new Date().toLocaleTimeString()}`;
  status.style.color = reasons.length ? "var(--bad)" : "";
}

async function loop() {
  await refresh().catch(() => {});
  setTimeout(loop, POLL_MS);
}

loop();
