/**
 * A workflow's DAG as inline SVG: steps in columns by dependency depth (a step
 * sits one column right of its deepest dependency), coloured by status, each node
 * labelled with the step's name (or service) and a hint of its payload. The drawing
 * fits the panel's width; the wheel, a drag or the buttons zoom and pan it.
 */

import { button, el, svg } from "./dom.js";
import { percent } from "./format.js";

const NODE_W = 170;
const NODE_H = 56;
const GAP_X = 56;
const GAP_Y = 14;
const PAD = 12;

/** Column of each step index: 0 without dependencies, else one past its deepest dependency. */
export function layers(details) {
  const depth = new Map();
  const byIndex = [...details].sort((a, b) => a.step_index - b.step_index);
  for (const step of byIndex) {
    const deps = (step.depends_on || []).map((i) => depth.get(i) ?? 0);
    depth.set(step.step_index, deps.length ? 1 + Math.max(...deps) : 0);
  }
  const columns = [];
  for (const step of byIndex) {
    const column = depth.get(step.step_index);
    (columns[column] ||= []).push(step);
  }
  // Order each column by where its dependencies sit, so edges cross less.
  const row = new Map();
  for (const column of columns) {
    const weight = (step) => {
      const deps = (step.depends_on || []).filter((i) => row.has(i));
      if (!deps.length) return step.step_index;
      return deps.reduce((sum, i) => sum + row.get(i), 0) / deps.length;
    };
    column.sort((a, b) => weight(a) - weight(b) || a.step_index - b.step_index);
    column.forEach((step, i) => row.set(step.step_index, i));
  }
  return columns;
}

function clip(text, length) {
  const flat = String(text).replace(/\s+/g, " ").trim();
  return flat.length > length ? `${flat.slice(0, length - 1)}…` : flat;
}

/** The step's own name (`metadata.name`), or its service. */
export function stepName(step) {
  const name = step.metadata && step.metadata.name;
  return typeof name === "string" && name.trim() ? name : step.service;
}

/** A short reminder of what the step does: its model, or the start of its prompt. */
export function payloadHint(payload) {
  if (!payload || typeof payload !== "object") return "";
  for (const key of ["model", "checkpoint", "prompt", "workflow_name", "url"]) {
    const value = payload[key];
    if (typeof value === "string" && value.trim()) {
      return key === "prompt" ? value : `${key} ${value}`;
    }
  }
  return "";
}

function nodeLabel(step) {
  return `#${step.step_index} ${clip(stepName(step), 19)}`;
}

function nodeState(step) {
  return step.status === "running" ? `running ${percent(step.progress)}` : step.status;
}

/** Show a step's new status (and progress) on its node. */
export function updateNode(drawing, step) {
  const node = drawing.querySelector(`g[data-step-index="${Number(step.step_index)}"]`);
  if (!node) return;
  node.dataset.status = step.status;
  node.querySelector(".state").textContent = nodeState(step);
  node.querySelector("title").textContent = nodeTitle(step);
}

function nodeTitle(step) {
  const hint = payloadHint(step.payload);
  return [`${step.step_id}`, `${stepName(step)} (${step.service}): ${nodeState(step)}`, hint]
    .filter(Boolean)
    .join("\n");
}

/** The SVG drawing; `onSelect(step)` is called when a node is clicked. */
export function drawDag(details, onSelect) {
  const columns = layers(details);
  const tallest = Math.max(1, ...columns.map((c) => c.length));
  const width = PAD * 2 + columns.length * NODE_W + Math.max(0, columns.length - 1) * GAP_X;
  const height = PAD * 2 + tallest * NODE_H + (tallest - 1) * GAP_Y;
  const at = new Map();
  columns.forEach((column, x) => {
    const offset = ((tallest - column.length) * (NODE_H + GAP_Y)) / 2;
    column.forEach((step, y) => {
      at.set(step.step_index, {
        x: PAD + x * (NODE_W + GAP_X),
        y: PAD + offset + y * (NODE_H + GAP_Y),
      });
    });
  });

  const edges = svg("g", { class: "edges" });
  const nodes = svg("g", { class: "nodes" });
  for (const step of details) {
    const to = at.get(step.step_index);
    for (const dependency of step.depends_on || []) {
      const from = at.get(dependency);
      if (!from) continue;
      const x1 = from.x + NODE_W;
      const y1 = from.y + NODE_H / 2;
      const x2 = to.x;
      const y2 = to.y + NODE_H / 2;
      const bend = (x2 - x1) / 2;
      edges.append(
        svg("path", {
          d: `M${x1},${y1} C${x1 + bend},${y1} ${x2 - bend},${y2} ${x2},${y2}`,
          "marker-end": "url(#dag-arrow)",
          "data-from": dependency,
          "data-to": step.step_index,
        }),
      );
    }
    nodes.append(
      svg(
        "g",
        {
          class: "node",
          "data-testid": "dag-node",
          "data-step-index": step.step_index,
          "data-step-id": step.step_id,
          "data-status": step.status,
          transform: `translate(${to.x},${to.y})`,
          tabindex: 0,
          onclick: () => onSelect(step),
        },
        svg("title", {}, nodeTitle(step)),
        svg("rect", { width: NODE_W, height: NODE_H, rx: 6 }),
        svg("text", { x: 8, y: 17, class: "label", "data-testid": "dag-label" }, nodeLabel(step)),
        svg(
          "text",
          { x: 8, y: 32, class: "hint", "data-testid": "dag-hint" },
          clip(payloadHint(step.payload), 24),
        ),
        svg("text", { x: 8, y: 48, class: "state" }, nodeState(step)),
      ),
    );
  }
  return svg(
    "svg",
    {
      id: "workflow-dag",
      "data-testid": "workflow-dag",
      "data-width": width,
      "data-height": height,
      viewBox: `0 0 ${width} ${height}`,
      preserveAspectRatio: "xMidYMin meet",
      role: "img",
      "aria-label": `workflow graph of ${details.length} steps`,
    },
    svg(
      "defs",
      {},
      svg(
        "marker",
        {
          id: "dag-arrow",
          viewBox: "0 0 10 10",
          refX: 10,
          refY: 5,
          markerWidth: 7,
          markerHeight: 7,
          orient: "auto",
        },
        svg("path", { d: "M0,0 L10,5 L0,10 z" }),
      ),
    ),
    edges,
    nodes,
  );
}

