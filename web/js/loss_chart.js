// Live loss chart on the Instance Unlearn LoRA node, fed by the node's unlearn.progress events
// (nodes/progress.py): forget and remember loss per step, step/total and the ETA, and a green mark
// at each forgetting check that found more targets gone (verified stopping).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODE_TYPE = "InstanceUnlearn_TrainLoRA";
const EVENT = "unlearn.progress";
const HEIGHT = 140;
const COLOURS = { forget: "#ff6b6b", remember: "#4dabf7", gone: "#51cf66", text: "#ddd", grid: "#333", background: "#1e1e1e" };
const charts = new WeakMap(); // node -> chart state (dropped with the node)

function formatEta(seconds) {
  if (!Number.isFinite(seconds)) return "";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

function formatLoss(value) {
  return Number.isFinite(value) ? value.toPrecision(3) : "–";
}

function draw(chart) {
  const { canvas, forget, remember } = chart;
  const scale = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 300;
  const height = canvas.clientHeight || HEIGHT;
  canvas.width = Math.round(width * scale);
  canvas.height = Math.round(height * scale);
  const context = canvas.getContext("2d");
  context.setTransform(scale, 0, 0, scale, 0, 0);
  context.fillStyle = COLOURS.background;
  context.fillRect(0, 0, width, height);
  context.font = "11px sans-serif";
  context.fillStyle = COLOURS.text;
  context.fillText(chart.status, 6, 14);
  const last = (series) => series[series.length - 1];
  context.fillStyle = COLOURS.forget;
  context.fillText(`forget ${formatLoss(last(forget))}`, 6, 28);
  context.fillStyle = COLOURS.remember;
  context.fillText(`remember ${formatLoss(last(remember))}`, 100, 28);
  const values = [...forget, ...remember].filter(Number.isFinite);
  if (!values.length) return;
  // Log scale when the losses span decades (early steps often dwarf the rest).
  const logScale = Math.min(...values) > 0 && Math.max(...values) / Math.min(...values) > 20;
  const scaled = (value) => (logScale ? Math.log10(value) : value);
  const low = Math.min(...values.map(scaled));
  const high = Math.max(...values.map(scaled));
  const span = high - low || 1;
  const top = 36;
  const total = Math.max(chart.total, forget.length, remember.length, 2);
  const x = (i) => 6 + (i / (total - 1)) * (width - 12);
  const y = (value) => height - 6 - ((scaled(value) - low) / span) * (height - top - 6);
  if (logScale) {
    context.fillStyle = COLOURS.text;
    context.fillText("log", width - 24, 28);
  }
  context.strokeStyle = COLOURS.grid;
  context.strokeRect(6, top, width - 12, height - top - 6);
  const line = (series, colour) => {
    context.strokeStyle = colour;
    context.lineWidth = 1.5;
    context.beginPath();
    series.forEach((value, i) => (i ? context.lineTo(x(i), y(value)) : context.moveTo(x(i), y(value))));
    context.stroke();
  };
  line(forget.filter(Number.isFinite), COLOURS.forget);
  line(remember.filter(Number.isFinite), COLOURS.remember);
  context.strokeStyle = COLOURS.gone;
  context.setLineDash([3, 3]);
  for (const step of chart.gone) {
    context.beginPath();
    context.moveTo(x(step - 1), top);
    context.lineTo(x(step - 1), height - 6);
    context.stroke();
  }
  context.setLineDash([]);
}

// Events carry the executing node's id; inside a subgraph it is a path "outer:inner". Looked up
// when an event arrives, because a node has no id yet when nodeCreated runs.
function chartFor(nodeId) {
  let graph = app.rootGraph ?? app.graph;
  let node = null;
  for (const part of String(nodeId).split(":")) {
    node = graph?.getNodeById(part);
    graph = node?.subgraph;
  }
  return node ? charts.get(node) : undefined;
}

function onProgress(event) {
  const data = event.detail ?? {};
  const chart = chartFor(data.node);
  if (!chart) return;
  if (data.step === 0) {
    chart.forget = [];
    chart.remember = [];
    chart.gone = [];
    chart.forgotten = 0;
  }
  if (Number.isFinite(data.total)) chart.total = data.total;
  if (Number.isFinite(data.forgotten)) {
    if (data.forgotten > chart.forgotten) chart.gone.push(data.step);
    chart.forgotten = data.forgotten;
    chart.canvas.dataset.forgotten = String(data.forgotten);
  }
  if (data.status === "done") {
    const verified = data.verification ? ` (${data.verification})` : "";
    chart.status = `done: ${chart.forget.length}/${chart.total} steps${verified}`;
  } else if (data.status === "failed") {
    chart.status = `stopped: ${data.error ?? "error"}`;
  } else {
    if (Number.isFinite(data.forget_loss)) chart.forget.push(data.forget_loss);
    if (Number.isFinite(data.remember_loss)) chart.remember.push(data.remember_loss);
    const eta = formatEta(data.eta_s);
    chart.status = `step ${data.step}/${data.total}${eta ? `  ETA ${eta}` : ""}`;
    chart.canvas.dataset.step = String(data.step);
  }
  chart.canvas.dataset.total = String(chart.total);
  chart.canvas.dataset.status = data.status ?? "running";
  chart.canvas.setAttribute("aria-label", `Loss chart: ${chart.status}`);
  draw(chart);
}

app.registerExtension({
  name: "unlearn.LossChart",
  async setup() {
    api.addEventListener(EVENT, onProgress);
  },
  async nodeCreated(node) {
    if (node.comfyClass !== NODE_TYPE) return;
    const canvas = document.createElement("canvas");
    canvas.className = "unlearn-loss-chart";
    canvas.style.width = "100%";
    canvas.style.height = `${HEIGHT}px`;
    canvas.dataset.status = "idle";
    canvas.setAttribute("role", "img");
    const chart = { canvas, forget: [], remember: [], gone: [], forgotten: 0, total: 0, status: "waiting for training" };
    canvas.setAttribute("aria-label", `Loss chart: ${chart.status}`);
    charts.set(node, chart);
    const widget = node.addDOMWidget("loss_chart", "unlearn_loss_chart", canvas, {
      serialize: false,
      getMinHeight: () => HEIGHT,
    });
    widget.serialize = false; // a view, not a value: keep it out of saved workflows too
    new ResizeObserver(() => draw(chart)).observe(canvas);
  },
});
