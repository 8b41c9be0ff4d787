// ccmon's web dashboard: polls GET /api/dashboard and shows what it answers. Every name in it came from
// telemetry (users, projects, models, sessions) and is anyone's text: it is set as text (textContent, an option's
// value), never as HTML. The server formats every figure (the monitor's own formatting); this file formats none.
"use strict";

const POLL_MS = 5000;
const SVG = "http://www.w3.org/2000/svg";
const filters = {period: "", user: "", project: "", agent: ""};
let timer = null;
let lastUpdate = "";

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function svgElement(tag, attributes) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  return node;
}

function byId(id) {
  return document.getElementById(id);
}

// A table's columns: [title, cell(row) -> text, class] (num: right-aligned; opt: left out on narrow screens).
const dash = "–";
const windowCells = (reading) => reading ? `${reading.window.text.percent}, resets ${reading.window.text.resets}` : dash;
const TABLES = {
  limits: [["User", (l) => l.user || "(unknown)", ""], ["Of", (l) => l.of, ""],
           ["5-hour", (l) => windowCells(l.five_hour), "num"],
           ["read", (l) => l.five_hour ? l.five_hour.text.age : dash, "num opt"],
           ["Week", (l) => windowCells(l.seven_day), "num"],
           ["read", (l) => l.seven_day ? l.seven_day.text.age : dash, "num opt"]],
  users: [["User", (u) => u.text.name, ""], ["Sessions", (u) => String(u.sessions), "num opt"],
          ["Requests", (u) => u.split.total.text.requests, "num"], ["Tokens", (u) => u.split.total.text.tokens, "num"],
          ["Premium", (u) => u.split.premium.text.limited, "num opt"], ["Cost", (u) => u.split.total.text.cost, "num"],
          ["5h", (u) => u.five_hour ? u.five_hour.text.percent : dash, "num opt"],
          ["Week", (u) => u.seven_day ? u.seven_day.text.percent : dash, "num opt"]],
  models: [["Model", (m) => m.model, ""], ["Agent", (m) => m.agent, "opt"],
           ["Requests", (m) => m.usage.text.requests, "num"],
           ["Input", (m) => m.usage.text.input, "num opt"], ["Output", (m) => m.usage.text.output, "num opt"],
           ["Cache", (m) => m.usage.text.cache, "num opt"], ["Tokens", (m) => m.usage.text.tokens, "num"],
           ["Cost", (m) => m.usage.text.cost, "num"]],
  agents: [["Agent", (a) => a.agent, ""], ["Models", (a) => String(a.models), "num opt"],
           ["Requests", (a) => a.usage.text.requests, "num"], ["Input", (a) => a.usage.text.input, "num opt"],
           ["Output", (a) => a.usage.text.output, "num opt"], ["Cache", (a) => a.usage.text.cache, "num opt"],
           ["Tokens", (a) => a.usage.text.tokens, "num"], ["Cost", (a) => a.usage.text.cost, "num"]],
  projects: [["Project", (p) => p.text.name, ""], ["Sessions", (p) => String(p.sessions), "num opt"],
             ["Requests", (p) => p.split.total.text.requests, "num"], ["Tokens", (p) => p.split.total.text.tokens, "num"],
             ["Cost", (p) => p.split.total.text.cost, "num"]],
  requests: [["Time", (r) => r.text.time, ""], ["Model", (r) => r.model, ""],
             ["Agent", (r) => r.agent || "claude-code", "opt"],
             ["Input", (r) => r.usage.text.input, "num opt"], ["Output", (r) => r.usage.text.output, "num opt"],
             ["Cache", (r) => r.usage.text.cache, "num opt"], ["Tokens", (r) => r.usage.text.tokens, "num"],
             ["Cost", (r) => r.usage.text.cost, "num"], ["Duration", (r) => r.usage.text.duration, "num opt"],
             ["Session", (r) => r.session_id, "opt"]],
  sessions: [["Last", (s) => s.text.last, ""], ["User", (s) => s.user || "(unknown)", ""],
             ["Project", (s) => s.project || "(no project)", "opt"],
             ["Requests", (s) => s.split.total.text.requests, "num"], ["Cost", (s) => s.split.total.text.cost, "num"],
             ["Models", (s) => s.models.join(" "), "opt"], ["Agent", (s) => s.agent || "claude-code", "opt"],
             ["Session", (s) => s.session_id, "opt"]],
};

