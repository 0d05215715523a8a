// lmtune studio: one page, hash routes (#/runs, #/run?id=, #/new, #/compare, #/play, #/evaluate).
// Live data comes as server-sent events (EventSource); nothing is polled by reloading.
"use strict";

const main = document.getElementById("main");
let closers = [];  // event streams of the current page, closed when the page changes
let workspace = "";

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k in el && typeof v !== "string") el[k] = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined && kid !== false)
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  return el;
}

function put(el, ...kids) {  // replaceChildren, skipping the nulls of `cond ? h(...) : null`
  el.replaceChildren(...kids.flat().filter(k => k !== null && k !== undefined && k !== false));
}

async function api(path, body) {
  const r = await fetch(path, body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const data = await r.json().catch(() => ({error: `error: ${r.status} ${r.statusText}`}));
  if (!r.ok) throw new Error(data.error || (data.detail && JSON.stringify(data.detail)) || r.statusText);
  return data;
}

function stream(url, handlers) {
  const es = new EventSource(url);
  for (const [ev, fn] of Object.entries(handlers)) es.addEventListener(ev, e => fn(JSON.parse(e.data)));
  closers.push(() => es.close());
  return es;
}

function duration(s) {
  if (s === null || s === undefined) return "";
  s = Math.round(s);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor(s % 3600 / 60)).padStart(2, "0")}m`;
}
const num = v => (v === null || v === undefined) ? "" : (Math.abs(v) >= 1000 ? v.toFixed(0) : (+v.toPrecision(4)).toString());
// a model folder by its last two parts (the full path is the cell's title)
const shortModel = m => m && m.startsWith("/") ? "…/" + m.split("/").filter(Boolean).slice(-2).join("/") : m;
const badge = state => h("span", {class: `badge ${state}`}, state);
const params = () => new URLSearchParams(location.hash.split("?")[1] || "");
const runLink = id => h("a", {href: `#/run?id=${encodeURIComponent(id)}`}, id);

function progress(s) {
  const share = s.total ? Math.min(1, s.step / s.total) : 0;
  return h("div", {class: "progress", title: s.total ? `${s.step} of ${s.total}` : `${s.step}`},
    h("div", {class: "bar", style: `width:${(share * 100).toFixed(1)}%`}),
    h("span", {}, s.total ? `${s.step} / ${s.total}` : String(s.step)));
}

// ------------------------------------------------------------------------------------------
// Runs

function runsPage() {
  const tbody = h("tbody", {});
  const selected = new Set();
  const compare = h("a", {class: "button", href: "#/compare"}, "Compare selected");
  const table = h("table", {class: "runs"},
    h("thead", {}, h("tr", {}, ["", "Run", "Verb", "Model", "Task", "State", "Step", "Best validation", "Loss",
      "Wall time", "Started"].map(t => h("th", {class: ["Verb", "Task", "Started"].includes(t) ? "wide" : null}, t)))), tbody);
  put(main, 
    h("div", {class: "title"}, h("h1", {}, "Runs"), h("span", {class: "spacer"}), compare,
      h("a", {class: "button primary", href: "#/new"}, "New run")),
    h("div", {class: "scroll"}, table), h("p", {id: "runs-count", class: "muted"}));
  const render = rows => {
    put(tbody, ...rows.map(s => h("tr", {dataset: {id: s.id, state: s.state}},
      h("td", {}, h("input", {type: "checkbox", checked: selected.has(s.id), onchange: e => {
        e.target.checked ? selected.add(s.id) : selected.delete(s.id);
        compare.href = `#/compare?ids=${[...selected].map(encodeURIComponent).join(",")}`;
      }})),
      h("td", {class: "id"}, runLink(s.id)), h("td", {class: "wide"}, s.verb), h("td", {class: "model", title: s.model}, shortModel(s.model)),
      h("td", {class: "wide"}, s.task), h("td", {title: s.error || ""}, badge(s.state)), h("td", {}, progress(s)),
      h("td", {}, s.best === null ? "" : `${s.metric} ${num(s.best)}`), h("td", {}, num(s.loss)),
      h("td", {}, duration(s.wall_s)), h("td", {class: "muted wide"}, (s.started || "").replace("T", " ")))));
    document.getElementById("runs-count").textContent = rows.length ?
      `${rows.length} runs in ${workspace}` : `No runs in ${workspace} yet: start one from New run.`;
  };
  const initial = window.__initial; window.__initial = null;  // the list the page came with, used once
  (initial ? Promise.resolve(initial) : api("/api/runs")).then(data => {
    workspace = data.workspace; document.getElementById("workspace").textContent = workspace;
    render(data.runs);
    requestAnimationFrame(() => { window.__runsPainted = performance.now(); });
    stream("/api/runs/events", {runs: render});
  }).catch(showError);
}

