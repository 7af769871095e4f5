/**
 * Charts over time from `GET /api/stats/series`: steps finished by outcome, steps pending,
 * queue wait p50/p95 and permanent failures by error code, for the last hour or day.
 * Drawn with uPlot (vendored in ./vendor); read again every REFRESH_MS and on a window change.
 */

import uPlot from "./vendor/uPlot.esm.js";
import { api, explain, query } from "./api.js";
import { el, showMessage } from "./dom.js";

const REFRESH_MS = 15000;
const HEIGHT = 170;
const PALETTE = [
  "#d64545", "#2f6fde", "#e0a100", "#8b5cf6", "#1f9d55",
  "#e07b00", "#0e9aa7", "#b8336a", "#6b7280", "#7a5c00", "#3d5a80",
];

/** Each chart: its title, and how its series come out of the answer's buckets. */
const CHARTS = [
  {
    id: "throughput",
    title: "Steps finished per bucket",
    series: () => [
      { label: "completed", stroke: "#1f9d55", value: (b) => b.completed },
      { label: "failed", stroke: "#d64545", value: (b) => b.failed },
      { label: "cancelled", stroke: "#6b7280", value: (b) => b.cancelled },
    ],
  },
  {
    id: "pending",
    title: "Steps pending (queue depth)",
    series: () => [
      { label: "pending", stroke: "#e0a100", fill: "#e0a10022", value: (b) => b.pending },
    ],
  },
  {
    id: "wait",
    title: "Queue wait (s)",
    series: () => [
      { label: "p50", stroke: "#2f6fde", value: (b) => b.queue_wait_p50_s },
      { label: "p95", stroke: "#8b5cf6", value: (b) => b.queue_wait_p95_s },
    ],
  },
  {
    id: "failures",
    title: "Failures by error code",
    series: (answer) =>
      answer.failure_codes.map((code, i) => ({
        label: code,
        stroke: PALETTE[i % PALETTE.length],
        value: (b) => b.failures[code] ?? 0,
      })),
  },
];

export function createCharts() {
  const grid = document.getElementById("chart-grid");
  const message = document.querySelector("[data-testid=charts-message]");
  const toggle = document.getElementById("series-window");
  const drawn = new Map();
  let windowName = "hour";

  const boxes = new Map(
    CHARTS.map((chart) => {
      const plot = el("div", { class: "plot" });
      const box = el(
        "figure",
        { class: "chart", "data-testid": `chart-${chart.id}`, "data-chart": chart.id },
        el("figcaption", {}, chart.title),
        plot,
        el("p", { class: "muted empty", hidden: true }, "nothing in this window"),
      );
      grid.append(box);
      return [chart.id, { box, plot }];
    }),
  );

  function sizeOf(plot) {
    return { width: Math.max(200, Math.floor(plot.clientWidth)), height: HEIGHT };
  }

  function draw(answer) {
    const xs = answer.buckets.map((b) => Date.parse(b.start) / 1000);
    for (const chart of CHARTS) {
      const { box, plot } = boxes.get(chart.id);
      const series = chart.series(answer);
      const data = [xs, ...series.map((s) => answer.buckets.map((b) => s.value(b) ?? null))];
      const total = data.slice(1).flat().reduce((sum, v) => sum + (Number(v) || 0), 0);
      box.dataset.points = String(xs.length);
      box.dataset.total = String(Math.round(total * 1000) / 1000);
      box.querySelector(".empty").hidden = total > 0;
      const signature = `${answer.window}|${series.map((s) => s.label).join(",")}`;
      const known = drawn.get(chart.id);
      if (known && known.signature === signature) {
        known.plot.setData(data);
        continue;
      }
      if (known) known.plot.destroy();
      const options = {
        ...sizeOf(plot),
        scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max)] } },
        series: [
          {},
          ...series.map((s) => ({
            label: s.label,
            stroke: s.stroke,
            fill: s.fill,
            width: 1.5,
            points: { show: xs.length <= 100, size: 3 },
            spanGaps: chart.id === "wait",
          })),
        ],
        axes: [{}, { size: 44 }],
        legend: { live: true },
      };
      drawn.set(chart.id, { signature, plot: new uPlot(options, data, plot) });
    }
  }

  let fetchedAt = 0;

  async function refresh() {
    fetchedAt = Date.now();
    try {
      const answer = await api(`/api/stats/series${query({ window: windowName })}`);
      showMessage(message, "");
      if (answer.window === windowName) draw(answer); // not an answer for the other window
    } catch (error) {
      showMessage(message, `charts: ${explain(error)}`);
    }
  }

  toggle.addEventListener("click", (event) => {
    const choice = event.target.closest("button[data-window]");
    if (!choice || choice.dataset.window === windowName) return;
    windowName = choice.dataset.window;
    toggle.querySelectorAll("button").forEach((b) => {
      b.setAttribute("aria-pressed", String(b === choice));
    });
    refresh();
  });

  let resizing = 0;
  new ResizeObserver(() => {
    cancelAnimationFrame(resizing);
    resizing = requestAnimationFrame(() => {
      for (const [id, known] of drawn) known.plot.setSize(sizeOf(boxes.get(id).plot));
    });
  }).observe(grid);

  return {
    refresh,
    /** Called every few seconds by the page: reads the series again every REFRESH_MS. */
    tick() {
      if (!document.hidden && Date.now() - fetchedAt >= REFRESH_MS) refresh();
    },
    apply() {},
  };
}
