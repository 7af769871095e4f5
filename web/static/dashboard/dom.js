/**
 * Building elements from server data. Text is always set as text (never parsed as
 * HTML), so a step id, a service name or an error message cannot inject markup.
 */

const SVG_NS = "http://www.w3.org/2000/svg";

function fill(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      node.addEventListener(name.slice(2), value);
    } else {
      node.setAttribute(name, value === true ? "" : String(value));
    }
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

/** An HTML element: `el("td", {class: "id", title: step.id}, shortId(step.id))`. */
export function el(tag, attrs = {}, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

/** An SVG element, built the same way. */
export function svg(tag, attrs = {}, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** Show `text` in a message paragraph, or hide it when `text` is empty. */
export function showMessage(node, text, kind = "error") {
  node.textContent = text || "";
  node.dataset.kind = kind;
  node.hidden = !text;
}

/** A status badge whose colour comes from its `data-status`. */
export function badge(status, testid) {
  return el("span", { class: "badge", "data-status": status, "data-testid": testid }, status);
}

export function setBadge(node, status) {
  node.dataset.status = status;
  node.textContent = status;
}

/** Pretty JSON inside a <pre>, or a dash. */
export function json(value) {
  if (value === null || value === undefined) return el("span", { class: "muted" }, "—");
  return el("pre", { class: "json" }, JSON.stringify(value, null, 2));
}

export function button(label, onclick, attrs = {}) {
  return el("button", { type: "button", ...attrs, onclick }, label);
}

/** A table head row of column titles. */
export function head(...titles) {
  return el("thead", {}, el("tr", {}, titles.map((title) => el("th", {}, title))));
}