// ------------------------------------------------------------------------------------------
// Run

const CHARTS = [
  ["loss", "training loss", r => r.loss],
  ["lr", "learning rate", r => r.lr],
  ["tokens_per_s", "tokens / s", r => r.tokens_per_s],
  ["val", "validation", null],
];

function seriesOf(rows) {
  const out = {};
  for (const [key, , get] of CHARTS) if (get) out[key] = [{name: key, points: rows.filter(r => get(r) !== undefined).map(r => [r.step, get(r)])}];
  const valKeys = [...new Set(rows.flatMap(r => Object.keys(r).filter(k => k.startsWith("val_"))))];
  out.val = valKeys.map(k => ({name: k, points: rows.filter(r => typeof r[k] === "number").map(r => [r.step, r[k]]), dots: true}));
  return out;
}

async function runPage() {
  const id = params().get("id");
  const data = await api(`/api/run?id=${encodeURIComponent(id)}`);
  let rows = data.metrics;
  const head = h("div", {class: "title"});
  const status = h("div", {class: "status"});
  const canvases = Object.fromEntries(CHARTS.map(([k]) => [k, h("canvas", {class: "chart", id: `chart-${k}`})]));
  const draw = () => { const s = seriesOf(rows); for (const [k, title] of CHARTS) drawChart(canvases[k], s[k],
    {title, xLabel: "step", integerX: true, empty: k === "val" ? "no validation yet" : "no steps yet"}); };
  const configTable = h("table", {class: "kv"}, Object.entries(data.config).map(([k, v]) =>
    h("tr", {}, h("th", {}, k), h("td", {}, typeof v === "object" ? JSON.stringify(v) : String(v)))));
  const log = h("pre", {class: "log"}, data.log);
  put(main, head, status,
    h("div", {class: "charts"}, Object.values(canvases)),
    h("section", {}, h("h2", {}, "Command that reproduces this run"),
      h("div", {class: "command"}, h("pre", {id: "command"}, data.command),
        h("button", {onclick: () => navigator.clipboard && navigator.clipboard.writeText(data.command)}, "Copy"))),
    h("section", {class: "two"},
      h("div", {}, h("h2", {}, "Resolved config (run.json)"), h("div", {class: "scroll tall"}, configTable)),
      h("div", {}, h("h2", {}, "Files"), h("p", {}, "Run folder: ", h("code", {}, data.folder)),
        data.best ? h("p", {}, "Best model: ", h("code", {}, data.best)) : null,
        h("p", {class: "muted"}, Object.entries(data.versions).map(([k, v]) => `${k} ${v}`).join(" · ")),
        h("h2", {}, "Log"), log)));
  const setStatus = s => {
    const running = s.state === "running";
    put(head, h("h1", {}, s.id), badge(s.state), h("span", {class: "spacer"}),
      running ? h("button", {id: "stop", class: "danger", onclick: async e => {
        e.target.disabled = true; e.target.textContent = "Stopping…";
        await api("/api/run/stop", {id}).catch(showError); }}, "Stop") : null,
      s.state === "stopped" || s.state === "failed" ? h("button", {id: "resume", class: "primary", onclick: async e => {
        e.target.disabled = true;
        try { await api("/api/run/resume", {id}); } catch (err) { showError(err); e.target.disabled = false; } }}, "Resume") : null,
      h("a", {class: "button", href: `#/new?from=${encodeURIComponent(id)}`}, "New run from this"),
      s.has_model ? h("a", {class: "button", href: `#/play?id=${encodeURIComponent(id)}`}, "Chat") : null,
      s.has_model ? h("a", {class: "button", href: `#/evaluate?id=${encodeURIComponent(id)}`}, "Evaluate") : null);
    put(status, progress(s),
      h("span", {}, `${s.verb} · ${s.model} · ${s.task}`),
      s.loss !== null ? h("span", {}, `loss ${num(s.loss)}`) : null,
      s.best !== null ? h("span", {}, `best ${s.metric} ${num(s.best)}`) : null,
      h("span", {}, `wall ${duration(s.wall_s)}`),
      s.eta_s !== null ? h("span", {id: "eta"}, `ETA ${duration(s.eta_s)}`) : null,
      s.error ? h("span", {class: "error-text"}, s.error) : null);
    if (!running) api(`/api/run?id=${encodeURIComponent(id)}`).then(d => { log.textContent = d.log; }).catch(() => {});
  };
  setStatus(data.summary); draw();
  stream(`/api/run/events?id=${encodeURIComponent(id)}`, {
    metrics: more => { rows = rows.concat(more); draw(); },
    reset: all => { rows = all; draw(); },
    status: setStatus,
  });
}

