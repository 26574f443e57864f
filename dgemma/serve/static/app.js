// dgemma live canvas: streams a request with `stream_drafts: true` and draws every denoising step.
// No build step, no dependencies. State for tests and curious users lives in `window.dgemma`.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  model: null, canvasLength: 16, records: [], follow: true, controller: null,
  runs: {}, text: "", arText: "", image: null,  // image: the picked image as a data: URL
};
window.dgemma = state;

function setState(s) { document.body.dataset.state = s; }

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(msg) {
  const el = $("error");
  el.textContent = msg;
  el.hidden = !msg;
}

// ------------------------------------------------------------------ model info
async function loadModel() {
  try {
    const r = await fetch("v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    const card = body.data[0];
    state.model = card.id;
    const d = card.dgemma || {};
    state.canvasLength = d.canvas_length || 16;
    $("model-info").textContent = `${card.id} · canvas ${d.canvas_length} · ${d.steps} steps max · ` +
      `entropy bound ${d.entropy_bound}`;
    if (body.data.length > 1) {  // LoRA adapters served over the base (dgemma serve --lora): pick one
      const pick = document.createElement("select");
      pick.id = "model-select";
      for (const c of body.data) {
        const o = document.createElement("option");
        o.value = c.id;
        o.textContent = c.parent ? `${c.id} (LoRA on ${c.parent})` : c.id;
        pick.appendChild(o);
      }
      pick.addEventListener("change", () => { state.model = pick.value; });
      $("model-info").append(" · model ", pick);
    }
    $("image-row").hidden = !d.vision;  // a checkpoint with a vision tower takes images
    $("steps").placeholder = d.steps ? `${d.steps}` : "default";
    if (d.entropy_bound !== undefined) $("entropy-bound").placeholder = `${d.entropy_bound}`;
    if (d.fim && !state.touched) {  // a code model (it knows fill-in-the-middle): start with a completion of code
      document.querySelector('input[name="mode"][value="completion"]').checked = true;
      $("prompt").value = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n';
    }
    drawEmpty();
    setState("idle");
    return true;
  } catch (e) {
    $("model-info").textContent = "cannot read /v1/models: " + e.message;
    setState("error");
    return false;
  }
}

// ------------------------------------------------------------------ the canvas grid
function show(piece) {
  if (piece === "") return "∅";
  let out = "";
  for (const ch of piece) {
    const c = ch.codePointAt(0);
    if (ch === " ") out += "·";
    else if (ch === "\n") out += "↵";
    else if (ch === "\t") out += "⇥";
    else if (c < 0x20 || c === 0x7f) out += "\\x" + c.toString(16).padStart(2, "0");
    else out += ch;
  }
  return out.length > 9 ? out.slice(0, 8) + "…" : out;
}

function layoutGrid(n) {
  const grid = $("grid");
  if (grid.children.length === n) return;
  grid.innerHTML = "";
  grid.style.gridTemplateColumns = `repeat(${Math.min(n, 16)}, minmax(0, 1fr))`;
  for (let i = 0; i < n; i++) {
    const cell = document.createElement("div");
    cell.className = "cell";
    grid.appendChild(cell);
  }
}

function drawEmpty() {
  layoutGrid(state.canvasLength);
  for (const cell of $("grid").children) { cell.className = "cell"; cell.textContent = ""; cell.title = ""; }
}

function render(index) {
  const rec = state.records[index];
  if (!rec) return;
  layoutGrid(rec.canvas.length);
  const prev = index > 0 && state.records[index - 1].canvas_index === rec.canvas_index &&
    !state.records[index - 1].committed ? state.records[index - 1] : null;
  const cells = $("grid").children;
  const fixedFrom = rec.canvas.length - (rec.fixed || 0);
  for (let i = 0; i < rec.canvas.length; i++) {
    const cell = cells[i];
    const cls = ["cell"];
    if (rec.committed) cls.push("committed");
    else if (i >= fixedFrom) cls.push("fixed");
    else if (rec.accepted[i]) cls.push("acc");
    if (!rec.committed && prev && prev.canvas[i] !== rec.canvas[i]) cls.push("changed");
    cell.className = cls.join(" ");
    cell.textContent = show(rec.pieces[i] ?? String(rec.canvas[i]));
    cell.title = `position ${i} · token ${rec.canvas[i]}` + (rec.committed ? " · committed" :
      (rec.accepted[i] ? " · accepted" : " · re-noised") +
      (rec.entropies ? ` · entropy ${rec.entropies[i].toFixed(3)}` : ""));
  }
  const what = rec.committed ? "committed" :
    `step ${rec.step}${restartLabel(rec)} · ${rec.accepted_count}/${rec.canvas.length} accepted · ` +
    `mean entropy ${rec.mean_entropy.toFixed(3)}`;
  $("status").textContent = `canvas ${rec.canvas_index + 1} · ${what}`;
  $("replay-label").textContent = `${index + 1} / ${state.records.length}`;
  $("replay").value = index;
  for (const [i, bar] of Array.from($("bars").children).entries()) bar.classList.toggle("current", i === index);
}

// a draft of a canvas restarted from fresh noise (the sampler's `restarts`) says which attempt it belongs to
function restartLabel(rec) {
  return rec.attempt ? ` (restart ${rec.attempt})` : "";
}

function addBar(rec) {
  const bar = document.createElement("div");
  const frac = rec.committed ? 1 : rec.accepted_count / rec.canvas.length;
  bar.style.height = `${Math.max(4, Math.round(frac * 100))}%`;
  if (rec.committed) bar.className = "canvas-start";
  bar.title = rec.committed ? `canvas ${rec.canvas_index + 1} committed` :
    `canvas ${rec.canvas_index + 1}, step ${rec.step}${restartLabel(rec)}: ${rec.accepted_count} accepted`;
  $("bars").appendChild(bar);
}

function record(rec) {
  state.records.push(rec);
  document.body.dataset.drafts = String(state.records.filter((r) => !r.committed).length);
  const slider = $("replay");
  slider.max = state.records.length - 1;
  slider.disabled = false;
  addBar(rec);
  if (state.follow) render(state.records.length - 1);
  else $("replay-label").textContent = `${Number(slider.value) + 1} / ${state.records.length}`;
}

$("replay").addEventListener("input", (e) => {
  const i = Number(e.target.value);
  state.follow = i === state.records.length - 1;
  $("live").disabled = state.follow;
  render(i);
});
$("live").addEventListener("click", () => {
  state.follow = true;
  $("live").disabled = true;
  render(state.records.length - 1);
});

// ------------------------------------------------------------------ streaming
async function* sse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

function requestBody(mode, ar) {
  const prompt = $("prompt").value;
  const body = {
    model: state.model, stream: true, stream_options: { include_usage: true },
    max_tokens: Number($("max-tokens").value) || 64, seed: Number($("seed").value) || 0,
  };
  if ($("steps").value) body.steps = Number($("steps").value);
  if ($("entropy-bound").value && !ar) body.entropy_bound = Number($("entropy-bound").value);
  if ($("top-p").value) body.top_p = Number($("top-p").value);  // cuts each diffusion step (greedy AR: no effect)
  if (ar) { body.ar = true; body.temperature = 0; } else body.stream_drafts = true;
  // warm start: every canvas begins as the predicted text after the output so far (OpenAI's `prediction`)
  if ($("draft").value && !ar) body.prediction = { type: "content", content: $("draft").value };
  const format = $("format").value;  // structured output: the grammar holds both runs to the same format
  if (format === "json_object") body.response_format = { type: "json_object" };
  if (format === "json_schema") {
    let schema;
    try { schema = JSON.parse($("schema").value); } catch (e) { throw new Error(`the JSON schema is not JSON: ${e.message}`); }
    body.response_format = { type: "json_schema", json_schema: { name: "schema", schema } };
  }
  if (mode === "chat") {
    const content = state.image ? [{ type: "image_url", image_url: { url: state.image } }, { type: "text", text: prompt }]
      : prompt;
    body.messages = [{ role: "user", content }];
  } else if (state.image) {
    throw new Error("images go with chat mode (the completions API takes text)");
  } else body.prompt = prompt;
  return body;
}

async function runOne(ar) {
  const mode = document.querySelector("input[name=mode]:checked").value;
  const url = mode === "chat" ? "v1/chat/completions" : "v1/completions";
  const t0 = performance.now();
  let ttft = null, usage = null, text = "";
  const out = ar ? $("ar-output") : $("output");
  out.textContent = "";
  state.controller = new AbortController();
  const r = await fetch(url, { method: "POST", headers: headers(), body: JSON.stringify(requestBody(mode, ar)),
    signal: state.controller.signal });
  if (!r.ok) {
    let msg = r.statusText;
    try { msg = (await r.json()).error.message; } catch (e) { /* keep statusText */ }
    throw new Error(`${r.status}: ${msg}`);
  }
  for await (const data of sse(r)) {
    if (data === "[DONE]") break;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(chunk.error.message);
    const ev = chunk.dgemma;
    if (ev && ev.type === "draft") record(ev);
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices || []) {
      const piece = mode === "chat" ? (c.delta && c.delta.content) : c.text;
      if (piece) {
        if (ttft === null) ttft = (performance.now() - t0) / 1000;
        text += piece;
        out.textContent = text;
      }
    }
    if (ev && ev.type === "commit") {
      const last = [...state.records].reverse().find((x) => x.canvas_index === ev.canvas_index && !x.committed);
      if (last) record({ ...last, committed: true });
    }
  }
  const wall = (performance.now() - t0) / 1000;
  const run = { tokens: usage ? usage.completion_tokens : 0, wall, ttft, usage, text };
  run.tps = run.tokens / wall;
  state.runs[ar ? "ar" : "diffusion"] = run;
  showRun(ar ? "row-ar" : "row-diffusion", run);
  return run;
}

