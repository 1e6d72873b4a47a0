// Refinery dashboard: draws every chart with Chart.js from JSON the server renders, and keeps a job's page live over
// its server-sent event stream. No drawing code of our own: Chart.js draws; this file only maps data to configs.
"use strict";

const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];
const TERMINAL = ["succeeded", "failed", "cancelled"];

// What the browser tests read: the status seen at page load and every status shown since, in this page load.
// statusShownAt: when (Unix ms) the page first showed each status, for bench/ui_latency.py.
window.refinery = {loadedAt: Date.now(), statusHistory: [], statusShownAt: {}};

function colour(index) {
  return PALETTE[index % PALETTE.length];
}

function chartConfig(spec) {
  const axisTitle = (text) => ({display: Boolean(text), text: text});
  const datasets = spec.datasets.map((set, index) => ({
    label: set.label,
    data: set.data,
    borderColor: colour(index),
    backgroundColor: spec.kind === "bar" ? colour(index) + "cc" : colour(index),
    pointRadius: spec.kind === "frontier" ? 5 : (set.data.length > 60 ? 0 : 2),
    pointStyle: set.point_only ? "rectRot" : "circle",
    borderWidth: 2,
    tension: 0,
    showLine: !set.point_only,
  }));
  const options = {
    responsive: true,
    maintainAspectRatio: false,
    animation: false,
    parsing: spec.kind === "bar" ? undefined : false,
    plugins: {
      title: {display: true, text: spec.title},
      legend: {display: datasets.length > 1, labels: {usePointStyle: spec.kind === "frontier"}},
      tooltip: spec.kind === "frontier" ? {callbacks: {label: (item) => `${item.raw.label}: ${(item.raw.y * 100).toFixed(2)}% at ${item.raw.x.toLocaleString()}`}} : {},
    },
    scales: {
      x: {type: spec.kind === "bar" ? "category" : (spec.x_log ? "logarithmic" : "linear"), title: axisTitle(spec.x_label)},
      y: {title: axisTitle(spec.y_label), beginAtZero: spec.kind === "bar"},
    },
  };
  if (spec.kind === "frontier") {
    datasets.forEach((set) => set.data.sort((a, b) => a.x - b.x));
  }
  return {type: spec.kind === "bar" ? "bar" : "line", data: {labels: spec.labels, datasets: datasets}, options: options};
}

function drawCharts(root) {
  root.querySelectorAll("canvas[data-chart]").forEach((canvas) => {
    if (window.Chart.getChart(canvas)) return;
    new window.Chart(canvas, chartConfig(JSON.parse(canvas.dataset.chart)));
  });
}

// ---- job page -----------------------------------------------------------------------------------------------

function metricSpec(chart) {
  return {kind: "line", title: chart.title, x_label: chart.x_label, y_label: chart.title, datasets: chart.datasets};
}

function drawMetrics(container, charts) {
  const empty = container.querySelector("#charts-empty");
  if (empty) empty.hidden = charts.length > 0;
  for (const chart of charts) {
    let canvas = container.querySelector(`canvas[data-metric="${CSS.escape(chart.title)}"]`);
    if (!canvas) {
      const figure = document.createElement("figure");
      figure.className = "chart";
      canvas = document.createElement("canvas");
      canvas.dataset.metric = chart.title;
      canvas.setAttribute("role", "img");
      canvas.setAttribute("aria-label", `${chart.title} per epoch`);
      figure.appendChild(canvas);
      container.appendChild(figure);
      new window.Chart(canvas, chartConfig(metricSpec(chart)));
      continue;
    }
    const drawn = window.Chart.getChart(canvas);
    const fresh = chartConfig(metricSpec(chart)).data.datasets;
    if (drawn.data.datasets.length !== fresh.length) {
      drawn.data.datasets = fresh;
    } else {
      fresh.forEach((set, index) => { drawn.data.datasets[index].data = set.data; });
    }
    drawn.update("none");
  }
}

function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  const minutes = Math.floor(seconds / 60);
  return `${minutes} min ${Math.round(seconds % 60)} s`;
}

function addEvent(tbody, event) {
  const row = document.createElement("tr");
  row.className = `level-${event.level}`;
  const when = new Date(event.created_at * 1000).toLocaleTimeString();
  for (const text of [when, event.type, event.message]) {
    const cell = document.createElement("td");
    cell.textContent = text;
    row.appendChild(cell);
  }
  tbody.appendChild(row);
  while (tbody.rows.length > 500) tbody.deleteRow(0);
  const scroller = tbody.closest(".scroll");
  if (scroller) scroller.scrollTop = scroller.scrollHeight;
}