// ------------------------------------------------------------------------------------------
// Forms generated from the config dataclasses (New run, Evaluate)

function buildForm(schema, values, onChange) {
  const inputs = {};
  const fieldEl = f => {
    const v = values[f.name] !== undefined ? values[f.name] : f.default;
    let input;
    if (f.type === "bool") input = h("input", {type: "checkbox", name: f.name, checked: !!v});
    else if (f.choices) input = h("select", {name: f.name}, f.choices.map(c => h("option", {value: c, selected: String(v) === c}, c || "(none)")));
    else input = h("input", {type: "text", name: f.name, value: String(v), placeholder: f.required ? "required" : String(f.default),
      inputmode: f.type === "str" ? null : "decimal", spellcheck: "false"});
    inputs[f.name] = input;
    input.addEventListener("change", onChange);
    const range = [f.min !== null ? `≥ ${f.min}` : "", f.max !== null ? `≤ ${f.max}` : ""].filter(Boolean).join(", ");
    return h("label", {class: `field ${f.type}`, dataset: {field: f.name}},
      h("span", {class: "name"}, f.flag, f.required ? h("b", {class: "req"}, " *") : null,
        h("small", {class: "type"}, ` ${f.type}${range ? " " + range : ""}`)),
      input, h("small", {class: "help"}, f.help.replaceAll("%%", "%")));
  };
  const groups = schema.groups.map(g => g.main ?
    h("fieldset", {}, h("legend", {}, g.title), h("div", {class: "grid"}, g.fields.map(fieldEl))) :
    h("details", {}, h("summary", {}, `${g.title} (${g.fields.length})`), h("div", {class: "grid"}, g.fields.map(fieldEl))));
  const read = () => Object.fromEntries(Object.entries(inputs).map(([k, el]) => [k, el.type === "checkbox" ? el.checked : el.value]));
  return {el: h("div", {class: "form"}, groups), read, inputs};
}

function markField(form, message) {
  form.el.querySelectorAll(".field.bad").forEach(e => e.classList.remove("bad"));
  const m = /key '(\w+)'|setting ([\w, ]+):|--([\w-]+)/.exec(message || "");
  if (!m) return;
  const names = (m[1] || m[2] || m[3].replaceAll("-", "_")).split(/,\s*/);
  for (const n of names) {
    const el = form.el.querySelector(`.field[data-field="${n}"]`);
    if (el) { el.classList.add("bad"); el.closest("details") && (el.closest("details").open = true); }
  }
}