function fillTable(id, rows, empty) {
  const columns = TABLES[id];
  const table = byId(id);
  const head = element("thead");
  const headRow = element("tr");
  for (const [title, , className] of columns) headRow.append(element("th", title, className));
  head.append(headRow);
  const body = element("tbody");
  for (const row of rows) {
    const line = element("tr");
    for (const [, cell, className] of columns) line.append(element("td", cell(row), className));
    body.append(line);
  }
  if (!rows.length) {
    const line = element("tr");
    const cell = element("td", empty, "empty");
    cell.colSpan = columns.length;
    line.append(cell);
    body.append(line);
  }
  table.replaceChildren(head, body);
}

function fillCard(name, split, label) {
  byId(`${name}-cost`).textContent = split.total.text.cost;
  byId(`${name}-detail`).textContent = `${split.total.text.requests} requests, ${split.total.text.tokens} tokens`;
  if (label) byId(`${name}-name`).textContent = label;
}

// Cost per day as SVG bars, oldest day on the left; each bar's title says its day and cost. The drawing is as wide
// as its box, in CSS pixels, so that its text keeps its size on a phone and on a wide screen.
function drawChart(days) {
  const width = Math.max(280, byId("chart").clientWidth), height = 170, left = 8, right = 8, top = 22, bottom = 22;
  const step = (width - left - right) / Math.max(days.length, 1);
  const most = days.reduce((best, day) => day.split.total.cost_nanos > best.split.total.cost_nanos ? day : best,
                           days[0]);
  const max = most ? most.split.total.cost_nanos : 0;
  const svg = svgElement("svg", {viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "cost per day"});
  const plot = height - top - bottom;
  svg.append(svgElement("line", {x1: left, x2: width - right, y1: top + plot, y2: top + plot, class: "axis"}));
  if (max > 0) {
    svg.append(svgElement("line", {x1: left, x2: width - right, y1: top, y2: top, class: "grid"}));
    const label = svgElement("text", {x: left, y: top - 6, class: "label"});
    label.textContent = `${most.split.total.text.cost} on ${most.date}`;
    svg.append(label);
  }
  days.forEach((day, index) => {
    const cost = day.split.total.cost_nanos;
    const barHeight = max > 0 ? Math.max(cost > 0 ? 1 : 0, plot * cost / max) : 0;
    const bar = svgElement("rect", {x: left + index * step + step * 0.15, y: top + plot - barHeight,
                                    width: step * 0.7, height: barHeight, class: "bar"});
    const title = svgElement("title", {});
    title.textContent = `${day.date}: ${day.split.total.text.cost}, ${day.split.total.text.requests} requests`;
    bar.append(title);
    svg.append(bar);
    if ((days.length - 1 - index) % 7 === 0) {  // today, and a week apart before it
      const tick = svgElement("text", {x: left + index * step + step / 2, y: height - 6, class: "tick"});
      tick.textContent = day.date.slice(5);
      svg.append(tick);
    }
  });
  byId("chart").replaceChildren(svg);
}

// A filter's choices: everyone (""), the names the period has, and the one chosen even when it has none.
function fillSelect(id, names, labels, chosen) {
  const select = byId(id);
  const first = select.options[0];
  const options = [first];
  const seen = new Set();
  for (const [index, name] of names.entries()) {
    if (!name || seen.has(name)) continue;
    seen.add(name);
    const option = element("option", labels[index]);
    option.value = name;
    options.push(option);
  }
  if (chosen && !seen.has(chosen)) {
    const option = element("option", chosen);
    option.value = chosen;
    options.push(option);
  }
  select.replaceChildren(...options);
  select.value = chosen || "";
}