const MIN_SCALE = 0.05;
const MAX_SCALE = 4;

/**
 * The drawing in a box that fits it to the box's width (never wider), with zoom and pan:
 * the wheel zooms around the pointer, a drag pans, the buttons zoom in, out and fit.
 */
export function dagViewer(drawing) {
  const full = { w: Number(drawing.dataset.width), h: Number(drawing.dataset.height) };
  let view = { x: 0, y: 0, w: full.w, h: full.h };
  const frame = el("div", { class: "dag-frame", "data-testid": "dag-frame" }, drawing);

  function show() {
    drawing.setAttribute("viewBox", `${view.x} ${view.y} ${view.w} ${view.h}`);
    const shown = Math.min(full.w, frame.clientWidth || full.w);
    // The height follows the part shown, at the width it is shown at.
    const height = Math.max(40, Math.min(480, (shown * view.h) / view.w));
    drawing.style.height = `${Math.round(height)}px`;
    drawing.style.width = `${Math.round(shown)}px`;
    frame.dataset.scale = String(Math.round((shown / view.w) * 1000) / 1000);
  }

  function fit() {
    view = { x: 0, y: 0, w: full.w, h: full.h };
    show();
  }

  /** Zoom by `factor` (> 1: closer) around (fx, fy), fractions of the box shown. */
  function zoom(factor, fx = 0.5, fy = 0.5) {
    const shown = Math.min(full.w, frame.clientWidth || full.w);
    const scale = Math.min(MAX_SCALE, Math.max(MIN_SCALE, (shown / view.w) * factor));
    const w = shown / scale;
    const h = (view.h * w) / view.w;
    view = { x: view.x + (view.w - w) * fx, y: view.y + (view.h - h) * fy, w, h };
    show();
  }

  drawing.addEventListener(
    "wheel",
    (event) => {
      event.preventDefault();
      const box = drawing.getBoundingClientRect();
      const fx = (event.clientX - box.left) / box.width;
      const fy = (event.clientY - box.top) / box.height;
      zoom(event.deltaY < 0 ? 1.2 : 1 / 1.2, fx, fy);
    },
    { passive: false },
  );
  let drag = null;
  drawing.addEventListener("pointerdown", (event) => {
    if (event.target.closest(".node")) return;
    drag = { x: event.clientX, y: event.clientY, view: { ...view } };
    drawing.setPointerCapture(event.pointerId);
  });
  drawing.addEventListener("pointermove", (event) => {
    if (!drag) return;
    const box = drawing.getBoundingClientRect();
    const perPixel = view.w / box.width;
    view = {
      ...view,
      x: drag.view.x - (event.clientX - drag.x) * perPixel,
      y: drag.view.y - (event.clientY - drag.y) * perPixel,
    };
    show();
  });
  const release = () => {
    drag = null;
  };
  drawing.addEventListener("pointerup", release);
  drawing.addEventListener("pointercancel", release);

  const controls = el(
    "div",
    { class: "dag-controls", role: "group", "aria-label": "Zoom the graph" },
    button("+", () => zoom(1.5), { title: "Zoom in", "data-testid": "dag-zoom-in" }),
    button("−", () => zoom(1 / 1.5), { title: "Zoom out", "data-testid": "dag-zoom-out" }),
    button("Fit", fit, { title: "Fit to the width", "data-testid": "dag-fit" }),
  );
  const box = el("div", { class: "dag" }, controls, frame);
  new ResizeObserver(() => show()).observe(frame);
  requestAnimationFrame(fit);
  return box;
}