async function newRunPage() {
  const p = params();
  let verb = p.get("verb") || "finetune";
  let preset = {};
  if (p.get("from")) {
    const d = await api(`/api/run?id=${encodeURIComponent(p.get("from"))}`);
    verb = d.summary.verb || verb;
    preset = Object.fromEntries(Object.entries(d.config).filter(([k]) => !["out", "resume", "overwrite"].includes(k)));
  }
  const stamp = new Date().toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-");
  const data = await api("/api/runs");
  workspace = data.workspace;
  const schema = await api(`/api/form/${verb}`);
  const message = h("div", {id: "form-message", class: "message"});
  const command = h("pre", {id: "form-command", class: "muted"});
  const output = h("div", {id: "form-output"});
  const form = buildForm(schema, {out: `${workspace}/${verb}-${stamp}`, ...preset, ...Object.fromEntries(p)}, () => validate());
  const parallel = h("input", {type: "checkbox", id: "parallel"});
  const say = (text, bad) => { message.textContent = text; message.className = `message ${bad ? "error" : "ok"}`; };
  async function validate() {
    try {
      const r = await api("/api/validate", {verb, values: form.read()});
      say("valid", false); command.textContent = r.command; markField(form, ""); return true;
    } catch (e) { say(e.message, true); markField(form, e.message); command.textContent = ""; return false; }
  }
  const busy = async (button, fn) => {
    button.disabled = true; const text = button.textContent; button.textContent = text + "…";
    try { await fn(); } catch (e) { say(e.message, true); markField(form, e.message); }
    finally { button.disabled = false; button.textContent = text; }
  };
  const previewButton = h("button", {id: "preview", onclick: e => busy(e.target, async () => {
    const r = await api("/api/preview", {verb, values: form.read()});
    put(output, h("h2", {}, "Data preview"), h("p", {class: "muted"}, r.note),
      ...r.rows.map(row => row.tokens ? h("div", {class: "tokens"}, row.tokens.map(([t, loss]) =>
        h("span", {class: loss ? "tok loss" : "tok"}, t.replaceAll("\n", "↵\n"))), row.note ? h("em", {}, row.note) : null)
        : h("pre", {class: "tokens"}, JSON.stringify(row.fields, null, 1))));
    say("valid", false);
  })}, "Preview data");
  const estimateButton = h("button", {id: "estimate", onclick: e => busy(e.target, async () => {
    const r = (await api("/api/estimate", {verb, values: form.read()})).result;
    const mb = v => v >= 1024 ? `${(v / 1024).toFixed(2)} GB` : `${v.toFixed(0)} MB`;
    put(output, h("h2", {}, `Estimate: ${r.model}, ${r.steps} steps`),
      h("table", {class: "grid-table"}, h("tr", {}, ["LoRA", "checkpointing", "bf16", "peak memory", "step", "run"].map(t => h("th", {}, t))),
        r.variants.map(v => h("tr", {class: v.asked ? "asked" : ""}, h("td", {}, v.lora ? "yes" : "no"), h("td", {}, v.ckpt ? "yes" : "no"),
          h("td", {}, v.bf16 ? "yes" : "no"), h("td", {}, mb(v.peak_mb)),
          h("td", {}, `${v.step_s.toFixed(3)} s`), h("td", {}, v.run_s < 60 ? `${v.run_s.toFixed(1)} s` : duration(v.run_s))))),
      h("p", {class: "muted"}, "The highlighted row is the run as configured."));
    say("valid", false);
  })}, "Estimate");
  const launchButton = h("button", {id: "launch", class: "primary", onclick: e => busy(e.target, async () => {
    const r = await api("/api/launch", {verb, values: form.read(), parallel: parallel.checked});
    location.hash = `#/run?id=${encodeURIComponent(r.id)}`;
  })}, "Launch");
  put(main, 
    h("div", {class: "title"}, h("h1", {}, "New run"),
      h("select", {id: "verb", onchange: e => { location.hash = `#/new?verb=${e.target.value}`; }},
        ["finetune", "pretrain"].map(v => h("option", {value: v, selected: v === verb}, `lmtune ${v}`)))),
    h("p", {class: "muted"}, schema.summary, " The form is generated from the same config as ", h("code", {}, `lmtune ${verb} --help`), "."),
    form.el, message, command,
    h("div", {class: "actions"}, previewButton, estimateButton, launchButton,
      h("label", {class: "inline"}, parallel, " run in parallel with another run of this model")),
    output);
}

// ------------------------------------------------------------------------------------------
// Compare