function render(data) {
  if (!byId("period").options.length) {
    for (const period of data.periods) {
      const option = element("option", period.name);
      option.value = period.key;
      byId("period").append(option);
    }
  }
  byId("period").value = data.period.key;
  fillSelect("user", data.users.map((u) => u.user), data.users.map((u) => u.text.name), data.user);
  fillSelect("project", data.projects.map((p) => p.project), data.projects.map((p) => p.text.name), data.project);
  fillSelect("agent", data.agent_names, data.agent_names, data.agent);  // every agent ccmon knows, used or not
  fillCard("today", data.today);
  fillCard("week", data.week);
  fillCard("month", data.month);
  fillCard("period", data.period_usage, data.period.name.charAt(0).toUpperCase() + data.period.name.slice(1));
  fillTable("limits", data.limits, "no live reading of Claude's limits (ccmon statusline) nor of Codex's (its rollouts)");
  drawChart(data.days);
  fillTable("users", data.users, "no usage in this period");
  fillTable("models", data.models, "no usage in this period");
  fillTable("agents", data.agents, "no usage in this period");
  fillTable("projects", data.projects, "no usage in this period");
  byId("requests-count").textContent = `${data.requests.length} of ${data.period_usage.total.text.requests}`;
  fillTable("requests", data.requests, "no requests in this period");
  fillTable("sessions", data.sessions, "no sessions in this period");
  byId("version").textContent = `ccmon ${data.version}, ${data.stored_requests} requests stored, times in ${data.timezone}`;
  byId("sign-out").hidden = !data.sign_out;
}

function query() {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(filters)) if (value) params.set(name, value);
  return params;
}

function setStatus(text, state) {
  const status = byId("status");
  status.textContent = text;
  status.className = `status ${state}`;
  document.body.classList.toggle("stale", state === "bad");
}

async function poll() {
  clearTimeout(timer);
  if (document.hidden) return;  // polled again when shown
  const params = query();
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
  if (zone) params.set("tz", zone);
  try {
    const response = await fetch(`/api/dashboard?${params}`, {cache: "no-store", credentials: "same-origin"});
    if (response.status === 401) {  // signed out meanwhile: the page asks for the token again
      window.location.assign("/");
      return;
    }
    const since = lastUpdate ? `; the figures are from ${lastUpdate}` : "";
    let data;
    try {
      data = await response.json();
    } catch (error) {
      data = {error: `HTTP ${response.status}`};
    }
    if (!response.ok) {
      setStatus(`the server cannot answer (${data.error}): retrying every ${POLL_MS / 1000} s${since}`, "bad");
      return;
    }
    render(data);
    lastUpdate = new Date().toLocaleTimeString();
    if (data.history) {  // the local server's first reading of the transcripts: the figures grow till it is done
      setStatus(`updated ${lastUpdate}; reading history: ${data.history.text}, the figures are partial until it is ` +
                "done", "good");
    } else {
      setStatus(data.stored_requests ? `updated ${lastUpdate}` : `updated ${lastUpdate}: no Claude Code request ` +
                "has reached this server yet (point Claude Code's telemetry at it: see ccmon's README)", "good");
    }
  } catch (error) {  // no answer at all
    const since = lastUpdate ? `; the figures are from ${lastUpdate}` : "";
    setStatus(`server unreachable: retrying every ${POLL_MS / 1000} s${since}`, "bad");
  } finally {
    timer = setTimeout(poll, POLL_MS);
  }
}

function start() {
  if (document.body.dataset.view !== "dashboard") return;  // the sign-in page: nothing to poll
  const given = new URLSearchParams(window.location.search);
  for (const name of Object.keys(filters)) filters[name] = given.get(name) || "";
  for (const name of Object.keys(filters)) {
    byId(name).addEventListener("change", (event) => {
      filters[name] = event.target.value;
      window.history.replaceState(null, "", `?${query()}`);
      poll();
    });
  }
  document.addEventListener("visibilitychange", poll);
  poll();
}

document.addEventListener("DOMContentLoaded", start);
