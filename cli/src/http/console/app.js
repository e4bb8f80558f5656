// keel's watchdog console: reads the API under /api/v1, re-reads it on every server-sent
// event, and posts what an operator asks for. No framework and no build step. Every text that
// comes from the API enters the page through textContent (the `el` helper), never as markup.
"use strict";

const API = "/api/v1";
const TOKEN_KEY = "keel.token";
/** How often the page re-reads while the event stream is down. */
const POLL_MS = 5000;
/** Events come in bursts (a run finishing grants the next lease): one re-read per burst. */
const DEBOUNCE_MS = 250;
/** Queued work waiting longer than this counts as a stuck queue in the KPI tile. */
const RUNS_SHOWN = 30;
const RESOLVED_SHOWN = 20;
const NOT_AVAILABLE = "Not available in this daemon.";

/** What the API answered, by resource; `missing` holds those this daemon does not serve. */
const state = {
  data: {},
  missing: new Set(),
  skewMs: 0,
  selectedRun: null,
  detail: null,
  mode: "connecting",
  updatedAt: null,
  lastEvent: null,
  failure: null,
};

const READS = {
  jobs: "/jobs",
  runs: "/runs?limit=" + RUNS_SHOWN,
  queue: "/queue",
  incidents: "/incidents",
  rules: "/rules",
  workers: "/workers",
  status: "/status",
};

// ----- the API --------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function headers(extra) {
  const all = Object.assign({ Accept: "application/json" }, extra);
  const secret = token();
  if (secret) all.Authorization = "Bearer " + secret;
  return all;
}

/** One call; the parsed JSON body (null for 204), or an ApiError with the API's message. */
async function api(path, method, body) {
  const init = { method: method || "GET", headers: headers() };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(API + path, init);
  if (response.status === 401) {
    askForToken();
    throw new ApiError(401, "unauthorized", "a token is needed");
  }
  if (response.status === 204) return null;
  let answer = null;
  try {
    answer = await response.json();
  } catch (_) {
    answer = null;
  }
  if (!response.ok) {
    const error = (answer && answer.error) || {};
    throw new ApiError(response.status, error.code || "http", error.message || response.statusText);
  }
  return answer;
}

function path(...parts) {
  return parts.map((p, i) => (i % 2 ? encodeURIComponent(p) : p)).join("");
}

// ----- reading ------------------------------------------------------------------------------

async function refresh() {
  const names = Object.keys(READS);
  const results = await Promise.allSettled(names.map((name) => api(READS[name])));
  state.failure = null;
  results.forEach((result, i) => {
    const name = names[i];
    if (result.status === "fulfilled") {
      state.data[name] = result.value;
      state.missing.delete(name);
    } else if (result.reason.status === 404) {
      // A resource this daemon does not serve (yet): its panel says so.
      state.data[name] = null;
      state.missing.add(name);
    } else {
      state.failure = result.reason;
    }
  });
  const queue = state.data.queue;
  if (queue && typeof queue.at_ms === "number") state.skewMs = queue.at_ms - Date.now();
  if (state.selectedRun) await loadRun(state.selectedRun);
  if (!state.failure) state.updatedAt = new Date();
  render();
}

let pending = null;
let reading = false;
let readAgain = false;

/** Re-reads soon, once for a burst of calls. */
function soon() {
  clearTimeout(pending);
  pending = setTimeout(reread, DEBOUNCE_MS);
}

/** Re-reads now, or right after the read in progress. */
async function reread() {
  if (reading) {
    readAgain = true;
    return;
  }
  reading = true;
  try {
    await refresh();
  } catch (e) {
    state.failure = e;
    showStatus();
  } finally {
    reading = false;
    if (readAgain) {
      readAgain = false;
      soon();
    }
  }
}