async function comparePage() {
  const chosen = new Set((params().get("ids") || "").split(",").filter(Boolean));
  const {runs} = await api("/api/runs");
  const cache = {};
  const canvas = h("canvas", {class: "chart big", id: "compare-chart"});
  const valCanvas = h("canvas", {class: "chart", id: "compare-val"});
  const table = h("tbody", {});
  async function redraw() {
    for (const id of chosen) if (!cache[id]) cache[id] = (await api(`/api/run?id=${encodeURIComponent(id)}`)).metrics;
    const ids = [...chosen];
    drawChart(canvas, ids.map(id => ({name: id, points: cache[id].filter(r => "loss" in r).map(r => [r.step, r.loss])})),
      {title: "training loss", xLabel: "step", integerX: true, legend: true, empty: "tick runs on the left"});
    drawChart(valCanvas, ids.map(id => ({name: id, dots: true, points: cache[id].filter(r => "val_loss" in r).map(r => [r.step, r.val_loss])})),
      {title: "validation loss", xLabel: "step", integerX: true, legend: true, empty: "no validation in these runs"});
    const s = Object.fromEntries(runs.map(r => [r.id, r]));
    put(table, ...ids.map(id => h("tr", {}, h("td", {}, runLink(id)), h("td", {title: s[id] ? s[id].model : ""}, s[id] ? shortModel(s[id].model) : ""),
      h("td", {}, s[id] ? badge(s[id].state) : ""), h("td", {}, s[id] ? num(s[id].loss) : ""),
      h("td", {}, s[id] && s[id].best !== null ? `${s[id].metric} ${num(s[id].best)}` : ""), h("td", {}, s[id] ? duration(s[id].wall_s) : ""))));
  }
  put(main, h("div", {class: "title"}, h("h1", {}, "Compare runs")),
    h("div", {class: "side"},
      h("div", {class: "picker"}, runs.filter(r => r.step > 0).map(r => h("label", {class: "inline", dataset: {id: r.id}},
        h("input", {type: "checkbox", checked: chosen.has(r.id), onchange: e => {
          e.target.checked ? chosen.add(r.id) : chosen.delete(r.id);
          history.replaceState(null, "", `#/compare?ids=${[...chosen].map(encodeURIComponent).join(",")}`); redraw().catch(showError);
        }}), " ", r.id))),
      h("div", {}, canvas, valCanvas,
        h("table", {class: "grid-table"}, h("thead", {}, h("tr", {}, ["run", "model", "state", "last loss", "best", "wall"].map(t => h("th", {}, t)))), table))));
  await redraw();
}

// ------------------------------------------------------------------------------------------
// Playground: chat (streamed) or classify, through `lmtune serve`'s own app under /play/ID/v1

async function playPage() {
  const {runs} = await api("/api/runs");
  const models = runs.filter(r => r.has_model);
  const id = params().get("id") || (models[0] && models[0].id);
  const select = h("select", {id: "play-run", onchange: e => { location.hash = `#/play?id=${encodeURIComponent(e.target.value)}`; }},
    models.map(r => h("option", {value: r.id, selected: r.id === id}, `${r.id} (${r.task || r.verb})`)));
  const head = h("div", {class: "title"}, h("h1", {}, "Playground"), select);
  if (!id) { put(main, head, h("p", {class: "muted"}, "No run has a saved model yet.")); return; }
  const run = models.find(r => r.id === id) || {};
  const base = `/play/${id.split("/").map(encodeURIComponent).join("/")}/v1`;
  if (run.task === "classify") {
    const text = h("textarea", {id: "classify-text", rows: 3, placeholder: "Text to classify"});
    const out = h("div", {id: "classify-out"});
    put(main, head, text, h("div", {class: "actions"}, h("button", {class: "primary", onclick: async () => {
      try {
        const r = await api(`${base}/classify`, {input: text.value});
        const probs = r.data[0].probabilities || {};
        put(out, h("p", {}, "label: ", h("b", {}, r.data[0].label)),
          h("table", {class: "grid-table"}, Object.entries(probs).map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", {}, v.toFixed(3))))));
      } catch (e) { showError(e); }
    }}, "Classify")), out);
    return;
  }
  const messages = [];
  const log = h("div", {class: "chat", id: "chat-log"});
  const input = h("textarea", {id: "chat-input", rows: 2, placeholder: "Message (Enter sends, Shift+Enter: new line)"});
  const maxTokens = h("input", {type: "text", id: "chat-max", value: "64", size: 4});
  const temperature = h("input", {type: "text", id: "chat-temp", value: "0", size: 4});
  async function send() {
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    messages.push({role: "user", content: text});
    log.append(h("div", {class: "msg user"}, text));
    const reply = h("div", {class: "msg assistant", dataset: {chunks: 0}});
    log.append(reply);
    try {
      const r = await fetch(`${base}/chat/completions`, {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({messages, stream: true, max_tokens: +maxTokens.value, temperature: +temperature.value})});
      if (!r.ok) throw new Error(((await r.json()).error || {}).message || r.statusText);
      const reader = r.body.getReader(), dec = new TextDecoder();
      let buf = "", full = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buf += dec.decode(value, {stream: true});
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const line = buf.slice(0, cut).replace(/^data: /, ""); buf = buf.slice(cut + 2);
          if (line === "[DONE]") continue;
          const delta = (JSON.parse(line).choices[0].delta || {}).content || "";
          if (delta) { full += delta; reply.textContent = full; reply.dataset.chunks = +reply.dataset.chunks + 1; log.scrollTop = log.scrollHeight; }
        }
      }
      reply.dataset.done = "1";
      messages.push({role: "assistant", content: full});
    } catch (e) { reply.classList.add("error-text"); reply.textContent = String(e.message); reply.dataset.done = "1"; }
  }
  input.addEventListener("keydown", e => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } });
  put(main, head,
    h("p", {class: "muted"}, "Streams from ", h("code", {}, `${base}/chat/completions`), " — the same app as lmtune serve."),
    log, h("div", {class: "chat-input"}, input, h("button", {id: "chat-send", class: "primary", onclick: send}, "Send")),
    h("div", {class: "actions"}, h("label", {class: "inline"}, "max tokens ", maxTokens), h("label", {class: "inline"}, "temperature ", temperature),
      h("button", {onclick: () => { messages.length = 0; put(log, ); }}, "Reset")));
}

