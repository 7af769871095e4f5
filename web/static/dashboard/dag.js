/**
 * A workflow's DAG as inline SVG: steps in columns by dependency depth (a step
 * sits one column right of its deepest dependency), coloured by status.
 */

import { svg } from "./dom.js";
import { percent } from "./format.js";

const NODE_W = 150;
const NODE_H = 42;
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

function nodeLabel(step) {
  const service = step.service.length > 16 ? `${step.service.slice(0, 15)}…` : step.service;
  return `#${step.step_index} ${service}`;
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
  node.querySelector("title").textContent = `${step.step_id}\n${step.service}: ${nodeState(step)}`;
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
        svg("title", {}, `${step.step_id}\n${step.service}: ${nodeState(step)}`),
        svg("rect", { width: NODE_W, height: NODE_H, rx: 6 }),
        svg("text", { x: 8, y: 17, class: "label" }, nodeLabel(step)),
        svg("text", { x: 8, y: 33, class: "state" }, nodeState(step)),
      ),
    );
  }
  return svg(
    "svg",
    {
      id: "workflow-dag",
      "data-testid": "workflow-dag",
      width,
      height,
      viewBox: `0 0 ${width} ${height}`,
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
