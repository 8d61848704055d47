// Live loss chart on the Instance Unlearn LoRA node, fed by the node's unlearn.progress events.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "InstanceUnlearn_TrainLoRA";
const charts = new Map(); // node id -> chart state

function formatEta(seconds) {
  if (seconds == null) return "";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

function draw(chart) {
  const { canvas, forget, remember, status } = chart;
  const context = canvas.getContext("2d");
  const width = (canvas.width = canvas.clientWidth || 300);
  const height = (canvas.height = canvas.clientHeight || 140);
  context.fillStyle = "#1e1e1e";
  context.fillRect(0, 0, width, height);
  const values = [...forget, ...remember].filter(Number.isFinite);
  context.font = "11px sans-serif";
  context.fillStyle = "#ddd";
  context.fillText(status, 6, 14);
  if (!values.length) return;
  const low = Math.min(...values);
  const high = Math.max(...values);
  const span = high - low || 1;
  const total = Math.max(chart.total, 2);
  const line = (series, colour) => {
    context.strokeStyle = colour;
    context.lineWidth = 1.5;
    context.beginPath();
    series.forEach((value, i) => {
      const x = 6 + (i / (total - 1)) * (width - 12);
      const y = height - 6 - ((value - low) / span) * (height - 28);
      i ? context.lineTo(x, y) : context.moveTo(x, y);
    });
    context.stroke();
  };
  line(forget, "#ff6b6b");
  line(remember, "#4dabf7");
  context.fillStyle = "#ff6b6b";
  context.fillText("forget", width - 100, 14);
  context.fillStyle = "#4dabf7";
  context.fillText("remember", width - 56, 14);
}

function onProgress(event) {
  const data = event.detail;
  const chart = charts.get(String(data.node));
  if (!chart) return;
  if (data.step === 0) {
    chart.forget = [];
    chart.remember = [];
  }
  chart.total = data.total ?? chart.total;
  if (Number.isFinite(data.forget_loss)) chart.forget.push(data.forget_loss);
  if (Number.isFinite(data.remember_loss)) chart.remember.push(data.remember_loss);
  if (data.status === "done") chart.status = `done: ${chart.forget.length} steps`;
  else if (data.status === "failed") chart.status = `stopped: ${data.error ?? "error"}`;
  else chart.status = `step ${data.step}/${data.total}  ETA ${formatEta(data.eta_s)}`;
  chart.canvas.dataset.step = String(data.step ?? chart.forget.length);
  draw(chart);
}

app.registerExtension({
  name: "unlearn.LossChart",
  async setup() {
    api.addEventListener("unlearn.progress", onProgress);
  },
  async nodeCreated(node) {
    if (node.comfyClass !== NODE_TYPE) return;
    const canvas = document.createElement("canvas");
    canvas.className = "unlearn-loss-chart";
    canvas.style.width = "100%";
    canvas.style.height = "140px";
    const chart = { canvas, forget: [], remember: [], total: 0, status: "waiting for training" };
    charts.set(String(node.id), chart);
    node.addDOMWidget("loss_chart", "unlearn_loss_chart", canvas, { serialize: false, getMinHeight: () => 140 });
    requestAnimationFrame(() => draw(chart));
    const removed = node.onRemoved;
    node.onRemoved = function () {
      charts.delete(String(node.id));
      return removed?.apply(this, arguments);
    };
  },
});