function fmt(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }

function showRun(rowId, run) {
  const row = $(rowId);
  row.hidden = false;
  const u = run.usage || {};
  row.innerHTML = `<th>${rowId === "row-ar" ? "autoregressive" : "diffusion"}</th>` +
    `<td>${run.tokens}</td><td>${fmt(run.wall, 2)}</td><td>${fmt(run.tps, 1)}</td>` +
    `<td>${u.forward_passes ?? "–"}</td><td>${fmt(u.steps_per_canvas, 1)}</td>` +
    `<td>${fmt(u.tokens_per_forward, 2)}</td><td>${fmt(run.ttft, 2)}</td>`;
}

async function run() {
  showError("");
  state.records = [];
  state.follow = true;
  $("bars").innerHTML = "";
  $("replay").disabled = true;
  $("live").disabled = true;
  $("replay-label").textContent = "no steps yet";
  $("row-ar").hidden = !$("compare").checked;
  $("ar-box").hidden = !$("compare").checked;
  document.body.dataset.drafts = "0";
  drawEmpty();
  $("run").disabled = true;
  $("stop").disabled = false;
  setState("running");
  try {
    if (!state.model && !(await loadModel())) throw new Error("no model");
    await runOne(false);
    if ($("compare").checked) {
      $("status").textContent += " · running autoregressively…";
      await runOne(true);
      $("status").textContent = $("status").textContent.replace(" · running autoregressively…", "");
    }
    setState("done");
  } catch (e) {
    if (e.name === "AbortError") { $("status").textContent = "stopped"; setState("stopped"); }
    else { showError(e.message); setState("error"); }
  } finally {
    $("run").disabled = false;
    $("stop").disabled = true;
    state.controller = null;
  }
}