function initJobPage(article) {
  const jobId = article.dataset.jobId;
  const base = `/ui/jobs/${encodeURIComponent(jobId)}`;
  const statusEl = document.getElementById("job-status");
  let shown = article.dataset.status;
  let finished = TERMINAL.includes(shown);
  let pending = null;
  window.refinery.statusHistory.push(shown);

  drawMetrics(document.getElementById("charts"), JSON.parse(document.getElementById("metrics-data").textContent));

  function showState(state) {
    if (state.status !== shown) {
      shown = state.status;
      statusEl.textContent = state.status;
      statusEl.className = `badge ${state.status}`;
      article.dataset.status = state.status;
      window.refinery.statusHistory.push(state.status);
      window.refinery.statusShownAt[state.status] = performance.timeOrigin + performance.now();
    }
    document.getElementById("job-attempt").textContent = `${state.attempt} of ${state.max_attempts}`;
    const fraction = state.status === "succeeded" ? 1 : state.progress.fraction;
    document.getElementById("job-progress").value = fraction;
    let text = `${(fraction * 100).toFixed(1)}%`;
    if (state.progress.total_steps) text += ` · step ${state.progress.step} of ${state.progress.total_steps}`;
    if (state.progress.eta_seconds && !state.terminal) text += ` · about ${formatSeconds(state.progress.eta_seconds)} left`;
    document.getElementById("job-progress-text").textContent = text;
    document.getElementById("job-budget").textContent = formatSeconds(state.budget.used_seconds);
    document.getElementById("job-duration").textContent = formatSeconds(state.duration);
    document.getElementById("job-stopped-by").textContent = state.stopped_by ? `stopped by: ${state.stopped_by}`
      : (state.cancel_requested && !state.terminal ? "cancel requested" : "");
    const error = document.getElementById("job-error");
    error.hidden = !state.error;
    if (state.error) error.textContent = `${state.error.code} (${state.error.class}): ${state.error.message}`;
    document.getElementById("cancel-form").hidden = state.terminal;
  }

  async function refresh() {
    pending = null;
    const [state, charts] = await Promise.all([
      fetch(`${base}/state`, {credentials: "same-origin"}).then((r) => r.json()),
      fetch(`${base}/metrics`, {credentials: "same-origin"}).then((r) => r.json()),
    ]);
    showState(state);
    drawMetrics(document.getElementById("charts"), charts);
    if (state.terminal && !finished) {
      finished = true;
      window.htmx.ajax("GET", `${base}/results`, {target: "#results", swap: "innerHTML"});
    }
    return state;
  }

  function soon() {
    if (!pending) pending = setTimeout(refresh, 50);  // one refresh for a burst of events
  }

  const live = document.getElementById("events-live");
  const events = new EventSource(`${base}/events`);
  events.onopen = () => { live.textContent = finished ? "" : "· live"; };
  events.onmessage = (message) => {
    addEvent(document.getElementById("events"), JSON.parse(message.data));
    if (!finished) soon();
  };
  events.addEventListener("end", () => {
    events.close();
    live.textContent = "";
    refresh();
  });
  events.onerror = () => { live.textContent = finished ? "" : "· reconnecting"; };
  // Progress moves between events (it rides on the worker's heartbeat): a slow poll while the job runs.
  const timer = setInterval(() => {
    if (finished) clearInterval(timer); else soon();
  }, 2000);
}

document.addEventListener("DOMContentLoaded", () => {
  window.htmx.onLoad((element) => drawCharts(element));
  const article = document.getElementById("job");
  if (article) initJobPage(article);
  const spec = document.getElementById("spec");
  if (spec && spec.dataset.errorParam) selectParam(spec, spec.dataset.errorParam);
});

// Put the cursor on the key a 422 names (e.g. "params.lr" selects "lr" inside "params") so it can be fixed at once.
function selectParam(textarea, param) {
  const parts = param.split(".");
  let from = 0;
  for (const part of parts) {
    if (/^\d+$/.test(part)) continue;
    const at = textarea.value.indexOf(`"${part}"`, from);
    if (at < 0) return;
    from = at;
  }
  const key = parts.filter((p) => !/^\d+$/.test(p)).pop();
  textarea.focus();
  textarea.setSelectionRange(from + 1, from + 1 + key.length);
}
document.addEventListener("htmx:afterSwap", (event) => {
  const spec = event.detail.target.querySelector && event.detail.target.querySelector("#spec");
  if (spec && spec.dataset.errorParam) selectParam(spec, spec.dataset.errorParam);
});