async function loadRun(run) {
  const [shown, logs] = await Promise.allSettled([
    api(path("/runs/", run)),
    api(path("/runs/", run, "/logs")),
  ]);
  if (shown.status === "rejected") {
    state.detail = { run, error: shown.reason.message };
    return;
  }
  state.detail = {
    run,
    view: shown.value.run,
    audit: shown.value.audit || [],
    logs: logs.status === "fulfilled" ? logs.value : null,
    logsNote: logs.status === "rejected" ? logs.reason.message : null,
  };
}

// ----- live updates -------------------------------------------------------------------------
//
// The page reads the event stream with fetch rather than EventSource: EventSource cannot send
// the Authorization header a token needs, and it only delivers the event names a page listens
// for by name, so an event kind added to the daemon later would pass unseen. While the stream
// is down the page polls every POLL_MS and retries the stream with a growing delay.

let stream = null;

function startLive() {
  if (stream) stream.abort();
  stream = new AbortController();
  follow(stream.signal);
}

async function follow(signal) {
  let delayMs = 1000;
  while (!signal.aborted) {
    try {
      await readEvents(signal);
      delayMs = 1000;
    } catch (e) {
      if (signal.aborted || e.status === 401) return;
    }
    setMode("polling every " + POLL_MS / 1000 + " s (event stream down)");
    await new Promise((resolve) => setTimeout(resolve, delayMs));
    delayMs = Math.min(delayMs * 2, 30000);
  }
}

async function readEvents(signal) {
  const response = await fetch(API + "/events", {
    headers: headers({ Accept: "text/event-stream" }),
    signal,
  });
  if (response.status === 401) {
    askForToken();
    throw new ApiError(401, "unauthorized", "a token is needed");
  }
  if (!response.ok || !response.body) {
    throw new ApiError(response.status, "http", "the event stream answered " + response.status);
  }
  setMode("live");
  soon(); // whatever happened while the stream was down
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      onEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
    }
  }
}

/** One server-sent event block: `event: NAME` and `data: JSON` lines (`:` lines keep alive). */
function onEvent(block) {
  let name = "message";
  let data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  if (!data) return;
  try {
    const body = JSON.parse(data);
    state.lastEvent = body.line || name;
  } catch (_) {
    state.lastEvent = name;
  }
  soon();
}

setInterval(() => {
  const waitingForToken = !document.getElementById("token-form").hidden;
  if (state.mode !== "live" && !waitingForToken) reread();
}, POLL_MS);

function setMode(mode) {
  state.mode = mode;
  showStatus();
}

// ----- the token ------------------------------------------------------------------------------

function askForToken() {
  const form = document.getElementById("token-form");
  if (!form.hidden) return;
  if (token()) {
    sessionStorage.removeItem(TOKEN_KEY);
    notice("The daemon refused that token; enter another.", true);
  }
  if (stream) stream.abort();
  form.hidden = false;
  setMode("waiting for a token");
  document.getElementById("token-input").focus();
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("token-input");
  const secret = input.value.trim();
  if (!secret) return;
  sessionStorage.setItem(TOKEN_KEY, secret);
  input.value = "";
  event.target.hidden = true;
  notice("");
  startLive();
  reread();
});

// ----- operator actions -------------------------------------------------------------------

async function act(label, method, target, body) {
  try {
    await api(target, method, body);
    notice(label + ": done.");
  } catch (e) {
    const missing = e.status === 404 && /no such resource/.test(e.message);
    notice(label + " failed: " + (missing ? NOT_AVAILABLE : e.message), true);
  }
  await reread();
}

/** Asks for a reason in a dialog; null if the operator cancels. */
function askReason(title) {
  const dialog = document.getElementById("reason-dialog");
  const input = document.getElementById("reason-input");
  document.getElementById("reason-title").textContent = title;
  input.value = "";
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => resolve(dialog.returnValue === "ok" ? input.value.trim() : null),
      { once: true },
    );
    dialog.showModal();
    input.focus();
  });
}

