/** The counts strip: steps of the last day by status, and workers live. */

import { api } from "./api.js";
import { el } from "./dom.js";
import { coalesce } from "./live.js";

const STEP_BUCKETS = ["total", "pending", "running", "completed", "failed", "cancelled", "skipped"];

export function createCounts() {
  const strip = document.getElementById("counts");
  let stepStats = null;
  let workers = null;

  function tile(label, value, testid) {
    return el(
      "div",
      { class: "tile", "data-testid": testid },
      el("span", { class: "value" }, value ?? "—"),
      el("span", { class: "label" }, label),
    );
  }

  function render() {
    const tiles = [];
    if (stepStats) {
      for (const bucket of STEP_BUCKETS.filter((b) => b in stepStats)) {
        tiles.push(tile(`steps ${bucket} (24 h)`, stepStats[bucket] ?? 0, `count-steps-${bucket}`));
      }
    }
    if (workers) {
      const live = workers.filter((w) => w.status === "online" || w.status === "draining");
      tiles.push(tile("workers live", `${live.length}/${workers.length}`, "count-workers"));
    }
    strip.replaceChildren(...tiles);
  }

  async function refresh() {
    try {
      stepStats = (await api("/api/steps/stats?timeframe=day")).stats;
    } catch {
      stepStats = null;
    }
    render();
  }

  const refreshSoon = coalesce(refresh, 2000);

  return {
    refresh,
    setWorkers(list) {
      workers = list;
      render();
    },
    /** A snapshot's `counts` are the same step stats (the last day). */
    snapshot(snapshot) {
      if (snapshot.counts && typeof snapshot.counts.total === "number") {
        stepStats = snapshot.counts;
        render();
      }
    },
    apply(event) {
      if (event.type.startsWith("step_")) refreshSoon();
    },
  };
}
