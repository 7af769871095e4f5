/**
 * Live updates over `/ws`: subscribe, ask for a snapshot, and on a dropped
 * connection reconnect with backoff and resume after the last stream id seen,
 * so no event is missed or shown twice.
 */

const BACKOFF_MIN_MS = 1000;
const BACKOFF_MAX_MS = 30000;
const REMEMBERED_IDS = 5000;

/** Compare Redis stream ids ("<ms>-<seq>"). */
export function streamIdAfter(a, b) {
  if (!b) return true;
  const [aMs, aSeq] = String(a).split("-").map(Number);
  const [bMs, bSeq] = String(b).split("-").map(Number);
  return aMs > bMs || (aMs === bMs && aSeq > bSeq);
}

/** Run `fn` at most once per `ms`, however many times it is asked to (trailing call kept). */
export function coalesce(fn, ms) {
  let timer = null;
  let last = 0;
  return () => {
    if (timer) return;
    const wait = Math.max(0, last + ms - Date.now());
    timer = setTimeout(() => {
      timer = null;
      last = Date.now();
      fn();
    }, wait);
  };
}

export class LiveFeed {
  /**
   * `handlers`: onEvent(event), onSnapshot(message), onState(state, detail),
   * onSubscribed() once a connection is live (a refresh closes any gap before it),
   * onError(message).
   */
  constructor(handlers) {
    this.handlers = handlers;
    this.socket = null;
    this.key = "";
    this.admin = false;
    this.lastStreamId = null;
    this.seen = new Set();
    this.seenOrder = [];
    this.followed = { step_ids: new Set(), workflow_ids: new Set() };
    this.failures = 0;
    this.retryTimer = null;
    this.state = "offline";
  }

  start(key, admin) {
    this.stop();
    this.key = key;
    this.admin = admin;
    this.connect();
  }

  stop() {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    if (this.socket) {
      this.socket.onclose = null;
      this.socket.close();
      this.socket = null;
    }
    this.setState("offline", "");
  }

  /** Non-admin keys follow what is on screen instead of everything. */
  follow({ step_ids = [], workflow_ids = [] }) {
    if (this.admin) return;
    const steps = step_ids.filter((id) => !this.followed.step_ids.has(id));
    const flows = workflow_ids.filter((id) => !this.followed.workflow_ids.has(id));
    steps.forEach((id) => this.followed.step_ids.add(id));
    flows.forEach((id) => this.followed.workflow_ids.add(id));
    if (steps.length || flows.length) {
      this.send({ type: "subscribe", step_ids: steps, workflow_ids: flows, machine_ids: [] });
    }
  }

  requestSnapshot() {
    if (this.admin) this.send({ type: "snapshot" });
  }

  send(message) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(message));
    }
  }

  setState(state, detail) {
    this.state = state;
    this.handlers.onState(state, detail);
  }

  connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const url = `${scheme}://${location.host}/ws?token=${encodeURIComponent(this.key)}`;
    const resuming = this.lastStreamId !== null;
    this.setState("connecting", "connecting…");
    let socket;
    try {
      socket = new WebSocket(url);
    } catch {
      this.retry();
      return;
    }
    this.socket = socket;
    socket.onopen = () => {
      this.send(
        this.admin
          ? { type: "subscribe", step_ids: [], workflow_ids: [], machine_ids: [], all: true }
          : {
              type: "subscribe",
              step_ids: [...this.followed.step_ids],
              workflow_ids: [...this.followed.workflow_ids],
              machine_ids: [],
            },
      );
      if (resuming) this.send({ type: "resume", after: this.lastStreamId });
      this.requestSnapshot();
    };
    socket.onmessage = (message) => this.receive(message.data);
    socket.onclose = () => this.retry();
  }

  receive(raw) {
    let message;
    try {
      message = JSON.parse(raw);
    } catch {
      return;
    }
    if (message.type === "subscribed") {
      // Every subscribe is confirmed; the first one on a connection makes it live.
      if (this.state !== "live") {
        this.failures = 0;
        this.setState("live", "live");
        this.handlers.onSubscribed();
      }
    } else if (message.type === "snapshot") {
      this.handlers.onSnapshot(message);
    } else if (message.type === "error") {
      this.handlers.onError(message);
    } else if (message.id && message.data !== undefined) {
      this.deliver(message);
    }
  }

  deliver(event) {
    if (this.seen.has(event.id)) return;
    this.seen.add(event.id);
    this.seenOrder.push(event.id);
    if (this.seenOrder.length > REMEMBERED_IDS) this.seen.delete(this.seenOrder.shift());
    if (event.stream_id && streamIdAfter(event.stream_id, this.lastStreamId)) {
      this.lastStreamId = event.stream_id;
    }
    this.handlers.onEvent(event);
  }

  retry() {
    this.socket = null;
    const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** this.failures);
    const jittered = Math.round(delay * (0.5 + Math.random() / 2));
    this.failures += 1;
    this.setState("offline", `offline, retrying in ${Math.ceil(jittered / 1000)} s`);
    this.retryTimer = setTimeout(() => this.connect(), jittered);
  }
}
