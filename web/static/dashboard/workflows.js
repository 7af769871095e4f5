/**
 * Workflows: the paged list and the detail panel with the DAG and each
 * step's `step_details`; cancel. Nodes recolour as step events arrive.
 */

import { api, explain, query } from "./api.js";
import { dagViewer, drawDag, updateNode } from "./dag.js";
import { badge, button, el, head, setBadge, showMessage } from "./dom.js";
import { ago, localTime, percent, shortId } from "./format.js";
import { coalesce } from "./live.js";
import { applyStepEvent } from "./steps.js";

const FINISHED = new Set(["completed", "failed", "cancelled"]);
const EMPROPS_FOLLOW_MS = 2000;
const TERMINAL_EVENTS = {
  workflow_completed: "completed",
  workflow_failed: "failed",
  workflow_cancelled: "cancelled",
};
const PAGE_SIZE = 25;
const STEP_PAGES = 5; // 5 pages of 200: EMP_MAX_WORKFLOW_STEPS' default of 1000 steps

/** A copy of `workflow` with what `event` says about it. */
function applyWorkflowEvent(workflow, event) {
  const data = event.data || {};
  const next = { ...workflow };
  if (TERMINAL_EVENTS[event.type]) next.status = TERMINAL_EVENTS[event.type];
  if (typeof data.completed_steps === "number") next.completed_steps = data.completed_steps;
  if (typeof data.total_steps === "number") next.total_steps = data.total_steps;
  if (event.type.startsWith("step_") && next.status === "pending") next.status = "running";
  if (next.total_steps) {
    next.progress_percentage = (100 * next.completed_steps) / next.total_steps;
  }
  return next;
}

