/**
 * The dashboard: the operator's key, the sections, and how they stay current:
 * live over /ws when it is up, a REST refresh every few seconds when it is not.
 */

import { apiKey, authEvents, setApiKey } from "./api.js";
import { createCharts } from "./charts.js";
import { createCounts } from "./counts.js";
import { showMessage } from "./dom.js";
import { createFleet } from "./fleet.js";
import { LiveFeed } from "./live.js";
import { createQueues } from "./queues.js";
import { createSteps } from "./steps.js";
import { createWorkflows } from "./workflows.js";

const TICK_MS = 5000;
const LIVE_REFRESH_TICKS = 6; // with the socket up, a safety refresh every 30 s

const authMessage = document.getElementById("auth-message");
const liveStatus = document.getElementById("live-status");
const keyInput = document.getElementById("api-key");

const live = new LiveFeed({
  onEvent: (event) => sections.forEach((section) => section.apply(event)),
  onSnapshot: (snapshot) => {
    fleet.snapshot(snapshot);
    queues.snapshot(snapshot);
    counts.snapshot(snapshot);
  },
  onState: (state, detail) => {
    liveStatus.dataset.state = state;
    const polling = state === "offline" && apiKey();
    liveStatus.textContent = polling ? `${detail || "offline"}; polling` : detail || state;
  },
  onSubscribed: () => refreshAll(),
  onError: (error) => {
    liveStatus.title = `Live updates: ${error.code || "error"} ${error.message || ""}`.trim();
    if (error.code === "RESUME_TRUNCATED") refreshAll();
  },
});

const counts = createCounts();
const steps = createSteps({ onShown: (ids) => live.follow({ step_ids: ids }) });
const workflows = createWorkflows({
  openStep: (id) => steps.open(id),
  onShown: (ids) => live.follow({ workflow_ids: ids }),
});
const fleet = createFleet({
  openStep: (id) => steps.open(id),
  onWorkers: (workers) => counts.setWorkers(workers),
});
const queues = createQueues();
const charts = createCharts();
const sections = [fleet, queues, steps, workflows, counts, charts];

let admin = false;

function refreshAll() {
  const shown = admin ? sections : sections.filter((section) => section !== fleet);
  // The charts read their series at their own pace (every 15 s).
  return Promise.allSettled(shown.map((s) => (s === charts ? s.tick() : s.refresh())));
}

let retryStart = null;

/** Load every section with the stored key, then go live (everything, for an admin key). */
async function start() {
  clearTimeout(retryStart);
  live.stop();
  if (!apiKey()) {
    showMessage(authMessage, "Enter an API key (an admin key for the fleet and actions).", "info");
    return;
  }
  showMessage(authMessage, "");
  const [fleetAnswer] = await Promise.all(sections.map((section) => section.refresh()));
  admin = fleetAnswer === true;
  if (fleetAnswer === null) {
    // Refused key: wait for another. Unreachable API: try again shortly.
    if (authMessage.hidden) retryStart = setTimeout(start, TICK_MS);
    return;
  }
  if (!admin) {
    const text = "This is not an admin key: the fleet and the live view of everything need one.";
    showMessage(authMessage, text, "info");
  }
  live.start(apiKey(), admin);
}

authEvents.addEventListener("unauthorized", () => {
  showMessage(authMessage, "The API key was refused (401 UNAUTHORIZED): enter a valid key above.");
  live.stop();
});

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  setApiKey(keyInput.value.trim());
  keyInput.value = "";
  keyInput.placeholder = apiKey() ? "key saved in this browser" : "admin key for fleet and actions";
  start();
});

document.getElementById("forget-key").addEventListener("click", () => {
  setApiKey("");
  keyInput.placeholder = "admin key for fleet and actions";
  start();
});

let ticks = 0;
setInterval(() => {
  if (!apiKey() || (!authMessage.hidden && authMessage.dataset.kind === "error")) return;
  ticks += 1;
  // A customer key follows only what is on screen, so new work shows up by polling.
  if (live.state !== "live" || !admin || ticks % LIVE_REFRESH_TICKS === 0) {
    refreshAll();
    return;
  }
  fleet.tick();
  // A queue becomes stranded with no event to say so: its ages are read every tick.
  queues.refresh();
  charts.tick();
}, TICK_MS);

if (apiKey()) keyInput.placeholder = "key saved in this browser";
start();
