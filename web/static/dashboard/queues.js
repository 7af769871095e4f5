/**
 * Queues: one per route (service, requirements, customer) with depth, oldest pending,
 * running and consumers; and, at the top of the page, a banner for every queue whose
 * pending steps do not move (stranded) or that no worker can serve (unserved).
 */

import { api, explain } from "./api.js";
import { button, el, showMessage } from "./dom.js";
import { duration, pairs } from "./format.js";
import { coalesce } from "./live.js";

/** The warnings the banner repeats, and what it calls them. */
const ALERTS = { STRANDED: "Stranded queue", NO_CAPABLE_WORKER: "Unserved queue" };

export function createQueues() {
  const rows = document.getElementById("queue-rows");
  const message = document.querySelector("[data-testid=queues-message]");
  const banner = document.getElementById("queue-alerts");
  let shown = [];

  function alert(queue, warning) {
    return el(
      "p",
      {
        class: "alert",
        "data-testid": "queue-alert",
        "data-code": warning.code,
        "data-queue-name": queue.name,
      },
      el("strong", {}, `${ALERTS[warning.code]}: `),
      `${queue.service} `,
      button(queue.name, () => reveal(queue.name), { class: "link id", title: "Show the queue" }),
      " — ",
      // A stranded warning says how many wait and for how long; an unserved one does not.
      warning.code === "STRANDED"
        ? null
        : `${queue.depth} pending, the oldest for ${duration(queue.oldest_pending_s)}: `,
      el("span", { class: "why" }, warning.message),
    );
  }

  function reveal(name) {
    const row = rows.querySelector(`tr[data-queue-name="${CSS.escape(name)}"]`);
    if (row) row.scrollIntoView({ block: "center" });
  }

  function renderBanner(queues) {
    const alerts = queues.flatMap((queue) =>
      (queue.warnings || []).filter((w) => w.code in ALERTS).map((w) => alert(queue, w)),
    );
    banner.replaceChildren(...alerts);
    banner.hidden = !alerts.length;
  }

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
      el(
        "td",
        { class: "num", "data-testid": "queue-oldest", title: queue.oldest_pending_at || "" },
        queue.depth ? duration(queue.oldest_pending_s) : "—",
      ),
      el("td", { class: "num" }, queue.running),
      el("td", { class: "num", title: (queue.consumer_ids || []).join("\n") }, queue.consumers),
      el(
        "td",
        {},
        warnings.length
          ? el(
              "ul",
              { class: "warnings" },
              warnings.map((w) =>
                el(
                  "li",
                  { title: w.code, "data-code": w.code },
                  el("strong", {}, `${w.code} `),
                  w.message,
                ),
              ),
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
        : [el("tr", {}, el("td", { colspan: 9, class: "muted" }, "No queues yet."))]),
    );
    renderBanner(queues);
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
