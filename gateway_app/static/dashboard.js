/* The gateway's dashboard: reads the registry API, the metrics and the overview every few
 * seconds and draws them. Plain JavaScript, no dependencies; every value reaches the page
 * through textContent, never as HTML. */
"use strict";

(function () {
  const TOKEN_KEY = "gateway-admin-token";
  const MAX_PAGES = 50;            // listing pages of 1000 services
  const MAX_EVENT_FETCHES = 50;    // instances whose timeline is read per refresh
  const TIMELINE_LENGTH = 10;      // events shown per instance
  const OBSERVED_LENGTH = 20;      // transitions the page remembers per instance

  // -- the Prometheus text format ----------------------------------------------------------

  /** Samples of a Prometheus text exposition: [{name, labels, value}]. Comments, blank and
   * malformed lines are skipped. */
  function parseMetrics(text) {
    const samples = [];
    for (const raw of text.split("\n")) {
      const line = raw.trim();
      if (!line || line[0] === "#") continue;
      const sample = parseLine(line);
      if (sample) samples.push(sample);
    }
    return samples;
  }

  function parseLine(line) {
    const name = /^[a-zA-Z_:][a-zA-Z0-9_:]*/.exec(line);
    if (!name) return null;
    let i = name[0].length;
    const labels = {};
    if (line[i] === "{") {
      i += 1;
      for (;;) {
        while (line[i] === " " || line[i] === ",") i += 1;
        if (line[i] === "}") { i += 1; break; }
        const key = /^[a-zA-Z_][a-zA-Z0-9_]*/.exec(line.slice(i));
        if (!key) return null;
        i += key[0].length;
        while (line[i] === " ") i += 1;
        if (line[i] !== "=" ) return null;
        i += 1;
        while (line[i] === " ") i += 1;
        if (line[i] !== '"') return null;
        i += 1;
        let value = "";
        for (;;) {
          if (i >= line.length) return null;
          const c = line[i];
          if (c === "\\") {
            const next = line[i + 1];
            value += next === "n" ? "\n" : next;
            i += 2;
          } else if (c === '"') {
            i += 1;
            break;
          } else {
            value += c;
            i += 1;
          }
        }
        labels[key[0]] = value;
      }
    }
    const rest = line.slice(i).trim().split(/\s+/);
    const value = parseValue(rest[0]);
    if (value === null) return null;
    return { name: name[0], labels: labels, value: value };
  }

  function parseValue(text) {
    if (text === undefined || text === "") return null;
    if (text === "+Inf" || text === "Inf") return Infinity;
    if (text === "-Inf") return -Infinity;
    if (text === "NaN") return NaN;
    const value = Number(text);
    return Number.isNaN(value) ? null : value;
  }

  /** What the page needs from one scrape, summed over the labels it does not show. */
  function digest(samples) {
    const d = { requests: {}, errors: {}, buckets: {}, limited: {}, tokenRefusals: {},
                storeUp: null, ejections: {} };
    const add = (table, key, value) => { table[key] = (table[key] || 0) + value; };
    for (const s of samples) {
      const service = s.labels.service;
      switch (s.name) {
        case "gateway_requests_total":
          add(d.requests, service, s.value);
          if (String(s.labels.code || "").startsWith("5")) add(d.errors, service, s.value);
          break;
        case "gateway_request_duration_seconds_bucket": {
          const le = parseValue(s.labels.le);
          if (le === null) break;
          const buckets = d.buckets[service] || (d.buckets[service] = {});
          add(buckets, String(le), s.value);
          break;
        }
        case "gateway_rate_limited_total":
          add(d.limited, service, s.value);
          break;
        case "gateway_token_refusals_total":
          add(d.tokenRefusals, s.labels.reason, s.value);
          break;
        case "gateway_ejections_total":
          add(d.ejections, service, s.value);
          break;
        case "gateway_store_up":
          d.storeUp = s.value;
          break;
        default:
          break;
      }
    }
    return d;
  }

  /** A counter's increase from ``before`` to ``after``; a counter that went down was reset
   * (a worker restarted), and counts from zero. */
  function increase(before, after) {
    if (after === undefined) return 0;
    if (before === undefined || after < before) return after;
    return after - before;
  }

  /** Cumulative bucket counts as sorted [[le, count]]. */
  function sortedBuckets(table) {
    return Object.keys(table || {}).map((le) => [Number(le), table[le]])
      .sort((a, b) => a[0] - b[0]);
  }

  /** The q-quantile of a histogram's cumulative buckets [[le, count]], as Prometheus's
   * histogram_quantile does it: linear within the bucket; the highest finite bound when it
   * falls in +Inf; null without observations. */
  function quantile(q, buckets) {
    if (!buckets.length) return null;
    const total = buckets[buckets.length - 1][1];
    if (!(total > 0)) return null;
    const rank = q * total;
    for (let i = 0; i < buckets.length; i += 1) {
      const [le, count] = buckets[i];
      if (count >= rank) {
        if (le === Infinity) return i > 0 ? buckets[i - 1][0] : null;
        const start = i > 0 ? buckets[i - 1][0] : 0;
        const below = i > 0 ? buckets[i - 1][1] : 0;
        if (count === below) return le;
        return start + (le - start) * (rank - below) / (count - below);
      }
    }
    return buckets[buckets.length - 1][0];
  }

  /** Rates between two digests ``seconds`` apart: per service requests/s, 5xx share, p99
   * (seconds) and rate-limit refusals/s; and the totals. */
  function compare(before, after, seconds) {
    const services = {};
    const names = new Set([...Object.keys(after.requests), ...Object.keys(after.buckets),
                           ...Object.keys(after.limited)]);
    let totalRequests = 0;
    let totalLimited = 0;
    for (const name of names) {
      const requests = increase(before.requests[name], after.requests[name]);
      const errors = increase(before.errors[name], after.errors[name]);
      const limited = increase(before.limited[name], after.limited[name]);
      const now = sortedBuckets(after.buckets[name]);
      const then = sortedBuckets(before.buckets[name]);
      const thenInf = then.length ? then[then.length - 1][1] : 0;
      const nowInf = now.length ? now[now.length - 1][1] : 0;
      let window = now;
      if (then.length === now.length && nowInf >= thenInf) {
        window = now.map(([le, count], i) => [le, count - then[i][1]]);
      }
      services[name] = {
        rate: requests / seconds,
        errorRate: requests > 0 ? errors / requests : null,
        p99: quantile(0.99, window),
        limitedRate: limited / seconds,
      };
      totalRequests += requests;
      totalLimited += limited;
    }
    const limitedTotal = Object.values(after.limited).reduce((a, b) => a + b, 0);
    return { services: services, rate: totalRequests / seconds,
             limitedRate: totalLimited / seconds, limitedTotal: limitedTotal };
  }

  // -- instances -----------------------------------------------------------------------------

  /** healthy, ejected, draining, unhealthy or unknown. The health API's ``state`` when the
   * gateway gives one; otherwise read from today's fields. */
  function instanceState(inst) {
    if (typeof inst.state === "string" && inst.state) return inst.state;
    if (inst.health === "draining") return "draining";
    if (inst.ejected_until) return "ejected";
    return inst.health || "unknown";
  }

  /** Why the instance is in its state, from the best field the gateway has: its last cause,
   * its newest event, its failing probe, or the passive-health rule that ejected it. */
  function instanceCause(inst, events, overview) {
    for (const key of ["last_cause", "cause"]) {
      const value = inst[key];
      if (typeof value === "string" && value) return value;
      if (value && typeof value === "object" && typeof value.cause === "string") {
        return value.cause;
      }
    }
    if (events && events.length) return String(events[events.length - 1].cause || "");
    const check = inst.last_check;
    if (check && check.ok === false) {
      return "probe: " + (check.status !== undefined ? "HTTP " + check.status
                                                      : String(check.error || "failed"));
    }
    if (instanceState(inst) === "ejected") {
      const n = overview && overview.eject_after ? overview.eject_after : "several";
      return "ejected after " + n + " failures in a row";
    }
    if (inst.consecutive_failures) return inst.consecutive_failures + " failures in a row";
    return "";
  }

  // -- the page ------------------------------------------------------------------------------

  const page = {
    overview: null,
    digest: null,
    digestAt: 0,
    rates: null,
    events: new Map(),     // "service/id" -> the instance's events, as last read
    observed: new Map(),   // "service/id" -> [{time, from, to, cause}]
    lastState: new Map(),  // "service/id" -> state
    open: new Set(),       // timelines the user opened
  };

  function token() {
    try { return window.sessionStorage.getItem(TOKEN_KEY) || ""; } catch (e) { return ""; }
  }

  function headers() {
    const t = token();
    return t ? { Authorization: "Bearer " + t } : {};
  }

  class HttpError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function get(path, asText) {
    const response = await fetch(path, { headers: headers(), cache: "no-store",
                                         credentials: "omit" });
    if (!response.ok) {
      let message = response.status + " " + response.statusText;
      try {
        const body = await response.json();
        if (body && body.message) message = response.status + " " + body.message;
      } catch (e) { /* not JSON */ }
      throw new HttpError(response.status, message);
    }
    return asText ? response.text() : response.json();
  }

  async function listServices() {
    let services = [];
    let after = null;
    for (let i = 0; i < MAX_PAGES; i += 1) {
      const query = "?limit=1000" + (after ? "&after=" + encodeURIComponent(after) : "");
      const body = await get("/_gateway/services" + query);
      services = services.concat(body.services || []);
      after = body.next;
      if (!after) break;
    }
    return services;
  }

  function instancePath(service, inst) {
    return "/_gateway/services/" + encodeURIComponent(service) + "/instances/"
      + encodeURIComponent(inst.id) + "/events";
  }

  /** The timelines worth a request this time: instances that are not healthy, whose state
   * just changed, or whose timeline is open; the others keep the last one read. */
  async function readEvents(services) {
    const events = new Map();
    const wanted = [];
    for (const service of services) {
      for (const inst of service.instances || []) {
        const key = service.name + "/" + inst.id;
        const state = instanceState(inst);
        const fresh = state !== "healthy" || page.lastState.get(key) !== state
          || page.open.has(key) || !page.events.has(key);
        if (fresh) wanted.push([service.name, inst]);
        else events.set(key, page.events.get(key));
      }
    }
    // Instances that are not healthy first: their timelines say why.
    wanted.sort((a, b) => (instanceState(a[1]) === "healthy") - (instanceState(b[1]) === "healthy"));
    await Promise.all(wanted.slice(0, MAX_EVENT_FETCHES).map(async ([name, inst]) => {
      const key = name + "/" + inst.id;
      try {
        const body = await get(instancePath(name, inst));
        events.set(key, Array.isArray(body.events) ? body.events : []);
      } catch (e) { /* gone since the listing: drawn without a timeline */ }
    }));
    for (const [name, inst] of wanted.slice(MAX_EVENT_FETCHES)) {
      const key = name + "/" + inst.id;
      if (page.events.has(key)) events.set(key, page.events.get(key));
    }
    page.events = events;
    return events;
  }

  async function readMetrics() {
    const text = await get("/_gateway/metrics", true);
    const now = Date.now() / 1000;
    const current = digest(parseMetrics(text));
    if (page.digest && now - page.digestAt > 0.2) {
      page.rates = compare(page.digest, current, now - page.digestAt);
    }
    page.digest = current;
    page.digestAt = now;
    return current;
  }

  function observe(services, events) {
    const now = new Date();
    const seen = new Set();
    for (const service of services) {
      for (const inst of service.instances || []) {
        const key = service.name + "/" + inst.id;
        seen.add(key);
        const state = instanceState(inst);
        const before = page.lastState.get(key);
        if (before !== undefined && before !== state) {
          const list = page.observed.get(key) || [];
          list.push({ time: now, from: before, to: state,
                      cause: instanceCause(inst, events.get(key), page.overview) });
          page.observed.set(key, list.slice(-OBSERVED_LENGTH));
        }
        page.lastState.set(key, state);
      }
    }
    for (const key of [...page.lastState.keys()]) {
      if (!seen.has(key)) { page.lastState.delete(key); page.observed.delete(key); }
    }
  }

  // -- drawing -------------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key.startsWith("data-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function text(id, value) {
    const node = document.getElementById(id);
    if (node) node.textContent = value;
  }

  function fmtRate(v) {
    if (v === null || v === undefined) return "–";
    return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
  }

  function fmtShare(v) {
    return v === null || v === undefined ? "–" : (100 * v).toFixed(v > 0 && v < 0.01 ? 2 : 1) + "%";
  }

  function fmtSeconds(v) {
    if (v === null || v === undefined) return "–";
    return v < 1 ? (1000 * v).toFixed(v < 0.01 ? 2 : 0) + " ms" : v.toFixed(2) + " s";
  }

  function fmtTime(t) {
    const date = t instanceof Date ? t : new Date(typeof t === "number" ? t * 1000 : t);
    return Number.isNaN(date.getTime()) ? String(t) : date.toLocaleTimeString();
  }

  function timeline(key, events) {
    const items = [];
    if (events) {
      for (const e of events.slice(-TIMELINE_LENGTH).reverse()) {
        const where = [e.node, e.worker !== undefined ? "pid " + e.worker : null]
          .filter(Boolean).join(" ");
        const value = e.value !== undefined && e.value !== null ? " (" + JSON.stringify(e.value) + ")" : "";
        items.push(el("li", {}, el("time", {}, fmtTime(e.time)), " ", String(e.cause || ""),
                      value, where ? el("span", { class: "muted" }, " · " + where) : null));
      }
    } else {
      for (const o of (page.observed.get(key) || []).slice().reverse()) {
        items.push(el("li", {}, el("time", {}, fmtTime(o.time)), " " + o.from + " → " + o.to,
                      o.cause ? ": " + o.cause : ""));
      }
    }
    const source = events ? "events" : "seen by this page";
    const details = el("details", { class: "timeline", "data-key": key },
                       el("summary", {}, "Timeline (" + source + ", " + items.length + ")"),
                       items.length ? el("ol", {}, ...items)
                                    : el("p", { class: "muted" }, "No transitions yet."));
    if (page.open.has(key)) details.open = true;
    details.addEventListener("toggle", () => {
      if (details.open) page.open.add(key); else page.open.delete(key);
    });
    return details;
  }

  function instanceTable(service, events) {
    const rows = (service.instances || []).map((inst) => {
      const key = service.name + "/" + inst.id;
      const state = instanceState(inst);
      const check = inst.last_check;
      const checkText = check ? (check.ok ? "passed" : "failed")
        + (check.status !== undefined ? " (HTTP " + check.status + ")" : "")
        + (check.error ? " (" + check.error + ")" : "") : "–";
      return [
        el("tr", { "data-instance": inst.id, class: "instance state-" + state },
           el("td", { class: "id" }, inst.id),
           el("td", { class: "address" }, inst.address),
           el("td", { class: "weight" }, inst.weight),
           el("td", { class: "state" }, el("span", { class: "pill " + state }, state)),
           el("td", { class: "failures" }, inst.consecutive_failures ?? "–"),
           el("td", { class: "in-flight" }, inst.in_flight ?? "–"),
           el("td", { class: "ejected-until" }, inst.ejected_until ? fmtTime(inst.ejected_until) : "–"),
           el("td", { class: "cause" }, instanceCause(inst, events.get(key), page.overview)),
           el("td", { class: "check" }, checkText)),
        el("tr", { class: "timeline-row" },
           el("td", { colSpan: 9 }, timeline(key, events.has(key) ? events.get(key) : null))),
      ];
    }).flat();
    return el("table", { class: "instances" },
              el("thead", {}, el("tr", {}, ...["Instance", "Address", "Weight", "State",
                 "Failures", "In flight", "Ejected until", "Cause", "Last check"]
                 .map((h) => el("th", {}, h)))),
              el("tbody", {}, ...rows));
  }

  function drawServices(services, events) {
    const tbody = document.querySelector("#services tbody");
    const rates = page.rates ? page.rates.services : {};
    const metrics = page.overview && page.overview.features.metrics;
    const rows = [];
    let instances = 0;
    let unhealthy = 0;
    for (const service of services) {
      const list = service.instances || [];
      const healthy = list.filter((i) => instanceState(i) === "healthy").length;
      instances += list.length;
      unhealthy += list.filter((i) => !["healthy", "unknown"].includes(instanceState(i))).length;
      const r = rates[service.name] || (metrics && page.rates
        ? { rate: 0, errorRate: null, p99: null, limitedRate: 0 } : {});
      rows.push(el("tr", { class: "service", "data-service": service.name },
                   el("th", { class: "name", scope: "row" }, service.name),
                   el("td", { class: "instances" }, list.length),
                   el("td", { class: "healthy" }, healthy + "/" + list.length),
                   el("td", { class: "rate" }, fmtRate(r.rate)),
                   el("td", { class: "errors" }, fmtShare(r.errorRate)),
                   el("td", { class: "p99" }, fmtSeconds(r.p99)),
                   el("td", { class: "limited" }, fmtRate(r.limitedRate))));
      rows.push(el("tr", { class: "service-detail", "data-service": service.name },
                   el("td", { colSpan: 7 }, instanceTable(service, events))));
    }
    tbody.replaceChildren(...rows);
    document.getElementById("no-services").hidden = services.length > 0;
    text("count-services", services.length);
    text("count-instances", instances);
    text("count-unhealthy", unhealthy);
  }

  function drawMetrics() {
    const metrics = page.overview && page.overview.features.metrics;
    document.getElementById("metrics-note").hidden = Boolean(metrics);
    const tbody = document.querySelector("#refusals tbody");
    if (!metrics || !page.digest) {
      text("total-rate", metrics ? "…" : "n/a");
      text("total-limited", metrics ? "…" : "n/a");
      tbody.replaceChildren(el("tr", {}, el("td", { colSpan: 3, class: "muted" },
        metrics ? "Waiting for a second scrape…" : "Metrics unavailable.")));
      return;
    }
    const rates = page.rates;
    text("total-rate", rates ? fmtRate(rates.rate) : "…");
    const limitedTotal = Object.values(page.digest.limited).reduce((a, b) => a + b, 0);
    text("total-limited", String(limitedTotal));
    const rows = [];
    for (const [service, total] of Object.entries(page.digest.limited)) {
      const perSecond = rates && rates.services[service] ? rates.services[service].limitedRate : null;
      rows.push(el("tr", { "data-refusal": "rate-limit" },
                   el("td", {}, "rate limit: " + service), el("td", {}, total),
                   el("td", {}, fmtRate(perSecond))));
    }
    for (const [reason, total] of Object.entries(page.digest.tokenRefusals)) {
      rows.push(el("tr", { "data-refusal": "token" },
                   el("td", {}, "token: " + reason), el("td", {}, total), el("td", {}, "–")));
    }
    if (!rows.length) {
      rows.push(el("tr", {}, el("td", { colSpan: 3, class: "muted" }, "No refusals.")));
    }
    tbody.replaceChildren(...rows);
  }

  function drawOverview() {
    const o = page.overview;
    text("node", "node " + o.node);
    const store = o.store;
    let up = store.up;
    if (page.digest && page.digest.storeUp !== null) up = up && page.digest.storeUp > 0;
    const pill = document.getElementById("store");
    pill.textContent = store.kind + (up ? " up" : " DOWN");
    pill.className = "pill " + (up ? "healthy" : "ejected");
    let detail = store.kind + ": " + (up ? "up" : "down");
    if (!up && store.down_since) detail += " since " + fmtTime(store.down_since);
    if (!up && store.error) detail += " (" + store.error + ")";
    if (!o.ready && o.not_ready_reason) detail += "; not ready: " + o.not_ready_reason;
    text("store-detail", detail);
  }

  function notice(message, kind) {
    const node = document.getElementById("notice");
    node.textContent = message;
    node.className = kind || "";
    node.hidden = !message;
  }

  async function refresh() {
    const locked = document.body.dataset.locked === "true";
    if (locked && !token()) {
      notice("This address is not on the gateway's admin networks: enter the admin token "
             + "(it is kept in this browser tab only).", "warn");
      return;
    }
    try {
      page.overview = await get("/_gateway/ui/overview");
      const services = await listServices();
      const features = page.overview.features;
      const [events] = await Promise.all([
        features.events ? readEvents(services) : Promise.resolve(new Map()),
        features.metrics ? readMetrics().catch((e) => { page.metricsError = e; }) : null,
      ]);
      observe(services, events);
      drawOverview();
      drawMetrics();
      drawServices(services, events);
      text("updated", "updated " + new Date().toLocaleTimeString());
      notice(page.metricsError ? "Metrics could not be read: " + page.metricsError.message : "");
      page.metricsError = null;
    } catch (e) {
      if (e instanceof HttpError && (e.status === 401 || e.status === 403)) {
        notice(token() ? "The gateway refused this token (" + e.message + ")."
                       : "Enter the admin token.", "warn");
      } else {
        notice("Could not refresh: " + e.message, "warn");
      }
    }
  }

  function start() {
    const refreshMs = Number(document.body.dataset.refreshMs) || 2000;
    const form = document.getElementById("token-form");
    const input = document.getElementById("token-input");
    // From an admin network the page needs no token: the form is for everyone else.
    form.hidden = document.body.dataset.locked !== "true" && !token();
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const value = input.value.trim();
      input.value = "";
      try {
        if (value) window.sessionStorage.setItem(TOKEN_KEY, value);
      } catch (e) { /* storage disabled: nothing kept */ }
      refresh();
    });
    document.getElementById("token-forget").addEventListener("click", () => {
      try { window.sessionStorage.removeItem(TOKEN_KEY); } catch (e) { /* nothing kept */ }
      refresh();
    });
    const loop = async () => {
      if (!document.hidden) await refresh();
      window.setTimeout(loop, refreshMs);
    };
    loop();
  }

  window.GatewayDashboard = { parseMetrics, digest, compare, quantile, sortedBuckets,
                              instanceState, instanceCause };
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