// ------------------------------------------------------------------------------------------
// Evaluate

async function evaluatePage() {
  const p = params();
  const {runs} = await api("/api/runs");
  const schema = await api("/api/form/evaluate");
  const run = runs.find(r => r.id === p.get("id"));
  const detail = run ? await api(`/api/run?id=${encodeURIComponent(run.id)}`) : null;
  const preset = detail ? {model: detail.folder, task: detail.config.task || "", data: detail.config.eval_data || detail.config.data || "",
    max_length: String(detail.config.max_length || 512)} : {};
  const form = buildForm(schema, preset, () => {});
  const message = h("div", {class: "message", id: "eval-message"});
  const out = h("div", {id: "eval-out"});
  const go = h("button", {id: "eval-run", class: "primary", onclick: async e => {
    e.target.disabled = true; message.textContent = "scoring…"; message.className = "message";
    try {
      const r = (await api("/api/evaluate", {verb: "evaluate", values: form.read()})).result;
      message.textContent = ""; markField(form, "");
      const scalars = Object.entries(r).filter(([, v]) => typeof v !== "object");
      put(out, h("h2", {}, "Metrics"), h("table", {class: "grid-table", id: "eval-metrics"},
        scalars.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, typeof v === "number" ? num(v) : String(v))))),
        r.per_class ? h("div", {}, h("h2", {}, "Per class"), h("table", {class: "grid-table"},
          h("tr", {}, ["label", "precision", "recall", "f1", "support"].map(t => h("th", {}, t))),
          Object.entries(r.per_class).map(([k, c]) => h("tr", {}, h("td", {}, k), [c.precision, c.recall, c.f1, c.support].map(v => h("td", {}, num(v))))))) : null,
        r.confusion_matrix ? confusion(r.confusion_matrix, r.labels || Object.keys(r.per_class || {})) : null);
    } catch (err) { message.textContent = err.message; message.className = "message error"; markField(form, err.message); }
    finally { e.target.disabled = false; }
  }}, "Evaluate");
  put(main, h("div", {class: "title"}, h("h1", {}, "Evaluate"),
    h("select", {onchange: e => { location.hash = `#/evaluate?id=${encodeURIComponent(e.target.value)}`; }},
      h("option", {value: ""}, "choose a run…"), runs.filter(r => r.has_model).map(r => h("option", {value: r.id, selected: run && r.id === run.id}, r.id)))),
    h("p", {class: "muted"}, schema.summary), form.el, message, h("div", {class: "actions"}, go), out);
}

