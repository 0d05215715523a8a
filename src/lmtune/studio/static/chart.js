// A small line chart on <canvas>: several series of [x, y] points, axes with round ticks, a legend.
// drawChart(canvas, series, {title, xLabel}) draws it; the canvas keeps its data and redraws on resize.
"use strict";

const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];

function niceTicks(lo, hi, count) {
  if (!isFinite(lo) || !isFinite(hi)) return [];
  if (hi === lo) { hi = lo + (Math.abs(lo) || 1); lo = lo - (Math.abs(lo) || 1) * 0; }
  const raw = (hi - lo) / Math.max(count, 1);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
  return ticks;
}

function fmtNum(v) {
  const a = Math.abs(v);
  if (a === 0) return "0";
  if (a >= 1e6 || a < 1e-3) return v.toExponential(1);
  if (a >= 1000) return (v / 1000).toFixed(a >= 1e4 ? 0 : 1) + "k";
  return +v.toPrecision(3) + "";
}

function drawChart(canvas, series, opts) {
  canvas._chart = {series, opts: opts || {}};
  const o = canvas._chart.opts;
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 400, hgt = canvas.clientHeight || 220;
  canvas.width = Math.round(w * dpr); canvas.height = Math.round(hgt * dpr);
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, hgt);
  g.font = "12px system-ui, sans-serif";
  const pts = series.flatMap(s => s.points).filter(p => isFinite(p[0]) && isFinite(p[1]));
  canvas.dataset.series = series.filter(s => s.points.length).length;
  canvas.dataset.points = pts.length;
  const pad = {l: 52, r: 14, t: o.title ? 26 : 10, b: 36};
  if (o.title) { g.fillStyle = "#111827"; g.font = "600 13px system-ui, sans-serif"; g.fillText(o.title, 12, 16);
    g.font = "12px system-ui, sans-serif"; }
  if (!pts.length) {
    g.fillStyle = "#9ca3af"; g.fillText(o.empty || "no data yet", 12, pad.t + 30); return;
  }
  let x0 = Math.min(...pts.map(p => p[0])), x1 = Math.max(...pts.map(p => p[0]));
  let y0 = Math.min(...pts.map(p => p[1])), y1 = Math.max(...pts.map(p => p[1]));
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const yPad = (y1 - y0) * 0.05; y0 -= yPad; y1 += yPad;
  const yTicks = niceTicks(y0, y1, 4);
  pad.l = Math.max(40, ...yTicks.map(t => g.measureText(fmtNum(t)).width + 14));  // room for the widest label
  const pw = w - pad.l - pad.r, ph = hgt - pad.t - pad.b;
  const X = x => pad.l + (x - x0) / (x1 - x0) * pw, Y = y => pad.t + (1 - (y - y0) / (y1 - y0)) * ph;
  g.strokeStyle = "#e5e7eb"; g.fillStyle = "#6b7280"; g.lineWidth = 1;
  g.textAlign = "right"; g.textBaseline = "middle";
  for (const t of yTicks) {
    g.beginPath(); g.moveTo(pad.l, Y(t)); g.lineTo(pad.l + pw, Y(t)); g.stroke(); g.fillText(fmtNum(t), pad.l - 6, Y(t));
  }
  g.textAlign = "center"; g.textBaseline = "top";
  for (const t of niceTicks(x0, x1, Math.max(2, Math.floor(pw / 80)))) {
    if (o.integerX && t % 1) continue;
    g.beginPath(); g.moveTo(X(t), pad.t + ph); g.lineTo(X(t), pad.t + ph + 4); g.stroke(); g.fillText(fmtNum(t), X(t), pad.t + ph + 6);
  }
  g.strokeStyle = "#9ca3af"; g.strokeRect(pad.l, pad.t, pw, ph);
  if (o.xLabel) { g.fillText(o.xLabel, pad.l + pw / 2, hgt - 14); }
  series.forEach((s, i) => {
    const color = s.color || PALETTE[i % PALETTE.length];
    const p = s.points.filter(q => isFinite(q[0]) && isFinite(q[1]));
    g.strokeStyle = color; g.fillStyle = color; g.lineWidth = 1.6;
    g.beginPath(); p.forEach((q, j) => j ? g.lineTo(X(q[0]), Y(q[1])) : g.moveTo(X(q[0]), Y(q[1]))); g.stroke();
    if (p.length < 40 || s.dots) p.forEach(q => { g.beginPath(); g.arc(X(q[0]), Y(q[1]), 2.5, 0, 7); g.fill(); });
  });
  if (series.length > 1 || o.legend) {  // legend, top right inside the plot
    g.textAlign = "left"; g.textBaseline = "middle";
    const names = series.map(s => s.name);
    const lw = Math.min(pw - 8, Math.max(...names.map(n => g.measureText(n).width)) + 26);
    let y = pad.t + 10;
    g.fillStyle = "rgba(255,255,255,0.85)"; g.fillRect(pad.l + pw - lw - 6, pad.t + 2, lw + 4, names.length * 16 + 4);
    names.forEach((n, i) => {
      g.fillStyle = series[i].color || PALETTE[i % PALETTE.length];
      g.fillRect(pad.l + pw - lw, y - 1, 14, 3);
      g.fillStyle = "#374151"; g.fillText(n.length > 40 ? "…" + n.slice(-39) : n, pad.l + pw - lw + 18, y);
      y += 16;
    });
  }
}

window.addEventListener("resize", () => {
  document.querySelectorAll("canvas").forEach(c => c._chart && drawChart(c, c._chart.series, c._chart.opts));
});