document.getElementById("reason-cancel").addEventListener("click", () => {
  document.getElementById("reason-dialog").close("");
});

async function withReason(title, run) {
  const reason = await askReason(title);
  if (reason) await run(reason);
}

// ----- building the page ----------------------------------------------------------------------

/** An element with attributes and children; strings become text nodes, never markup. */
function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "onclick") node.addEventListener("click", value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function button(text, label, onclick) {
  return el("button", { type: "button", "aria-label": label, onclick }, text);
}

/** A table whose rows stack on a phone (each cell shows its column's name). */
function table(caption, columns, rows, rowAttributes) {
  const head = el("tr", null, columns.map((c) => el("th", { scope: "col" }, c.label)));
  const body = rows.map((row) =>
    el(
      "tr",
      rowAttributes ? rowAttributes(row) : null,
      columns.map((c) =>
        el("td", { "data-label": c.label, "data-field": c.field || null }, c.cell(row)),
      ),
    ),
  );
  return el(
    "div",
    { class: "scroll" },
    el("table", null, el("caption", null, caption), el("thead", null, head), el("tbody", null, body)),
  );
}

function fill(id, ...nodes) {
  document.getElementById(id).replaceChildren(...nodes);
}

function note(text) {
  return el("p", { class: "empty" }, text);
}

/** Any JSON value as short text. */
function show(value) {
  if (value === null || value === undefined || value === "") return "–";
  if (Array.isArray(value)) return value.length ? value.map(show).join(", ") : "–";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function count(n, noun) {
  return n + " " + noun + (n === 1 ? "" : "s");
}

function duration(ms) {
  const s = Math.round(ms / 1000);
  if (s < 120) return s + " s";
  if (s < 7200) return Math.round(s / 60) + " min";
  if (s < 172800) return Math.round(s / 3600) + " h";
  return Math.round(s / 86400) + " d";
}

/** A time from the API (`x` and `x_ms`), relative to the daemon's clock, exact on hover. */
function when(ms, text) {
  if (ms === null || ms === undefined) return "–";
  return el("time", { datetime: text || null, title: text || null, "data-ms": ms }, relative(ms));
}

function relative(ms) {
  const diff = ms - (Date.now() + state.skewMs);
  return diff >= 0 ? "in " + duration(diff) : duration(-diff) + " ago";
}

// A quiet daemon sends no events: the relative times are kept true in place, without a redraw.
setInterval(() => {
  for (const node of document.querySelectorAll("time[data-ms]")) {
    node.textContent = relative(Number(node.dataset.ms));
  }
}, POLL_MS);

function schedule(job) {
  const s = job.schedule || {};
  if (s.kind === "every") return "every " + duration(s.interval_ms);
  if (s.kind === "cron") return s.expr + (s.zone ? " (" + s.zone + ")" : "");
  if (s.kind === "once") return "once, " + show(s.at);
  return show(s);
}

function badge(text) {
  return el("span", { class: "badge badge-" + String(text).replace(/[^a-z_]/g, "") }, text);
}

// ----- the panels ---------------------------------------------------------------------------

/** Redraws every panel; the button that had the keyboard's focus gets it back. */
function render() {
  const focused = document.activeElement && document.activeElement.getAttribute("aria-label");
  renderAll();
  if (focused) {
    const again = Array.from(document.querySelectorAll("main button")).find(
      (b) => b.getAttribute("aria-label") === focused,
    );
    if (again && again !== document.activeElement) again.focus();
  }
}

function renderAll() {
  renderKpis();
  renderIncidents();
  renderRules();
  renderJobs();
  renderQueue();
  renderRuns();
  renderRunDetail();
  renderWorkers();
  renderLeader();
  showStatus();
}

/**
 * Who leads a store that daemons on several hosts share (Postgres): the holder, its term and
 * since when, relative and absolute. Hidden on a store with one daemon (fs, sled), whose status
 * has no leader.
 */
function renderLeader() {
  const node = document.getElementById("leader");
  const leader = state.data.status && state.data.status.leader;
  if (!leader) {
    node.hidden = true;
    node.replaceChildren();
    return;
  }
  node.hidden = false;
  if (!leader.holder) {
    node.replaceChildren("Leader: none (no daemon holds the lease)");
    return;
  }
  const since = typeof leader.since_ms === "number" ? leader.since_ms : Date.parse(leader.since);
  node.replaceChildren(
    "Leader: ",
    el("strong", { "data-holder": leader.holder }, leader.holder),
    " (term " + show(leader.term) + ")",
    leader.leading ? ", this daemon" : "",
    ", since ",
    when(since, leader.since),
    " (" + show(leader.since) + ")",
  );
}

function openIncidents() {
  return (state.data.incidents || []).filter((i) => i.open);
}

function renderKpis() {
  const kinds = (state.data.queue && state.data.queue.kinds) || null;
  const incidents = state.data.incidents;
  const jobs = state.data.jobs;
  const open = openIncidents();
  const failing = new Set();
  for (const job of jobs || []) if (job.failures_in_a_row > 0) failing.add(job.name);
  for (const i of open) if (i.kind === "failing_job" && i.job) failing.add(i.job);
  const values = {
    "kpi-incidents": incidents ? open.length : null,
    "kpi-leases": kinds ? kinds.reduce((n, k) => n + k.lease_expired, 0) : null,
    "kpi-stuck": kinds
      ? kinds.filter((k) => k.stuck > 0 || k.unclaimed_incident != null).length
      : null,
    "kpi-artifacts": incidents ? open.filter((i) => i.kind === "artifact_gate").length : null,
    "kpi-failing": jobs ? failing.size : null,
  };
  for (const [id, value] of Object.entries(values)) {
    const node = document.getElementById(id);
    node.textContent = value === null ? "–" : String(value);
    node.parentElement.classList.toggle("bad", value > 0);
  }
}

function renderIncidents() {
  if (state.missing.has("incidents")) return fill("incidents", note(NOT_AVAILABLE));
  if (!state.data.incidents) return fill("incidents", note("Loading…"));
  const all = state.data.incidents;
  const open = all.filter((i) => i.open);
  const resolved = all.filter((i) => !i.open).slice(0, RESOLVED_SHOWN);
  if (!all.length) return fill("incidents", note("No incidents: the watchdog has nothing to report."));
  const columns = [
    { label: "incident", field: "id", cell: (i) => "#" + i.id },
    { label: "kind", field: "kind", cell: (i) => badge(i.kind) },
    {
      label: "state",
      field: "state",
      cell: (i) => (!i.open ? "resolved" : i.acknowledged_at ? "acknowledged" : "open"),
    },
    { label: "job", field: "job", cell: (i) => show(i.job) },
    { label: "run", field: "run", cell: (i) => (i.run ? runButton(i.run) : "–") },
    { label: "worker", field: "worker", cell: (i) => show(i.worker) },
    { label: "opened", field: "opened", cell: (i) => when(i.opened_at_ms, i.opened_at) },
    { label: "evidence", field: "details", cell: (i) => el("div", { class: "evidence" }, show(i.details)) },
    { label: "actions", field: "actions", cell: incidentActions },
  ];
  fill(
    "incidents",
    table(
      open.length + " open, newest first" + (resolved.length ? "; then the last resolved" : ""),
      columns,
      open.concat(resolved),
      (i) => ({ "data-incident": i.id, class: i.open ? "open" : "resolved" }),
    ),
  );
}

function incidentActions(i) {
  if (!i.open) return "–";
  const id = String(i.id);
  const buttons = [];
  if (!i.acknowledged_at) {
    buttons.push(
      button("Acknowledge", "Acknowledge incident " + id, () =>
        withReason("Acknowledge incident #" + id, (reason) =>
          act("Acknowledge #" + id, "POST", path("/incidents/", id, "/acknowledge"), { reason }),
        ),
      ),
    );
  }
  buttons.push(
    button("Resolve", "Resolve incident " + id, () =>
      withReason("Resolve incident #" + id, (reason) =>
        act("Resolve #" + id, "POST", path("/incidents/", id, "/resolve"), { reason }),
      ),
    ),
  );
  const runs = (state.data.runs && state.data.runs.runs) || [];
  const held = runs.some((r) => r.run === i.run && r.lease);
  if (i.run && held) {
    for (const [text, action] of [
      ["Release lease", "release"],
      ["Reclaim lease", "reclaim"],
    ]) {
      buttons.push(
        button(text, text + " of " + i.run, () =>
          withReason(text + " of " + i.run, (reason) =>
            act(text + " of " + i.run, "PATCH", path("/runs/", i.run, "/lease"), {
              action,
              reason,
            }),
          ),
        ),
      );
    }
  }
  return el("div", { class: "actions" }, buttons);
}

function renderRules() {
  if (state.missing.has("rules")) return fill("rules", note(NOT_AVAILABLE));
  const rules = state.data.rules;
  if (!rules) return fill("rules", note("Loading…"));
  const incidents = state.data.incidents || [];
  const latest = (rule) =>
    incidents
      .filter((i) => (rule.incident_kinds || [rule.rule]).includes(i.kind))
      .sort((a, b) => b.opened_at_ms - a.opened_at_ms)[0];
  const columns = [
    { label: "rule", field: "rule", cell: (r) => badge(r.rule) },
    { label: "signal", field: "signal", cell: (r) => show(r.signal) },
    { label: "threshold", field: "threshold", cell: (r) => show(r.threshold) },
    { label: "action", field: "action", cell: (r) => show(r.action) },
    { label: "escalation", field: "escalation", cell: (r) => show(r.escalation) },
    { label: "pass evidence", field: "evidence", cell: (r) => show(r.evidence) },
    {
      label: "last firing",
      field: "last",
      cell: (r) => {
        const i = latest(r);
        if (!i) return "none yet";
        return el(
          "div",
          { class: "evidence" },
          "#" + i.id + " ",
          when(i.opened_at_ms, i.opened_at),
          ": " + show(i.details),
        );
      },
    },
  ];
  fill("rules", table("The rules in force, with this daemon's thresholds", columns, rules, (r) => ({ "data-rule": r.rule })));
}

function renderJobs() {
  if (state.missing.has("jobs")) return fill("jobs", note(NOT_AVAILABLE));
  const jobs = state.data.jobs;
  if (!jobs) return fill("jobs", note("Loading…"));
  if (!jobs.length) return fill("jobs", note("No jobs yet (keel job add, or POST /api/v1/jobs)."));
  const columns = [
    { label: "job", field: "name", cell: (j) => j.name },
    { label: "schedule", field: "schedule", cell: schedule },
    {
      label: "state",
      field: "state",
      cell: (j) => [badge(j.state), j.disabled_reason ? " " + j.disabled_reason : null],
    },
    { label: "next", field: "next", cell: (j) => when(j.next_ms, j.next) },
    {
      label: "last run",
      field: "last",
      cell: (j) => (j.last_run ? [runButton(j.last_run.run), " ", badge(j.last_run.state)] : "–"),
    },
    { label: "failures in a row", field: "failures", cell: (j) => String(j.failures_in_a_row) },
    { label: "actions", field: "actions", cell: jobActions },
  ];
  fill("jobs", table(count(jobs.length, "job"), columns, jobs, (j) => ({ "data-job": j.name })));
}

function jobActions(job) {
  const name = job.name;
  const on = (verb) => () => act(verb + " " + name, "POST", path("/jobs/", name, "/" + verb.toLowerCase()));
  const buttons = [];
  if (job.state === "paused") buttons.push(button("Resume", "Resume job " + name, on("Resume")));
  else if (job.state === "scheduled") buttons.push(button("Pause", "Pause job " + name, on("Pause")));
  buttons.push(button("Trigger", "Trigger job " + name + " now", on("Trigger")));
  return el("div", { class: "actions" }, buttons);
}

function renderQueue() {
  if (state.missing.has("queue")) return fill("queue", note(NOT_AVAILABLE));
  const queue = state.data.queue;
  if (!queue) return fill("queue", note("Loading…"));
  if (!queue.kinds.length) return fill("queue", note("No work queued or running."));
  const columns = [
    { label: "kind", field: "kind", cell: (k) => [k.kind, k.external ? " (external)" : null] },
    { label: "queued", field: "queued", cell: (k) => String(k.queued) },
    { label: "oldest wait", field: "wait", cell: (k) => (k.oldest_wait_ms === null ? "–" : duration(k.oldest_wait_ms)) },
    { label: "backing off", field: "backing_off", cell: (k) => String(k.backing_off) },
    { label: "running", field: "running", cell: (k) => String(k.running) },
    { label: "past their lease", field: "lease_expired", cell: (k) => String(k.lease_expired) },
    { label: "stuck", field: "stuck", cell: (k) => String(k.stuck) },
    { label: "lease holders", field: "holders", cell: (k) => show(k.holders) },
  ];
  const attributes = (k) => ({
    "data-kind": k.kind,
    class: k.stuck > 0 || k.lease_expired > 0 ? "warn" : null,
  });
  fill("queue", table("Work per kind, as the scheduler holds it now", columns, queue.kinds, attributes));
}

function runButton(run) {
  return el(
    "button",
    {
      type: "button",
      class: "link",
      "aria-label": "Show " + run + ": audit trail and output",
      onclick: () => selectRun(run),
    },
    run,
  );
}

async function selectRun(run) {
  state.selectedRun = run;
  await loadRun(run);
  renderRunDetail();
  document.getElementById("run-detail").scrollIntoView({ block: "nearest" });
}

function renderRuns() {
  if (state.missing.has("runs")) return fill("runs", note(NOT_AVAILABLE));
  const page = state.data.runs;
  if (!page) return fill("runs", note("Loading…"));
  if (!page.runs.length) return fill("runs", note("No runs yet."));
  const columns = [
    { label: "run", field: "run", cell: (r) => runButton(r.run) },
    { label: "job", field: "job", cell: (r) => r.job },
    { label: "state", field: "state", cell: (r) => badge(r.state) },
    { label: "attempt", field: "attempt", cell: (r) => String(r.attempt) },
    { label: "trigger", field: "trigger", cell: (r) => r.trigger },
    { label: "worker", field: "worker", cell: (r) => (r.lease ? r.lease.worker : "–") },
    { label: "created", field: "created", cell: (r) => when(r.created_at_ms, r.created_at) },
    { label: "finished", field: "finished", cell: (r) => when(r.finished_at_ms, r.finished_at) },
    {
      label: "result",
      field: "result",
      cell: (r) =>
        show(
          r.state === "succeeded" || !r.error ? r.summary : r.error.kind + ": " + r.error.message,
        ),
    },
  ];
  fill("runs", table("The last " + RUNS_SHOWN + " runs, newest first", columns, page.runs, (r) => ({ "data-run": r.run })));
}

function renderRunDetail() {
  const box = document.getElementById("run-detail");
  const detail = state.detail;
  if (!state.selectedRun || !detail) {
    box.hidden = true;
    return;
  }
  box.hidden = false;
  const close = button("Close", "Close the run's details", () => {
    state.selectedRun = null;
    state.detail = null;
    renderRunDetail();
  });
  if (detail.error) {
    return box.replaceChildren(el("div", null, el("h3", null, detail.run), note(detail.error), close));
  }
  const run = detail.view;
  const facts = [
    ["state", run.state],
    ["attempt", run.attempt],
    ["lease", run.lease ? run.lease.worker + ", " + run.lease.token + ", expires " + show(run.lease.expires_at) : null],
    ["progress", run.progress ? run.progress.phase + ": " + run.progress.message : null],
    ["error", run.error ? run.error.kind + ": " + run.error.message : null],
    ["summary", run.summary],
    ["artifacts", Object.keys(run.artifacts || {}).length ? run.artifacts : null],
    ["verifications", run.verifications && run.verifications.length ? run.verifications : null],
  ];
  const list = el(
    "dl",
    null,
    facts.map(([name, value]) => [el("dt", null, name), el("dd", null, show(value))]),
  );
  const audit = detail.audit.length
    ? table(
        "Audit trail, oldest first",
        [
          { label: "at", field: "at", cell: (a) => when(a.at_ms, a.at) },
          { label: "from", field: "from", cell: (a) => show(a.from) },
          { label: "to", field: "to", cell: (a) => show(a.to) },
          { label: "actor", field: "actor", cell: (a) => show(a.actor) },
          { label: "reason", field: "reason", cell: (a) => show(a.reason) },
          { label: "token", field: "token", cell: (a) => show(a.token) },
        ],
        detail.audit,
      )
    : note("No audit records.");
  const logs = detail.logs
    ? ["stdout", "stderr"].map((stream) => [
        el("h4", null, stream + (detail.logs[stream].cut ? " (start cut)" : "")),
        el("pre", { class: "log" }, detail.logs[stream].text || "(empty)"),
      ])
    : note(detail.logsNote || "No output kept.");
  box.replaceChildren(
    el(
      "div",
      null,
      el("h3", null, run.run + " of job " + run.job),
      close,
      list,
      el("h4", null, "Audit trail"),
      audit,
      el("h4", null, "Output" + (detail.logs ? " of attempt " + detail.logs.attempt : "")),
      logs,
    ),
  );
}

function renderWorkers() {
  if (state.missing.has("workers")) return fill("workers", note(NOT_AVAILABLE));
  const workers = state.data.workers;
  if (!workers) return fill("workers", note("Loading…"));
  if (!workers.length) return fill("workers", note("No worker seen yet."));
  const columns = [
    { label: "worker", field: "worker", cell: (w) => w.worker },
    { label: "kind", field: "kind", cell: (w) => show(w.kind) },
    { label: "score", field: "score", cell: (w) => show(w.score) },
    { label: "claims", field: "claims", cell: (w) => show(w.claims) },
    { label: "successes", field: "successes", cell: (w) => show(w.successes) },
    { label: "failures", field: "failures", cell: (w) => show(w.failures) },
    { label: "lease losses", field: "lease_losses", cell: (w) => show(w.lease_losses) },
    { label: "idle loops", field: "idle_loops", cell: (w) => show(w.idle_loops) },
    {
      label: "last seen",
      field: "last_seen",
      cell: (w) => (typeof w.last_seen_ms === "number" ? when(w.last_seen_ms, w.last_seen) : show(w.last_seen)),
    },
  ];
  fill("workers", table("Worker health by worker and kind", columns, workers, (w) => ({ "data-worker": w.worker })));
}

function showStatus() {
  const parts = [state.mode];
  if (state.updatedAt) parts.push("updated " + state.updatedAt.toLocaleTimeString());
  if (state.lastEvent) parts.push("last event: " + state.lastEvent);
  if (state.failure && state.failure.status !== 401) parts.push("error: " + state.failure.message);
  const node = document.getElementById("status");
  node.textContent = parts.join(" · ");
  node.dataset.mode = state.mode === "live" ? "live" : "other";
}

function notice(text, bad) {
  const node = document.getElementById("notice");
  node.textContent = text;
  node.hidden = !text;
  node.classList.toggle("bad", !!bad);
}

startLive();
reread();
