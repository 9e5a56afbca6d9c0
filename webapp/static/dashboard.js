/* The dashboard's script: asks for a monitor token, polls /ui/api/overview every few seconds
 * and /ui/api/series for the charts, and renders both without reloading the page.
 *
 * The token comes from ?key= (then removed from the address and the history), or from the form;
 * it is kept in sessionStorage (this tab only) and sent as a Bearer header. Every value from
 * the server is put into the page as text (textContent), never as HTML.
 */
(function () {
  "use strict";

  const TOKEN_KEY = "llm-gateway.monitor-token";
  const params = new URLSearchParams(window.location.search);
  const refreshSeconds = clamp(parseFloat(params.get("refresh")) || 3, 1, 60);
  const seriesSeconds = Math.max(10, refreshSeconds);
  const $ = (id) => document.getElementById(id);

  let token = takeToken();
  let timer = null;
  let lastSeriesAt = 0;
  let charts = null;

  // -- small helpers ------------------------------------------------------------------------

  function clamp(value, low, high) { return Math.min(high, Math.max(low, value)); }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else if (name in node && typeof value !== "string") node[name] = value;
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ${String(s % 60).padStart(2, "0")} s`;
    const h = Math.floor(m / 60);
    if (h < 48) return `${h} h ${String(m % 60).padStart(2, "0")} min`;
    return `${Math.floor(h / 24)} d ${h % 24} h`;
  }

  function clock(epochSeconds) {
    if (!epochSeconds) return "–";
    return new Date(epochSeconds * 1000).toLocaleTimeString([], { hour12: false });
  }

  function bytes(n) {
    if (!n) return "0 B";
    const units = ["B", "KB", "MB", "GB", "TB"];
    const i = Math.min(units.length - 1, Math.floor(Math.log(n) / Math.log(1024)));
    return `${(n / 1024 ** i).toFixed(i ? 1 : 0)} ${units[i]}`;
  }

  function badge(state) {
    const text = String(state || "unknown");
    return el("span", { class: `badge ${text.replace(/[^a-z_]/gi, "")}`, text });
  }

  function progress(value, max, label) {
    return el("progress", { max: Math.max(1, max), value: Math.min(value, Math.max(1, max)),
                            "aria-label": label, title: label });
  }

  function fill(tbody, rows, columns, emptyText) {
    tbody.replaceChildren();
    if (!rows.length) {
      tbody.append(el("tr", {}, el("td", { colspan: String(columns), class: "empty",
                                           text: emptyText })));
      return;
    }
    tbody.append(...rows);
  }

  function setStatus(text, isError) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  let noticeTimer = null;

  // The outcome of an operator's action: stays a while, unlike the refresh status.
  function notice(text, isError) {
    const box = $("notice");
    box.textContent = text;
    box.classList.toggle("error", Boolean(isError));
    box.hidden = false;
    if (noticeTimer !== null) window.clearTimeout(noticeTimer);
    noticeTimer = window.setTimeout(() => { box.hidden = true; }, 20000);
  }

  // -- the token ------------------------------------------------------------------------------

  function takeToken() {
    if (params.has("key")) {
      const key = params.get("key");
      if (key) sessionStorage.setItem(TOKEN_KEY, key);
      params.delete("key");
      const rest = params.toString();
      // Drop the key from the address bar and the history entry.
      window.history.replaceState(null, "", window.location.pathname + (rest ? `?${rest}` : ""));
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function askForToken(message, isProblem) {
    stop();
    $("board").hidden = true;
    $("auth").hidden = false;
    $("change-token").hidden = true;
    const text = $("auth-message");
    text.textContent = message;
    text.classList.toggle("info", !isProblem);
    setStatus(isProblem ? "Not signed in: see the message below." : "Waiting for a token.",
              isProblem);
    $("token-input").value = "";
    $("token-input").focus();
  }

  function authMessage(error) {
    const detail = error.serverMessage ? ` (server: “${error.serverMessage}”)` : "";
    if (error.status === 403 && error.code === "insufficient_scope") {
      return "This token is valid but lacks the “monitor” scope, so it may not see the " +
        "dashboard. Use a token whose scopes include monitor." + detail;
    }
    if (error.status === 401 && error.code === "missing_api_key") {
      return "No token was sent. Enter a token with the “monitor” scope." + detail;
    }
    if (error.status === 401) {
      return "This token was not accepted: it is not a known API key (it may be mistyped or " +
        "revoked)." + detail;
    }
    return `The server refused the token (HTTP ${error.status}).${detail}`;
  }

  // -- the API --------------------------------------------------------------------------------

  async function api(path, options) {
    const response = await fetch(path, {
      cache: "no-store",
      ...(options || {}),
      headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
    });
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    if (!response.ok) {
      const error = new Error(body && body.error ? body.error.message : response.statusText);
      error.status = response.status;
      error.code = body && body.error ? body.error.code : null;
      error.serverMessage = body && body.error ? body.error.message : null;
      throw error;
    }
    return body;
  }

  function stop() {
    if (timer !== null) window.clearTimeout(timer);
    timer = null;
  }

  let loading = false;

  async function refresh() {
    stop();
    if (loading) {  // one poll at a time: a click during a poll just asks for the next one
      timer = window.setTimeout(refresh, 200);
      return;
    }
    loading = true;
    let signedOut = false;
    try {
      const data = await api("/ui/api/overview");
      $("auth").hidden = true;
      $("board").hidden = false;
      $("change-token").hidden = false;
      render(data);
      if (Date.now() - lastSeriesAt >= seriesSeconds * 1000) {
        lastSeriesAt = Date.now();
        renderCharts(await api("/ui/api/series?minutes=60"));
      }
      setStatus(`Updated ${clock(data.now)} · refreshing every ${refreshSeconds} s`, false);
    } catch (error) {
      if (error.status === 401 || error.status === 403) {
        sessionStorage.removeItem(TOKEN_KEY);  // a reload asks again instead of failing again
        askForToken(authMessage(error), true);
        signedOut = true;
      } else {
        setStatus(`Could not refresh at ${clock(Date.now() / 1000)}: ${error.message}. ` +
                  "Retrying…", true);
      }
    } finally {
      loading = false;
    }
    if (!signedOut) timer = window.setTimeout(refresh, refreshSeconds * 1000);
  }

  // -- rendering ------------------------------------------------------------------------------

  function render(data) {
    renderSummary(data);
    renderGpus(data);
    renderRuntimes(data);
    renderStarting(data);
    renderFailures(data);
    renderQueues(data);
    renderDownloads(data);
    renderJobs(data);
    renderUsage(data);
    renderUpstreams(data);
    renderDecisions(data);
  }

  function tile(label, value, id) {
    return el("div", { class: "tile", id },
              el("div", { class: "value", text: String(value) }),
              el("div", { class: "label", text: label }));
  }

  function renderSummary(data) {
    const count = (state) => data.runtimes.filter((r) => r.state === state).length;
    const inflight = data.runtimes.reduce((sum, r) => sum + (r.inflight || 0), 0);
    const waiting = Object.values(data.queues.batch_pending).reduce((a, b) => a + b, 0);
    const failedModels = data.models.filter((m) => m.failed).length;
    $("summary").replaceChildren(
      tile("engines ready", count("ready"), "sum-ready"),
      tile("starting", count("starting"), "sum-starting"),
      tile("sleeping", count("sleeping"), "sum-sleeping"),
      tile("models failed", failedModels, "sum-failed"),
      tile("calls in flight", inflight, "sum-inflight"),
      tile("batch lines waiting", waiting, "sum-waiting"),
      tile("open batch jobs", data.jobs.open, "sum-open"),
      tile("web workers", data.web_workers, "sum-web"),
    );
  }

  function renderGpus(data) {
    const box = $("gpus");
    box.classList.toggle("gpus", data.gpus.length > 0);
    if (!data.gpus.length) {
      box.replaceChildren(el("p", { class: "note", text:
        "GPUs are not managed on this machine (no GPU inventory): engines run without GPU " +
        "placement. The runtimes are listed below." }));
      return;
    }
    box.replaceChildren(...data.gpus.map((gpu) => {
      const name = `${gpu.host} · GPU ${gpu.gpu}`;
      const h = gpu.holder;
      if (!h) {
        return el("div", { class: "gpu free" }, el("div", { class: "name", text: name }), "free");
      }
      return el("div", { class: "gpu", "data-model": h.model },
        el("div", { class: "name", text: name }),
        el("div", { class: "model", text: h.model }),
        el("div", {}, badge(h.state), " ", h.engine, h.sleeping ? " · asleep" : ""),
        el("div", { class: "note", text:
          `up ${duration(h.uptime_seconds)} · idle ${duration(h.idle_seconds)} · ` +
          `${h.inflight} in flight` }));
    }));
  }

  function renderRuntimes(data) {
    const rows = data.runtimes.map((r) => el("tr", { "data-model": r.model, "data-state": r.state },
      el("td", { class: "model", text: r.model }),
      el("td", { text: r.engine }),
      el("td", {}, badge(r.state)),
      el("td", { text: r.gpus.length ? `${r.gpu_host}: ${r.gpus.join(", ")}` : "–" }),
      el("td", { class: "num", text: duration(r.uptime_seconds) }),
      el("td", { class: "num", text: duration(r.idle_seconds) }),
      el("td", { class: "num", text: String(r.inflight) }),
      el("td", { class: "mono", text: r.id }),
      el("td", { class: "reason", text: r.reason || "" })));
    fill($("runtimes").tBodies[0], rows, 9, "No engine is running. A call for a model starts one.");
  }

  function renderStarting(data) {
    const starting = data.runtimes.filter((r) => r.state === "starting");
    if (!starting.length) {
      $("starting").replaceChildren(el("p", { class: "empty", text: "Nothing is starting." }));
      return;
    }
    $("starting").replaceChildren(...starting.map((r) => {
      let eta = "no estimate yet";
      if (r.eta_seconds !== null) {
        eta = r.eta_seconds >= 0 ? `ready in about ${duration(r.eta_seconds)}`
                                 : `${duration(-r.eta_seconds)} over its estimate`;
      }
      const estimate = r.estimate_seconds || r.elapsed_seconds || 1;
      return el("div", { class: "item", "data-model": r.model },
        el("div", { class: "head" }, el("span", { class: "model", text: r.model }),
           badge("starting"), el("span", { text: eta })),
        progress(Math.min(r.elapsed_seconds, estimate), estimate,
                 `${r.model}: ${duration(r.elapsed_seconds)} of about ${duration(estimate)}`),
        el("div", { class: "note", text:
          `${r.engine} · started ${duration(r.elapsed_seconds)} ago · ${r.reason || ""}` }));
    }));
  }

  async function resetModel(model, button) {
    button.disabled = true;
    try {
      const result = await api(`/ui/api/models/${encodeURIComponent(model)}/reset`,
                               { method: "POST" });
      notice(`Reset ${result.model} (it had ${result.failed_starts_before} failed starts): ` +
             "the next call starts it again.", false);
    } catch (error) {
      notice(`Reset of ${model} failed: ${error.message}`, true);
    }
    refresh();
  }

  function renderFailures(data) {
    const failing = data.models.filter((m) => m.failed_starts > 0);
    const failedRuntimes = data.runtimes.filter((r) => r.state === "failed");
    if (!failing.length && !failedRuntimes.length) {
      $("failures").replaceChildren(el("p", { class: "empty", text: "No failed starts." }));
      return;
    }
    const items = failing.map((m) => {
      const f = m.last_failure || {};
      const verdict = m.failed
        ? `${m.failed_starts} failed starts in a row: calls get 503 model_failed until reset`
        : `${m.failed_starts} failed start(s): retrying with backoff`;
      return el("div", { class: "item", "data-model": m.id },
        el("div", { class: "head" }, el("span", { class: "model", text: m.id }),
           badge(m.failed ? "failed" : "starting"),
           el("button", { type: "button", class: "secondary", text: "Reset",
                          title: "Clear the failures so the next call starts it again",
                          onclick: (event) => resetModel(m.id, event.currentTarget) })),
        el("div", { class: m.failed ? "bad-text" : "", text: verdict }),
        el("div", { class: "note", text:
          `exit code ${f.exit_code ?? "–"} · ${f.reason || "no reason recorded"} · ` +
          `at ${clock(f.at)}` }),
        f.last_logs ? el("pre", { class: "logs", text: f.last_logs }) : null);
    });
    for (const r of failedRuntimes) {
      if (failing.some((m) => m.id === r.model)) continue;
      items.push(el("div", { class: "item", "data-model": r.model },
        el("div", { class: "head" }, el("span", { class: "model", text: r.model }),
           badge("failed")),
        el("div", { class: "note", text: `exit code ${r.exit_code ?? "–"} · ${r.reason}` }),
        r.last_logs ? el("pre", { class: "logs", text: r.last_logs }) : null));
    }
    $("failures").replaceChildren(...items);
  }

  function renderQueues(data) {
    const q = data.queues;
    const pending = Object.entries(q.batch_pending).sort((a, b) => b[1] - a[1]);
    const perModel = pending.length
      ? el("div", { class: "table-wrap" }, el("table", { class: "grid", id: "pending" },
          el("thead", {}, el("tr", {}, el("th", { text: "Model" }),
                             el("th", { text: "Batch lines waiting" }))),
          el("tbody", {}, pending.map(([model, n]) => el("tr", { "data-model": model },
            el("td", { class: "model", text: model }), el("td", { class: "num", text: n }))))))
      : el("p", { class: "empty", text: "No batch lines waiting." });
    // Only the priorities that have messages: ten empty bars would say nothing.
    const priorities = Object.entries(q.batch_by_priority).filter(([, n]) => n > 0)
      .sort((a, b) => Number(b[0]) - Number(a[0]));
    const most = Math.max(1, ...priorities.map(([, n]) => n));
    const bars = priorities.length
      ? el("div", { class: "priority-bars", id: "priority-bars" },
          priorities.map(([priority, n]) => [
            el("span", { text: `priority ${priority}` }),
            progress(n, most, `priority ${priority}: ${n} messages`),
            el("span", { class: "num", text: String(n) }),
          ]))
      : el("p", { class: "empty", id: "priority-bars", text: "No messages waiting in it." });
    $("queues").replaceChildren(
      perModel,
      el("h3", { text: "Celery queue “batch” by priority (9 runs first)" }),
      bars,
      el("p", { class: "note", text:
        `Messages waiting: batch ${q.messages.batch}, control ${q.messages.control}, ` +
        `downloads ${q.messages.downloads}; delivered and not yet acknowledged ` +
        `(running, or waiting for an engine): ${q.unacked}.` }));
  }

  function renderDownloads(data) {
    const items = data.downloads || [];
    if (!items.length) {
      $("downloads").replaceChildren(el("p", { class: "empty", text:
        "No downloads or priming in progress." }));
      return;
    }
    $("downloads").replaceChildren(...items.map((d) => {
      const total = d.total_bytes || 0;
      const known = d.done_bytes !== null && d.done_bytes !== undefined;
      const done = d.done_bytes || 0;
      const label = `${d.kind} of ${d.model}: ` + (known ? `${bytes(done)} of ${bytes(total)}`
                                                         : d.state);
      // No value: the browser draws a bar that says "working" without claiming a fraction.
      const bar = known ? progress(done, total || 1, label)
                        : el("progress", { "aria-label": label, title: label });
      const facts = [known ? `${bytes(done)} of ${total ? bytes(total) : "?"}` : ""];
      if (d.rate_bytes_per_second) facts.push(`${bytes(d.rate_bytes_per_second)}/s`);
      if (d.eta_seconds) facts.push(`about ${duration(d.eta_seconds)} left`);
      if (d.finished_at) facts.push(`finished ${clock(d.finished_at)}`);
      if (d.error) facts.push(d.error);
      return el("div", { class: "item", "data-model": d.model, "data-kind": d.kind },
        el("div", { class: "head" }, el("span", { class: "model", text: d.model }),
           el("span", { text: d.kind === "prime" ? "priming (page cache)" : "download" }),
           badge(d.state)),
        bar,
        el("div", { class: "progress-text", text: facts.filter(Boolean).join(" · ") }));
    }));
  }

  function jobProgress(job) {
    const done = job.completed + job.failed;
    const text = job.total
      ? `${done} of ${job.total} done${job.failed ? `, ${job.failed} failed` : ""}`
      : "counting lines…";
    return el("td", {},
      progress(done, job.total || 1, `${job.id}: ${text}`),
      el("div", { class: "progress-text", text }));
  }

  function renderJobs(data) {
    fill($("batches").tBodies[0], data.jobs.batches.map((job) => el("tr", { "data-job": job.id },
      el("td", { class: "mono", text: job.id }),
      el("td", {}, badge(job.status)),
      el("td", { class: "num", text: String(job.priority) }),
      el("td", { text: job.owner || "" }),
      el("td", { text: clock(job.created_at) }),
      jobProgress(job))), 6, "No batches yet.");
    fill($("completions").tBodies[0], data.jobs.completions.map((job) =>
      el("tr", { "data-job": job.id },
        el("td", { class: "mono", text: job.id }),
        el("td", {}, badge(job.status)),
        el("td", { class: "model", text: job.model || "" }),
        el("td", { class: "num", text: String(job.priority) }),
        el("td", { text: clock(job.created_at) }),
        jobProgress(job))), 6, "No single batch completions yet.");
    fill($("eval-runs").tBodies[0], data.jobs.eval_runs.map((run) =>
      el("tr", { "data-job": run.id },
        el("td", { class: "mono", text: run.id }),
        el("td", { text: run.name || run.eval_id || "" }),
        el("td", {}, badge(run.status)),
        el("td", { class: "model", text: run.model || "" }),
        el("td", { class: "num", text: `${run.passed} / ${run.not_passed}` }),
        el("td", { text: clock(run.created_at) }),
        jobProgress(run))), 7, "No eval runs yet.");
  }

  function renderUpstreams(data) {
    const items = data.upstreams.map((u) => el("div", { class: "item", "data-model": u.model },
      el("span", { class: "model", text: u.model }), " ",
      badge(u.ok === false ? "failed" : (u.ok ? "ready" : "unchecked")), " ",
      el("span", { class: "muted mono", text: u.base_url }),
      u.error ? el("div", { class: "reason", text: u.error }) : null));
    $("upstreams").replaceChildren(...(items.length ? items
      : [el("p", { class: "empty", text: "None: every model runs here." })]));
  }

  function renderUsage(data) {
    const rows = (list, name) => list.map((u) => el("tr", { "data-usage": u[name] },
      el("td", { text: clock(u.start) }),
      el("td", { class: name === "model" ? "model" : "", text: u[name] }),
      el("td", { class: "num", text: String(u.requests) }),
      el("td", { class: "num", text: String(u.prompt_tokens) }),
      el("td", { class: "num", text: String(u.completion_tokens) })));
    fill($("usage-keys").tBodies[0], rows(data.usage.by_key, "key"), 5, "No usage yet.");
    fill($("usage-models").tBodies[0], rows(data.usage.by_model, "model"), 5, "No usage yet.");
  }

  function renderDecisions(data) {
    fill($("decisions").tBodies[0], data.decisions.map((d) => el("tr", {},
      el("td", { text: clock(d.at) }),
      el("td", {}, badge(d.action)),
      el("td", { class: "model", text: d.model || "" }),
      el("td", { class: "mono", text: d.instance || "" }),
      el("td", { class: "reason", text: d.reason || "" }))), 5,
      "No decisions yet: the autoscaler has had nothing to do.");
  }

  // -- charts (Chart.js, served by the app: no CDN) --------------------------------------------

  const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2",
                   "#ca8a04", "#db2777", "#4b5563", "#65a30d"];

  // A value with no neighbour draws no line: show it as a dot (a first call, a lone sample).
  function isolatedPoint(ctx) {
    const data = ctx.dataset && ctx.dataset.data;
    const i = ctx.dataIndex;
    const missing = (j) => j < 0 || j >= data.length || data[j] === null || data[j] === undefined;
    return Boolean(data) && !missing(i) && missing(i - 1) && missing(i + 1);
  }

  function makeChart(id, type, yTitle, stacked) {
    return new window.Chart($(id), {
      type,
      data: { labels: [], datasets: [] },
      options: {
        animation: false, responsive: true, maintainAspectRatio: false, spanGaps: true,
        interaction: { mode: "index", intersect: false },
        elements: { point: { radius: (ctx) => (isolatedPoint(ctx) ? 3 : 0) },
                    line: { borderWidth: 2 } },
        // Flat swatches: a dashed series shows as a dashed line, not a blob.
        plugins: { legend: { position: "bottom", labels: { boxWidth: 16, boxHeight: 3 } } },
        scales: {
          x: { stacked, ticks: { maxTicksLimit: 7, maxRotation: 0 } },
          y: { stacked, beginAtZero: true, title: { display: true, text: yTitle } },
        },
      },
    });
  }

  function setData(chart, labels, datasets) {
    chart.data.labels = labels;
    chart.data.datasets = datasets.map((d, i) => ({
      borderColor: PALETTE[i % PALETTE.length],
      backgroundColor: PALETTE[i % PALETTE.length],
      ...d,
    }));
    chart.update("none");
  }

  function renderCharts(series) {
    if (!window.Chart) return;
    if (charts === null) {
      charts = {
        rps: makeChart("chart-rps", "line", "calls / s", false),
        latency: makeChart("chart-latency", "line", "seconds", false),
        starts: makeChart("chart-starts", "bar", "per 10 s", true),
        queues: makeChart("chart-queues", "line", "waiting", false),
      };
    }
    const labels = series.t.map((t) => new Date(t * 1000)
      .toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false }));
    const byName = (group, suffix) => Object.entries(group).map(([name, data]) =>
      ({ label: suffix ? `${name} ${suffix}` : name, data }));
    setData(charts.rps, labels, byName(series.rps).concat(
      series.errors_per_s.some((v) => v > 0)
        ? [{ label: "answered ≥ 500", data: series.errors_per_s, borderDash: [4, 3] }] : []));
    setData(charts.latency, labels, [
      { label: "latency p50", data: series.latency_p50 },
      { label: "latency p95", data: series.latency_p95 },
      { label: "first token p50 (streams)", data: series.ttft_p50, borderDash: [4, 3] },
      { label: "first token p95 (streams)", data: series.ttft_p95, borderDash: [4, 3] },
    ]);
    setData(charts.starts, labels,
            byName(series.cold_starts, "start").concat(byName(series.wake_ups, "wake-up")));
    const celeryTotal = series.t.map((_, i) => {
      const values = Object.values(series.celery).map((v) => v[i]);
      return values.every((v) => v === null || v === undefined)
        ? null : values.reduce((a, b) => a + (b || 0), 0);
    });
    setData(charts.queues, labels, [
      { label: "batch lines waiting (all models)", data: series.pending_total },
      ...byName(series.pending, "lines"),
      { label: "Celery batch messages", data: celeryTotal, borderDash: [4, 3] },
    ]);
  }

  // -- start ----------------------------------------------------------------------------------

  function flowerLink() {
    const body = document.body;
    const url = body.dataset.flowerUrl ||
      `${window.location.protocol}//${window.location.hostname}:${body.dataset.flowerPort}/`;
    $("flower-link").href = url;
  }

  document.addEventListener("DOMContentLoaded", () => {
    flowerLink();
    $("auth-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("token-input").value.trim();
      if (!value) return;
      token = value;
      sessionStorage.setItem(TOKEN_KEY, token);
      lastSeriesAt = 0;
      setStatus("Checking the token…", false);
      refresh();
    });
    $("change-token").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      token = null;
      askForToken("Enter a token with the “monitor” scope.", false);
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && token && timer !== null) refresh();
    });
    if (token) {
      refresh();
    } else {
      askForToken("This dashboard needs an API token with the “monitor” scope. " +
                  "Enter it below, or open /dashboard?key=TOKEN.", false);
    }
  });
}());