export function createWorkflows({ openStep, onShown }) {
  const rows = document.getElementById("workflow-rows");
  const message = document.querySelector("[data-testid=workflows-message]");
  const detail = document.getElementById("workflow-detail");
  const olderButton = document.getElementById("workflows-older");
  const known = new Map();
  let cursors = [null];
  let nextCursor = null;
  let opened = null;

  // --- the list -----------------------------------------------------------------------

  function newRow(workflow) {
    return el(
      "tr",
      { "data-workflow-id": workflow.id, "data-testid": "workflow-row" },
      el(
        "td",
        {},
        button(shortId(workflow.id), () => open(workflow.id), {
          class: "link id",
          title: workflow.id,
        }),
      ),
      el("td", { "data-field": "name" }),
      el("td", {}, badge(workflow.status, "workflow-status")),
      el("td", { class: "num", "data-field": "counts" }),
      el(
        "td",
        { class: "progress-cell" },
        el("progress", { max: 100, value: 0 }),
        el("span", { class: "num", "data-field": "percent" }),
      ),
      el("td", { "data-field": "created" }),
    );
  }

  /** Update a row in place, so elements a user (or a test) holds stay valid. */
  function fillRow(row, workflow) {
    const failed = workflow.failed_steps ? ` (${workflow.failed_steps} failed)` : "";
    row.classList.toggle("selected", Boolean(opened && opened.workflow.id === workflow.id));
    row.querySelector("[data-field=name]").textContent = workflow.name;
    setBadge(row.querySelector("[data-testid=workflow-status]"), workflow.status);
    row.querySelector("[data-field=counts]").textContent =
      `${workflow.completed_steps}/${workflow.total_steps}${failed}`;
    row.querySelector("progress").value = Number(workflow.progress_percentage) || 0;
    row.querySelector("[data-field=percent]").textContent = percent(workflow.progress_percentage);
    const created = row.querySelector("[data-field=created]");
    created.textContent = ago(workflow.created_at);
    created.title = localTime(workflow.created_at);
  }

  function rowFor(workflowId) {
    return rows.querySelector(`tr[data-workflow-id="${CSS.escape(workflowId)}"]`);
  }

  function renderList() {
    const ordered = [...known.values()].map((workflow) => {
      const row = rowFor(workflow.id) || newRow(workflow);
      fillRow(row, workflow);
      return row;
    });
    if (!ordered.length) {
      ordered.push(el("tr", {}, el("td", { colspan: 6, class: "muted" }, "No workflows yet.")));
    }
    rows.replaceChildren(...ordered);
  }

  async function refresh() {
    try {
      const params = query({ limit: PAGE_SIZE, cursor: cursors.at(-1) });
      const data = await api(`/api/workflows${params}`);
      showMessage(message, "");
      known.clear();
      data.workflows.forEach((w) => known.set(w.id, w));
      nextCursor = data.next_cursor;
      olderButton.disabled = !nextCursor;
      renderList();
      onShown(data.workflows.map((w) => w.id));
      if (opened) refreshDetail();
    } catch (error) {
      showMessage(message, explain(error));
    }
  }

  const refreshSoon = coalesce(refresh, 1500);

  // --- the detail panel -----------------------------------------------------------------

  /** Each step's name and payload hint for the DAG's labels (step_details carry neither). */
  const described = new Map();

  async function describeSteps(workflowId) {
    if (described.has(workflowId)) return described.get(workflowId);
    const found = new Map();
    let cursor = null;
    for (let page = 0; page < STEP_PAGES; page += 1) {
      const params = query({ workflow_id: workflowId, limit: 200, cursor });
      const data = await api(`/api/steps${params}`);
      data.steps.forEach((s) => found.set(s.id, { payload: s.payload, metadata: s.metadata }));
      cursor = data.next_cursor;
      if (!cursor) break;
    }
    described.clear(); // only the open workflow's are kept
    described.set(workflowId, found);
    return found;
  }

  async function fetchDetail(workflowId) {
    const [data, steps] = await Promise.all([
      api(`/api/workflows/${encodeURIComponent(workflowId)}`),
      describeSteps(workflowId).catch(() => new Map()),
    ]);
    return { workflow: data.workflow, steps: data.steps, described: steps };
  }

  async function open(workflowId) {
    try {
      opened = await fetchDetail(workflowId);
      showMessage(message, "");
      drawDetail();
      followEmprops();
      renderList();
      detail.scrollIntoView({ block: "nearest" });
    } catch (error) {
      showMessage(message, `workflow ${workflowId}: ${explain(error)}`);
    }
  }

  async function refreshDetail() {
    if (!opened) return;
    const workflowId = opened.workflow.id;
    try {
      const fresh = await fetchDetail(workflowId);
      if (opened && opened.workflow.id === workflowId) {
        opened = fresh;
        drawDetail();
        followEmprops();
      }
    } catch {
      // The list's own refresh reports the API's state.
    }
  }

  const refreshDetailSoon = coalesce(refreshDetail, 1000);

  /** No event says EmProps has heard: while an ended workflow's notification is on its way,
   * the open detail reads it again every EMPROPS_FOLLOW_MS. */
  let empropsTimer = null;
  function followEmprops() {
    clearTimeout(empropsTimer);
    const workflow = opened && opened.workflow;
    if (workflow && workflow.emprops && FINISHED.has(workflow.status)) {
      if (workflow.emprops.status === "waiting" || workflow.emprops.status === "pending") {
        empropsTimer = setTimeout(refreshDetail, EMPROPS_FOLLOW_MS);
      }
    }
  }

  async function cancel(workflowId) {
    try {
      const data = await api(`/api/workflows/${encodeURIComponent(workflowId)}/cancel`, {
        method: "POST",
        body: { reason: "cancelled from the dashboard" },
      });
      known.set(workflowId, data.workflow);
      renderList();
      await refreshDetail();
    } catch (error) {
      showMessage(message, `cancel ${shortId(workflowId)}: ${explain(error)}`);
    }
  }

  /** EmProps' job, and whether EmProps has heard how the workflow ended (replay: admins). */
  function empropsBox(workflow) {
    const state = workflow.emprops;
    const heard = state.notified_at
      ? `notified ${localTime(state.notified_at)}`
      : state.status === "waiting"
        ? "not notified yet (the workflow has not ended)"
        : `not notified (${state.status})`;
    return el(
      "div",
      { class: "emprops", "data-testid": "workflow-emprops" },
      el("strong", {}, "EmProps "),
      `job ${state.job_id}`,
      state.collection_id ? ` · collection ${state.collection_id}` : "",
      ` · ${heard} · ${state.attempts} attempt${state.attempts === 1 ? "" : "s"}`,
      state.last_error ? el("div", { class: "error-box" }, state.last_error) : null,
      FINISHED.has(workflow.status)
        ? button("Replay to EmProps", () => replayEmprops(workflow.id), {
            "data-testid": "workflow-emprops-replay",
            title: "Send EmProps the notification again (admin key)",
          })
        : null,
    );
  }

  async function replayEmprops(workflowId) {
    try {
      await api(`/api/workflows/${encodeURIComponent(workflowId)}/emprops/replay`, {
        method: "POST",
      });
      await refreshDetail();
    } catch (error) {
      showMessage(message, `replay ${shortId(workflowId)}: ${explain(error)}`);
    }
  }

  /** Redraw the panel; the DAG stays in place (and scrolled) while its steps are the same. */
  function drawDetail() {
    const { workflow, steps } = opened;
    const above = [
      el(
        "header",
        {},
        el("h3", {}, workflow.name, " ", el("span", { class: "id muted" }, workflow.id)),
        button("×", close, { class: "close", title: "Close" }),
      ),
      el(
        "p",
        {},
        badge(workflow.status, "workflow-detail-status"),
        ` ${workflow.completed_steps}/${workflow.total_steps} completed`,
        workflow.failed_steps ? `, ${workflow.failed_steps} failed` : "",
        ` · started ${localTime(workflow.started_at)}`,
        ` · finished ${localTime(workflow.completed_at)}`,
      ),
      FINISHED.has(workflow.status)
        ? null
        : el(
            "div",
            { class: "actions" },
            button("Cancel workflow", () => cancel(workflow.id), {
              "data-testid": "workflow-cancel",
            }),
          ),
      workflow.error
        ? el("div", { class: "error-box" }, [workflow.error.code, workflow.error.message].join(" "))
        : null,
      workflow.emprops ? empropsBox(workflow) : null,
    ].filter(Boolean);
    const below = stepTable(steps);
    const drawing = detail.querySelector("#workflow-dag");
    const sameGraph =
      drawing &&
      drawing.dataset.workflowId === workflow.id &&
      drawing.querySelectorAll("[data-testid=dag-node]").length === steps.length;
    if (sameGraph) {
      steps.forEach((step) => updateNode(drawing, step));
      const box = drawing.closest(".dag");
      [...detail.children].filter((child) => child !== box).forEach((child) => child.remove());
      box.before(...above);
      box.after(below);
    } else {
      const about = opened.described || new Map();
      const labelled = steps.map((step) => ({ ...step, ...(about.get(step.step_id) || {}) }));
      const fresh = drawDag(labelled, (step) => openStep(step.step_id));
      fresh.dataset.workflowId = workflow.id;
      detail.replaceChildren(...above, dagViewer(fresh), below);
    }
    detail.hidden = false;
  }

  /** Busy workflows send many events: draw at most once per frame. */
  let frame = 0;
  function drawDetailSoon() {
    if (frame) return;
    frame = requestAnimationFrame(() => {
      frame = 0;
      if (opened) drawDetail();
    });
  }

  function stepTable(steps) {
    return el(
      "div",
      { class: "scroll" },
      el(
      "table",
      { "data-testid": "workflow-steps" },
      head("#", "step", "service", "status", "progress", "needs", "worker"),
      el(
        "tbody",
        {},
        steps.map((step) =>
          el(
            "tr",
            { "data-step-index": step.step_index },
            el("td", { class: "num" }, step.step_index),
            el(
              "td",
              {},
              button(shortId(step.step_id), () => openStep(step.step_id), {
                class: "link id",
                title: step.step_id,
              }),
            ),
            el("td", {}, step.service),
            el(
              "td",
              {},
              badge(step.status),
              step.error
                ? el("small", { class: "muted", title: step.error.message }, ` ${step.error.code}`)
                : null,
            ),
            el("td", { class: "num" }, percent(step.progress)),
            el("td", {}, (step.depends_on || []).map((i) => `#${i}`).join(" ") || "—"),
            el("td", { class: "id" }, step.worker_id || "—"),
          ),
        ),
      ),
      ),
    );
  }

  function close() {
    opened = null;
    detail.hidden = true;
    detail.replaceChildren();
    renderList();
  }

  // --- live ---------------------------------------------------------------------------

  function apply(event) {
    if (!event.workflow_id) return;
    const listed = known.get(event.workflow_id);
    if (listed) {
      known.set(event.workflow_id, applyWorkflowEvent(listed, event));
      const row = rowFor(event.workflow_id);
      if (row) fillRow(row, known.get(event.workflow_id));
      refreshSoon();
    } else if (event.type === "workflow_submitted" && cursors.length === 1) {
      refreshSoon();
    }
    if (!opened || opened.workflow.id !== event.workflow_id) return;
    opened.workflow = applyWorkflowEvent(opened.workflow, event);
    const index = opened.steps.findIndex((s) => s.step_id === event.step_id);
    if (event.type.startsWith("step_") && index >= 0) {
      opened.steps[index] = applyStepEvent(opened.steps[index], event);
    }
    if (Array.isArray(event.data && event.data.step_details)) {
      opened.steps = event.data.step_details;
    }
    drawDetailSoon();
    if (event.type !== "step_progress") refreshDetailSoon();
  }

  // --- controls -------------------------------------------------------------------------

  document.getElementById("workflows-newest").addEventListener("click", () => {
    cursors = [null];
    refresh();
  });
  olderButton.addEventListener("click", () => {
    if (!nextCursor) return;
    cursors.push(nextCursor);
    refresh();
  });

  return { refresh, apply, open };
}
