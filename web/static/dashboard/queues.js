/** Queues: one per route (service, requirements, customer) with depth, running and consumers. */

import { api, explain } from "./api.js";
import { el, showMessage } from "./dom.js";
import { pairs } from "./format.js";
import { coalesce } from "./live.js";

export function createQueues() {
  const rows = document.getElementById("queue-rows");
  const message = document.querySelector("[data-testid=queues-message]");
  let shown = [];

  function row(queue) {
    const warnings = queue.warnings || [];
    return el(
      "tr",
      {
        "data-queue-name": queue.name,
        "data-testid": "queue-row",
        class: warnings.length ? "warn" : null,
      },
      el("td", { class: "id", title: queue.name }, queue.name),
      el("td", {}, queue.service),
      el("td", {}, queue.customer_id ?? "any"),
      el("td", { class: "mono" }, pairs(queue.requirements)),
      el("td", { class: "num", "data-testid": "queue-depth" }, queue.depth),
      el("td", { class: "num" }, queue.running),
      el("td", { class: "num", title: (queue.consumer_ids || []).join("\n") }, queue.consumers),
      el(
        "td",
        {},
        warnings.length
          ? el(
              "ul",
              { class: "warnings" },
              warnings.map((w) => el("li", { title: w.code }, w.message)),
            )
          : "—",
      ),
    );
  }

  function render(queues) {
    shown = queues;
    rows.replaceChildren(
      ...(queues.length
        ? queues.map(row)
        : [el("tr", {}, el("td", { colspan: 8, class: "muted" }, "No queues yet."))]),
    );
  }

  async function refresh() {
    try {
      const data = await api("/api/queues?all=true");
      showMessage(message, "");
      render(data.queues);
    } catch (error) {
      showMessage(message, explain(error));
    }
  }

  const refreshSoon = coalesce(refresh, 2000);

  return {
    refresh,
    /** A snapshot leaves idle queues out: keep those from the last full list. */
    snapshot(snapshot) {
      if (!Array.isArray(snapshot.queues)) return;
      const busy = new Map(snapshot.queues.map((q) => [q.name, q]));
      const merged = shown.map((q) => busy.get(q.name) || q);
      const listed = new Set(shown.map((q) => q.name));
      render([...merged, ...snapshot.queues.filter((q) => !listed.has(q.name))]);
    },
    apply(event) {
      if (event.type.startsWith("step_") || event.type.startsWith("worker_")) refreshSoon();
    },
  };
}