$("run").addEventListener("click", run);
$("format").addEventListener("change", () => { $("schema").hidden = $("format").value !== "json_schema"; });
$("stop").addEventListener("click", () => state.controller && state.controller.abort());

// ------------------------------------------------------------------ an image for the chat (a vision checkpoint)
function setImage(url) {
  state.image = url;
  $("image-preview").src = url || "";
  $("image-preview").hidden = $("image-clear").hidden = !url;
  if (!url) $("image").value = "";
}
$("image").addEventListener("change", () => {
  const file = $("image").files[0];
  if (!file) return setImage(null);
  const reader = new FileReader();
  reader.onload = () => setImage(reader.result);  // sent inline: the server fetches nothing by default
  reader.onerror = () => showError(`cannot read ${file.name}`);
  reader.readAsDataURL(file);
});
$("image-clear").addEventListener("click", () => setImage(null));
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(); });
$("prompt").addEventListener("input", () => { state.touched = true; });
$("api-key").addEventListener("change", () => { localStorage.setItem("dgemma-api-key", $("api-key").value); loadModel(); });

// ------------------------------------------------------------------ start
(async () => {
  $("api-key").value = localStorage.getItem("dgemma-api-key") || "";
  const q = new URLSearchParams(location.search);
  if (q.has("prompt")) $("prompt").value = q.get("prompt");
  if (q.has("max_tokens")) $("max-tokens").value = q.get("max_tokens");
  if (q.has("steps")) $("steps").value = q.get("steps");
  if (q.has("seed")) $("seed").value = q.get("seed");
  if (q.has("entropy_bound")) $("entropy-bound").value = q.get("entropy_bound");
  if (q.has("top_p")) $("top-p").value = q.get("top_p");
  if (q.has("draft")) $("draft").value = q.get("draft");
  if (q.get("compare") === "1") $("compare").checked = true;
  if (["json_object", "json_schema"].includes(q.get("format"))) $("format").value = q.get("format");
  $("schema").hidden = $("format").value !== "json_schema";
  if (q.get("mode") === "completion") document.querySelector("input[value=completion]").checked = true;
  const ok = await loadModel();
  if (ok && q.get("run") === "1") run();
})();
