/**
 * Machines and their workers: status, GPU, current step, heartbeat, queues; drain/resume
 * of a worker, and removal of a machine (after the operator confirms it).
 */

import { api, ApiError, explain } from "./api.js";
import { badge, button, el, showMessage } from "./dom.js";
import { ago, gigabytes, localTime, shortId } from "./format.js";
import { coalesce } from "./live.js";

const FLEET_EVENTS = new Set([
  "worker_online",
  "worker_offline",
  "worker_status_changed",
  "step_assigned",
  "step_completed",
  "step_failed",
  "step_cancelled",
  "step_retrying",
]);

function queueCount(count) {
  if (!count) return "none";
  return count === 1 ? "1 queue" : `${count} queues`;
}

/** Workers grouped under their machines (machine facts from `known` where there are any). */
function groupByMachine(workers, known) {
  const facts = new Map(known.map((m) => [m.id, m]));
  const grouped = new Map();
  for (const worker of workers) {
    if (!grouped.has(worker.machine_id)) {
      const machine = facts.get(worker.machine_id) || { id: worker.machine_id };
      grouped.set(worker.machine_id, { ...machine, workers: [] });
    }
    grouped.get(worker.machine_id).workers.push(worker);
  }
  return [...grouped.values()];
}

export function createFleet({ openStep, onWorkers }) {
  const rows = document.getElementById("fleet-rows");
  const message = document.querySelector("[data-testid=fleet-message]");
  let machines = null;

  function workerRow(worker) {
    const caps = worker.capabilities || {};
    const queues = worker.queues || [];
    const current = worker.current_step_ids || [];
    const actions = el("td", { class: "row-actions" });
    if (worker.status === "online") {
      actions.append(actionButton(worker.id, "drain", "Drain"));
    } else if (worker.status === "draining") {
      actions.append(actionButton(worker.id, "resume", "Resume"));
    }
    return el(
      "tr",
      { "data-worker-id": worker.id, "data-testid": "worker-row" },
      el("td", { class: "id", title: `${worker.id} (pid ${worker.pid ?? "?"})` }, worker.id),
      el(
        "td",
        {},
        badge(worker.status, "worker-status"),
        worker.status_reason ? el("small", { class: "muted" }, ` ${worker.status_reason}`) : null,
      ),
      el("td", {}, caps.gpu_model || "—"),
      el("td", {}, gigabytes(caps.gpu_memory_gb)),
      el("td", {}, current.length ? current.map((id) => stepLink(id)) : "idle"),
      el(
        "td",
        { title: localTime(worker.last_heartbeat_at), "data-heartbeat": worker.last_heartbeat_at },
        ago(worker.last_heartbeat_at),
      ),
      el("td", { title: queues.join("\n") || "none" }, queueCount(queues.length)),
      el("td", { "data-testid": "worker-loaded" }, loadedText(worker.loaded_models)),
      actions,
    );
  }

  /** What the worker's backends hold now (warm placement), per service. */
  function loadedText(loaded) {
    const parts = Object.entries(loaded || {})
      .filter(([, models]) => models && models.length)
      .map(([service, models]) => `${service}: ${models.join(", ")}`);
    return parts.length ? parts.join("; ") : "—";
  }

  function stepLink(stepId) {
    return button(shortId(stepId), () => openStep(stepId), { class: "link id", title: stepId });
  }

  function actionButton(workerId, action, label) {
    return button(label, () => operate(workerId, action), {
      "data-testid": `worker-${action}`,
      "data-action": action,
    });
  }

  async function operate(workerId, action) {
    try {
      await api(`/api/workers/${encodeURIComponent(workerId)}/${action}`, {
        method: "POST",
        body: action === "drain" ? { reason: "drained from the dashboard" } : undefined,
      });
      await refresh();
    } catch (error) {
      showMessage(message, explain(error));
    }
  }

  function machineRow(machine, workers) {
    const online = workers.filter((w) => w.status === "online" || w.status === "draining").length;
    const gpus = [...new Set(workers.map((w) => (w.capabilities || {}).gpu_model).filter(Boolean))];
    const facts = [
      machine.hostname,
      `${online}/${workers.length} workers live`,
      gpus.join(", ") || "no GPU reported",
      `seen ${ago(machine.last_seen_at)}`,
    ].filter(Boolean);
    return el(
      "tr",
      { class: "machine", "data-machine-id": machine.id, "data-testid": "machine-row" },
      el(
        "th",
        { colspan: 9, scope: "rowgroup" },
        el("span", { class: "id" }, machine.id),
        " ",
        badge(online ? "online" : "offline", "machine-status"),
        el("small", { class: "muted" }, ` ${facts.join(" · ")}`),
        " ",
        button("Remove", () => removeMachine(machine, workers), {
          class: "danger",
          "data-testid": "machine-remove",
          title: "Take this machine out of the fleet (its running steps are re-queued)",
        }),
      ),
    );
  }

  /** DELETE /api/machines/{id} once the operator confirms; running steps go back to the queue. */
  async function removeMachine(machine, workers) {
    const running = workers.reduce((n, w) => n + (w.current_step_ids || []).length, 0);
    const question =
      `Remove machine ${machine.id} from the fleet? Its ${workers.length} worker(s) take nothing` +
      ` more` +
      (running ? ` and its ${running} running step(s) are re-queued for other workers.` : ".");
    if (!window.confirm(question)) return;
    try {
      const answer = await api(`/api/machines/${encodeURIComponent(machine.id)}`, {
        method: "DELETE",
      });
      const requeued = answer.requeued_step_ids || [];
      await refresh();
      const told = `Machine ${machine.id} removed; ${requeued.length} step(s) re-queued.`;
      showMessage(message, told, "info");
    } catch (error) {
      showMessage(message, `remove ${machine.id}: ${explain(error)}`);
    }
  }

  /** Draw machines, each with its `workers` (as /api/machines gives them). */
  function render(list) {
    machines = list;
    const body = [];
    for (const machine of machines) {
      const workers = machine.workers || [];
      body.push(machineRow(machine, workers), ...workers.map(workerRow));
    }
    if (!body.length) {
      body.push(el("tr", {}, el("td", { colspan: 9, class: "muted" }, "No machines registered.")));
    }
    rows.replaceChildren(...body);
    onWorkers(machines.flatMap((m) => m.workers || []));
  }

  /** Resolves to true for an admin key, false when the key may not see the fleet. */
  async function refresh() {
    try {
      const data = await api("/api/machines");
      showMessage(message, "");
      render(data.machines);
      return true;
    } catch (error) {
      const refused = "Machines and workers need an admin key (403 FORBIDDEN).";
      showMessage(message, error.status === 403 ? refused : explain(error));
      if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
        machines = null;
        rows.replaceChildren();
        onWorkers(null);
      }
      return error.status === 403 ? false : null;
    }
  }

  const refreshSoon = coalesce(refresh, 1000);

  return {
    refresh,
    /** Age the "last heartbeat" times without rebuilding rows (or their buttons). */
    tick() {
      rows.querySelectorAll("[data-heartbeat]").forEach((cell) => {
        cell.textContent = ago(cell.dataset.heartbeat);
      });
    },
    snapshot(snapshot) {
      const known = Array.isArray(snapshot.machines) ? snapshot.machines : machines || [];
      if (known.length && known.every((m) => Array.isArray(m.workers))) render(known);
      else if (Array.isArray(snapshot.workers)) render(groupByMachine(snapshot.workers, known));
    },
    apply(event) {
      if (FLEET_EVENTS.has(event.type) && (event.worker_id || event.type.startsWith("worker_"))) {
        refreshSoon();
      }
    },
  };
}