function confusion(matrix, labels) {
  const max = Math.max(1, ...matrix.flat());
  return h("div", {}, h("h2", {}, "Confusion matrix (rows: true, columns: predicted)"),
    h("table", {class: "grid-table confusion"}, h("tr", {}, h("th", {}, ""), labels.map(l => h("th", {}, l))),
      matrix.map((row, i) => h("tr", {}, h("th", {}, labels[i] || i), row.map(v =>
        h("td", {style: `background: rgba(37,99,235,${(v / max * 0.6).toFixed(2)})`}, v))))));
}

// ------------------------------------------------------------------------------------------
// Sweep: the trials of `lmtune sweep --out DIR` as they stand, redrawn as the runs change

async function sweepPage() {
  const {sweeps} = await api("/api/sweeps");
  const id = params().get("id") || sweeps[0];
  const head = h("div", {class: "title"}, h("h1", {}, "Sweep"),
    h("select", {id: "sweep-pick", onchange: e => { location.hash = `#/sweep?id=${encodeURIComponent(e.target.value)}`; }},
      sweeps.map(s => h("option", {value: s, selected: s === id}, s))));
  if (!id) { put(main, head, h("p", {class: "muted"}, "No sweep in the workspace (lmtune sweep --out DIR writes DIR/trial-NNN).")); return; }
  const chart = h("canvas", {class: "chart", id: "sweep-history"});
  const table = h("table", {class: "grid-table", id: "sweep-trials"});
  const extra = h("div", {});
  put(main, head, chart, h("div", {class: "scroll"}, table), extra);
  const render = d => {
    const ok = d.trials.filter(t => t.best !== null);
    let best = null;
    const running = ok.map((t, i) => { best = best === null || (d.mode === "max" ? t.best > best : t.best < best) ? t.best : best; return [i, best]; });
    drawChart(chart, [{name: `${d.metric} of each trial`, points: ok.map((t, i) => [i, t.best]), dots: true, color: "#9ca3af"},
      {name: "best so far", points: running}], {title: `history (${d.metric}, ${d.mode === "max" ? "higher" : "lower"} is better)`,
      xLabel: "trial", integerX: true, legend: true, empty: "no trial has validated yet"});
    put(table, h("tr", {}, ["trial", "state", ...d.varied, d.metric, "steps"].map(t => h("th", {}, t))),
      d.trials.map(t => h("tr", {}, h("td", {}, h("a", {href: `#/run?id=${encodeURIComponent(t.id)}`}, t.id.split("/").pop())),
        h("td", {}, badge(t.state)), d.varied.map(k => h("td", {}, typeof t.params[k] === "number" ? num(t.params[k]) : String(t.params[k]))), h("td", {}, num(t.best)), h("td", {}, progress(t)))));
    put(extra, d.importance ? h("div", {}, h("h2", {}, "Parameter importance (from the sweep's report)"),
      h("img", {src: `/api/image?path=${encodeURIComponent(d.importance)}`, alt: "parameter importance", style: "max-width:100%"})) :
      h("p", {class: "muted"}, d.done ? "" : "Parameter importance appears when the sweep has finished (its report.html)."));
  };
  render(await api(`/api/sweep?id=${encodeURIComponent(id)}`));
  stream("/api/runs/events", {runs: async () => render(await api(`/api/sweep?id=${encodeURIComponent(id)}`))});
}

// ------------------------------------------------------------------------------------------

function showError(e) {
  const box = h("div", {class: "toast"}, String(e.message || e));
  document.body.append(box);
  setTimeout(() => box.remove(), 6000);
}

const PAGES = {runs: runsPage, run: runPage, new: newRunPage, compare: comparePage, play: playPage, evaluate: evaluatePage,
  sweep: sweepPage};

function route() {
  closers.forEach(c => c()); closers = [];
  const page = (location.hash.slice(2).split("?")[0]) || "runs";
  document.querySelectorAll("nav a").forEach(a => a.classList.toggle("active", a.dataset.page === page));
  Promise.resolve((PAGES[page] || runsPage)()).catch(e => {
    put(main, h("p", {class: "message error"}, e.message || String(e)));
  });
}
window.addEventListener("hashchange", route);
route();
