/**
 * Steps: the filtered, paged list (newest first; by status, service, customer, worker,
 * error code and creation time), search by id or id prefix, and the detail panel
 * (progress, attempts, events); cancel and retry. Rows change in place as `step_*`
 * events arrive.
 */

import { api, explain, query } from "./api.js";
import { badge, button, el, head, json, setBadge, showMessage } from "./dom.js";
import { ago, duration, localTime, percent, secondsBetween, shortId } from "./format.js";
import { coalesce } from "./live.js";

const FINISHED = new Set(["completed", "failed", "cancelled", "skipped"]);
const RETRYABLE = new Set(["failed", "cancelled"]);
const PAGE_SIZE = 50;
const FULL_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const ID_PREFIX = /^[0-9a-f-]{4,36}$/i;
const COLUMNS = 12;

/** How long the latest attempt ran (so far, while it runs). */
function runTime(step) {
  if (!step.started_at) return null;
  if (step.status === "running" || step.status === "assigned") {
    return secondsBetween(step.started_at);
  }
  const ended = step.completed_at && Date.parse(step.completed_at);
  if (!ended || ended < Date.parse(step.started_at)) return null;
  return secondsBetween(step.started_at, step.completed_at);
}

/** How long the step waited for a worker (so far, while it is pending). */
function queueWait(step) {
  if (!step.queued_at) return null;
  if (step.status === "pending") return secondsBetween(step.queued_at);
  if (step.started_at && Date.parse(step.started_at) >= Date.parse(step.queued_at)) {
    return secondsBetween(step.queued_at, step.started_at);
  }
  return null;
}

/** A `datetime-local` input's value as an ISO time with its offset (UTC), or "". */
function isoFromLocal(value) {
  if (!value) return "";
  const time = new Date(value);
  return Number.isNaN(time.getTime()) ? "" : time.toISOString();
}

/** The status a step has after each event (`step_submitted` says it in its data). */
const STATUS_AFTER = {
  step_queued: "pending",
  step_assigned: "assigned",
  step_started: "running",
  step_progress: "running",
  step_retrying: "pending",
  step_completed: "completed",
  step_failed: "failed",
  step_cancelled: "cancelled",
  step_skipped: "skipped",
};

/** A copy of `step` with what `event` says about it. */
export function applyStepEvent(step, event) {
  const data = event.data || {};
  const next = { ...step, status: data.status || STATUS_AFTER[event.type] || step.status };
  if (event.type === "step_progress") {
    next.progress = data.progress ?? next.progress;
    next.stage = data.stage ?? null;
    next.message = data.message ?? null;
  } else if (event.type === "step_completed") {
    next.progress = 100;
    next.result = data.result ?? next.result;
  } else if (event.type === "step_failed" || event.type === "step_retrying") {
    next.error = data.error ?? next.error;
    if (event.type === "step_retrying") next.queued_at = data.retry_at ?? next.queued_at;
  } else if (event.type === "step_assigned") {
    next.worker_id = data.worker_id ?? event.worker_id ?? next.worker_id;
    next.machine_id = data.machine_id ?? event.machine_id ?? next.machine_id;
    next.attempts = data.attempt ?? next.attempts;
  }
  // Times the row's duration and queue wait are read from (the REST answer has them too).
  const at = Number.isFinite(event.timestamp) ? new Date(event.timestamp).toISOString() : null;
  if (at && event.type === "step_assigned") next.started_at = at; // a new attempt began
  if (at && event.type === "step_started" && !next.started_at) next.started_at = at;
  if (at && FINISHED.has(next.status) && STATUS_AFTER[event.type] === next.status) {
    next.completed_at = at;
  }
  next.eventTimestamp = event.timestamp;
  return next;
}

/** REST data, unless an event newer than it already moved the step on. */
function fresher(fetched, known) {
  if (known && known.eventTimestamp > Date.parse(fetched.updated_at)) {
    const live = pick(known, [
      "status",
      "progress",
      "stage",
      "message",
      "started_at",
      "completed_at",
      "eventTimestamp",
    ]);
    return { ...fetched, ...live };
  }
  return fetched;
}

function pick(object, names) {
  return Object.fromEntries(names.map((name) => [name, object[name]]));
}

export function createSteps({ onShown }) {
  const rows = document.getElementById("step-rows");
  const message = document.querySelector("[data-testid=steps-message]");
  const detail = document.getElementById("step-detail");
  const statusFilter = document.getElementById("step-status-filter");
  const serviceFilter = document.getElementById("step-service-filter");
  const customerFilter = document.getElementById("step-customer-filter");
  const workerFilter = document.getElementById("step-worker-filter");
  const errorFilter = document.getElementById("step-error-filter");
  const afterFilter = document.getElementById("step-after-filter");
  const beforeFilter = document.getElementById("step-before-filter");
  const search = document.getElementById("step-search");
  const olderButton = document.getElementById("steps-older");
  const known = new Map();
  let cursors = [null];
  let nextCursor = null;
  let opened = null;
  let idPrefix = "";

  // --- the list -----------------------------------------------------------------------

  function actionButtons(step) {
    return [
      button("Cancel", () => cancel(step.id), { "data-testid": "step-cancel" }),
      button("Retry", () => retry(step.id), { "data-testid": "step-retry" }),
    ];
  }

  function newRow(step) {
    return el(
      "tr",
      { "data-step-id": step.id, "data-testid": "step-row" },
      el(
        "td",
        {},
        button(shortId(step.id), () => open(step.id), { class: "link id", title: step.id }),
      ),
      el("td", { "data-field": "service" }),
      el("td", {}, badge(step.status, "step-status")),
      el(
        "td",
        { class: "progress-cell" },
        el("progress", { max: 100, value: 0, "data-testid": "step-progress" }),
        el("span", { class: "num", "data-testid": "step-progress-text" }),
      ),
      el("td", { class: "mono", "data-field": "error", "data-testid": "step-error-code" }),
      el("td", { class: "num", "data-field": "attempts" }),
      el("td", { class: "num", "data-field": "duration" }),
      el("td", { class: "num", "data-field": "wait" }),
      el("td", { "data-field": "customer" }),
      el("td", { class: "id", "data-field": "worker" }),
      el("td", { "data-field": "created" }),
      el("td", { class: "row-actions" }, actionButtons(step)),
    );
  }

  /** Update a row's cells in place, so elements a user (or a test) holds stay valid. */
  function fillRow(row, step) {
    row.querySelector("[data-field=service]").textContent = step.service;
    setBadge(row.querySelector("[data-testid=step-status]"), step.status);
    row.querySelector("[data-testid=step-progress]").value = Number(step.progress) || 0;
    row.querySelector("[data-testid=step-progress-text]").textContent = percent(step.progress);
    const error = row.querySelector("[data-field=error]");
    error.textContent = step.error ? step.error.code : "";
    error.title = step.error ? step.error.message : "";
    row.querySelector("[data-field=attempts]").textContent =
      `${step.attempts}/${(step.max_retries ?? 0) + 1}`;
    row.querySelector("[data-field=duration]").textContent = duration(runTime(step));
    row.querySelector("[data-field=wait]").textContent = duration(queueWait(step));
    row.querySelector("[data-field=customer]").textContent = step.customer_id;
    const worker = row.querySelector("[data-field=worker]");
    worker.textContent = step.worker_id || "—";
    worker.title = step.machine_id || "";
    const created = row.querySelector("[data-field=created]");
    created.textContent = ago(step.created_at);
    created.title = localTime(step.created_at);
    row.querySelector("[data-testid=step-cancel]").hidden = FINISHED.has(step.status);
    row.querySelector("[data-testid=step-retry]").hidden =
      !RETRYABLE.has(step.status) || Boolean(step.workflow_id);
    row.dataset.status = step.status;
  }

  function rowFor(stepId) {
    return rows.querySelector(`tr[data-step-id="${CSS.escape(stepId)}"]`);
  }

  function renderList(steps) {
    const existing = new Map();
    rows.querySelectorAll("tr[data-step-id]").forEach((r) => existing.set(r.dataset.stepId, r));
    const ordered = steps.map((step) => {
      const row = existing.get(step.id) || newRow(step);
      fillRow(row, step);
      return row;
    });
    if (!ordered.length) {
      ordered.push(el("tr", {}, el("td", { colspan: COLUMNS, class: "muted" }, "No steps match.")));
    }
    rows.replaceChildren(...ordered);
  }

  async function refresh() {
    const params = {
      status: statusFilter.value,
      service: serviceFilter.value.trim(),
      customer_id: customerFilter.value.trim(),
      worker_id: workerFilter.value.trim(),
      error_code: errorFilter.value.trim(),
      created_after: isoFromLocal(afterFilter.value),
      created_before: isoFromLocal(beforeFilter.value),
      id_prefix: idPrefix,
      limit: PAGE_SIZE,
      cursor: cursors.at(-1),
    };
    try {
      const data = await api(`/api/steps${query(params)}`);
      showMessage(message, "");
      const steps = data.steps.map((s) => fresher(s, known.get(s.id)));
      known.clear();
      steps.forEach((s) => known.set(s.id, s));
      nextCursor = data.next_cursor;
      olderButton.disabled = !nextCursor;
      renderList(steps);
      onShown(steps.map((s) => s.id));
      if (opened) refreshDetail();
    } catch (error) {
      showMessage(message, explain(error));
    }
  }

  const refreshSoon = coalesce(refresh, 1000);

  /** A full id opens the step; a shorter prefix (4+ characters) lists the steps it begins. */
  function searchFor(text) {
    if (FULL_ID.test(text)) {
      open(text.toLowerCase());
    } else if (ID_PREFIX.test(text)) {
      idPrefix = text.toLowerCase();
      cursors = [null];
      refresh();
    } else if (!text) {
      idPrefix = "";
      cursors = [null];
      refresh();
    } else {
      const hint = "Search by a full step id or its first 4 or more characters (0-9, a-f, -).";
      showMessage(message, hint);
    }
  }

  // --- actions --------------------------------------------------------------------------

  async function act(stepId, action, body) {
    try {
      const data = await api(`/api/steps/${encodeURIComponent(stepId)}/${action}`, {
        method: "POST",
        body,
      });
      showMessage(message, "");
      update(data.step);
    } catch (error) {
      showMessage(message, `${action} ${shortId(stepId)}: ${explain(error)}`);
    }
  }

  const cancel = (stepId) => act(stepId, "cancel", { reason: "cancelled from the dashboard" });
  const retry = (stepId) => act(stepId, "retry");

  /** Show a step's new state wherever it is on screen. */
  function update(step) {
    if (known.has(step.id)) known.set(step.id, step);
    const row = rowFor(step.id);
    if (row) fillRow(row, step);
    if (opened && opened.step.id === step.id) {
      opened.step = step;
      drawDetail();
    }
  }

  // --- the detail panel -----------------------------------------------------------------

  async function open(stepId) {
    try {
      const [stepData, attempts, events, logs] = await Promise.all([
        api(`/api/steps/${encodeURIComponent(stepId)}`),
        api(`/api/steps/${encodeURIComponent(stepId)}/attempts`),
        api(`/api/steps/${encodeURIComponent(stepId)}/events`),
        api(`/api/steps/${encodeURIComponent(stepId)}/logs`),
      ]);
      showMessage(message, "");
      opened = {
        step: fresher(stepData.step, known.get(stepId)),
        warnings: stepData.warnings || [],
        attempts: attempts.attempts,
        events: events.events,
        logs: logs.logs,
      };
      onShown([stepId]);
      drawDetail();
      detail.scrollIntoView({ block: "nearest" });
    } catch (error) {
      showMessage(message, `step ${stepId}: ${explain(error)}`);
    }
  }

  async function refreshDetail() {
    if (!opened) return;
    const stepId = opened.step.id;
    try {
      const [stepData, attempts, events, logs] = await Promise.all([
        api(`/api/steps/${encodeURIComponent(stepId)}`),
        api(`/api/steps/${encodeURIComponent(stepId)}/attempts`),
        api(`/api/steps/${encodeURIComponent(stepId)}/events`),
        api(`/api/steps/${encodeURIComponent(stepId)}/logs`),
      ]);
      if (!opened || opened.step.id !== stepId) return;
      opened.step = fresher(stepData.step, opened.step);
      opened.warnings = stepData.warnings || [];
      opened.attempts = attempts.attempts;
      opened.events = events.events;
      opened.logs = logs.logs;
      drawDetail();
    } catch {
      // The list's own refresh reports the API's state.
    }
  }

  const refreshDetailSoon = coalesce(refreshDetail, 1000);

  function field(label, value) {
    return [el("dt", {}, label), el("dd", {}, value ?? "—")];
  }

  function drawDetail() {
    const { step, warnings, attempts, events, logs } = opened;
    const stageText = [step.stage, step.message].filter(Boolean).join(" · ");
    const unfolded = [...detail.querySelectorAll("details")].map((d) => d.open);
    const actions = el("div", { class: "actions" });
    if (!FINISHED.has(step.status)) {
      actions.append(button("Cancel", () => cancel(step.id), { "data-testid": "detail-cancel" }));
    }
    if (RETRYABLE.has(step.status) && !step.workflow_id) {
      actions.append(button("Retry", () => retry(step.id), { "data-testid": "detail-retry" }));
    }
    const parts = [
      el(
        "header",
        {},
        el("h3", {}, "Step ", el("span", { class: "id", "data-testid": "detail-id" }, step.id)),
        button("×", close, { class: "close", title: "Close" }),
      ),
      el(
        "p",
        {},
        badge(step.status, "detail-status"),
        " ",
        el("progress", {
          max: 100,
          value: Number(step.progress) || 0,
          "data-testid": "detail-progress",
        }),
        " ",
        percent(step.progress),
        el("small", { class: "muted" }, ` ${stageText}`),
      ),
      actions,
      warnings.length
        ? el("ul", { class: "warnings" }, warnings.map((w) => el("li", {}, w.message)))
        : null,
      el(
        "dl",
        {},
        field("service", step.service),
        field("priority", step.priority),
        field("queue", step.queue),
        field("customer", step.customer_id),
        field("workflow", step.workflow_id ? `${step.workflow_id} (#${step.step_index})` : null),
        field("worker", step.worker_id ? `${step.worker_id} on ${step.machine_id}` : null),
        field("attempts", `${step.attempts} of ${(step.max_retries ?? 0) + 1}`),
        field("created", localTime(step.created_at)),
        field("started", localTime(step.started_at)),
        field("completed", localTime(step.completed_at)),
        field("correlation id", step.correlation_id),
      ),
      step.error
        ? el(
            "div",
            { class: "error-box", "data-testid": "detail-error" },
            `${step.error.code}: ${step.error.message}`,
          )
        : null,
      outputGallery(step.result),
      el("details", {}, el("summary", {}, "Payload"), json(step.payload)),
      el("details", {}, el("summary", {}, "Result"), json(step.result)),
      el("h4", {}, "Attempts"),
      el("div", { class: "scroll" }, attemptTable(attempts)),
      el("h4", {}, "Logs"),
      logList(logs || []),
      el("h4", {}, "Events"),
      eventList(events),
    ];
    detail.replaceChildren(...parts.filter(Boolean));
    detail.querySelectorAll("details").forEach((d, i) => {
      d.open = Boolean(unfolded[i]);
    });
    detail.hidden = false;
  }

  /** The step's stored outputs: a thumbnail for each image, a link for any other file. */
  function outputGallery(result) {
    const outputs = Array.isArray(result?.outputs) ? result.outputs : [];
    const files = outputs.filter((o) => typeof o?.url === "string" && /^https?:\/\//.test(o.url));
    if (!files.length) return null;
    return el(
      "div",
      { class: "outputs", "data-testid": "detail-outputs" },
      el("h4", {}, "Outputs"),
      files.map((output, n) => {
        const label = `${output.content_type ?? "file"}, ${sizeText(output.size_bytes)}`;
        const isImage = String(output.content_type ?? "").startsWith("image/");
        return el(
          "figure",
          { "data-output": n },
          el(
            "a",
            { href: output.url, target: "_blank", rel: "noopener noreferrer" },
            isImage
              ? el("img", {
                  src: output.url,
                  alt: `output ${n}`,
                  loading: "lazy",
                  width: 96,
                  height: output.width && output.height ? Math.round((96 * output.height) / output.width) : 96,
                })
              : `output ${n}`,
          ),
          el("figcaption", { class: "muted", title: output.key ?? "" }, label),
        );
      }),
    );
  }

  function sizeText(bytes) {
    const n = Number(bytes);
    if (!Number.isFinite(n)) return "size unknown";
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
    return `${(n / (1024 * 1024)).toFixed(1)} MB`;
  }

  function attemptTable(attempts) {
    if (!attempts.length) return el("p", { class: "muted" }, "No attempt yet.");
    return el(
      "table",
      { "data-testid": "detail-attempts" },
      head("#", "worker", "outcome", "started", "finished", "model", "error"),
      el(
        "tbody",
        {},
        attempts.map((a) =>
          el(
            "tr",
            { "data-attempt": a.attempt },
            el("td", { class: "num" }, a.attempt),
            el("td", { class: "id", title: a.machine_id || "" }, a.worker_id || "—"),
            el("td", {}, a.outcome ? badge(a.outcome) : "running"),
            el("td", {}, localTime(a.started_at)),
            el("td", {}, localTime(a.finished_at)),
            el("td", { "data-field": "cold-start" }, warmth(a)),
            el("td", {}, a.error ? `${a.error.code}: ${a.error.message}` : "—"),
          ),
        ),
      ),
    );
  }

  /** What the connector reported, per attempt (GET /api/steps/{id}/logs); text only. */
  function logList(logs) {
    if (!logs.length) return el("p", { class: "muted" }, "No log lines.");
    return el(
      "ol",
      { class: "events logs", "data-testid": "detail-logs" },
      logs.map((line) =>
        el(
          "li",
          { "data-attempt": line.attempt, "data-level": line.level },
          el("time", {}, new Date(line.timestamp).toLocaleTimeString()),
          ` #${line.attempt} `,
          el("strong", {}, line.level),
          " ",
          line.message,
        ),
      ),
    );
  }

  /** Whether the attempt had to load its model (warm placement), and how long it took. */
  function warmth(attempt) {
    if (attempt.cold_start === true) return `cold (${attempt.model_load_ms ?? "?"} ms load)`;
    if (attempt.cold_start === false) return "warm";
    return "—";
  }

  function eventList(events) {
    if (!events.length) return el("p", { class: "muted" }, "No events.");
    return el(
      "ol",
      { class: "events", "data-testid": "detail-events" },
      events.map((e) =>
        el(
          "li",
          { "data-event-id": e.id },
          el("time", {}, new Date(e.timestamp).toLocaleTimeString()),
          " ",
          el("strong", {}, e.type),
          " ",
          el("code", {}, JSON.stringify(e.data)),
        ),
      ),
    );
  }

  function close() {
    opened = null;
    detail.hidden = true;
    detail.replaceChildren();
  }

  // --- live ---------------------------------------------------------------------------

  function apply(event) {
    if (!event.type.startsWith("step_") || !event.step_id) return;
    const inDetail = opened && opened.step.id === event.step_id;
    const onScreen = known.get(event.step_id) || (inDetail ? opened.step : null);
    if (onScreen) {
      update(applyStepEvent(onScreen, event));
      if (inDetail && !opened.events.some((e) => e.id === event.id)) {
        opened.events.push(event);
        drawDetail();
        if (event.type !== "step_progress") refreshDetailSoon();
      }
    } else if (event.type === "step_submitted" && cursors.length === 1) {
      refreshSoon();
    }
  }

  // --- controls -------------------------------------------------------------------------

  document.getElementById("step-filters").addEventListener("submit", (e) => {
    e.preventDefault();
    cursors = [null];
    const text = search.value.trim();
    idPrefix = ID_PREFIX.test(text) && !FULL_ID.test(text) ? text.toLowerCase() : "";
    refresh();
  });
  document.getElementById("steps-newest").addEventListener("click", () => {
    cursors = [null];
    refresh();
  });
  olderButton.addEventListener("click", () => {
    if (!nextCursor) return;
    cursors.push(nextCursor);
    refresh();
  });
  const go = () => searchFor(search.value.trim());
  document.getElementById("step-search-go").addEventListener("click", go);
  search.addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      e.preventDefault();
      go();
    }
  });

  return { refresh, apply, open };
}
