// stablekit's web page: a client of the job API (POST /v1/jobs, its event stream, DELETE to cancel).
// Plain script, no build step. Server text is only ever set as textContent, never parsed as HTML. The event
// stream is read with fetch() rather than EventSource, which cannot send the Authorization header.
"use strict";

const KEY_STORE = "stablekit.apiKey";
const IMAGE_TASKS = ["img2img", "inpaint", "upscale", "depth2img"];
const STRENGTH_TASKS = ["img2img", "inpaint", "depth2img"];

const $ = (id) => document.getElementById(id);
const state = { task: "txt2img", image: null, job: null, painted: false, samplers: {} };

// --- talking to the server -----------------------------------------------------------------------------------

class ServerError extends Error {}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// fetch() that throws a ServerError carrying the server's own message for any answer that is not 2xx.
async function call(method, path, body, signal) {
  const headers = authHeaders();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ServerError(`could not reach the server (${e.message})`);
  }
  if (!response.ok) {
    let message = response.statusText || "no message";
    try {
      const text = await response.text();
      try {
        const data = JSON.parse(text);
        message = typeof data.error === "string" ? data.error : text;
      } catch (_) {
        if (text) message = text.slice(0, 500);
      }
    } catch (_) {
      // the body could not be read: keep the status text
    }
    throw new ServerError(`${response.status}: ${message}`);
  }
  return response;
}

// The Server-Sent Events of a response body, one {event, data} at a time.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event: name, data: JSON.parse(data.join("\n")) };
    }
  }
}

// --- what the person sees ------------------------------------------------------------------------------------

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").textContent = "";
  $("error").hidden = true;
}

function setStatus(text) {
  $("status").textContent = text;
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").disabled = !busy;
}

function addNotice(text) {
  const item = document.createElement("li");
  item.textContent = text;
  $("notices").append(item);
}

function base64Bytes(b64) {
  const raw = atob(b64);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

// A PNG's size and its "parameters" text (the settings that made it, as stablekit writes them).
function pngInfo(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const info = { width: 0, height: 0, parameters: null };
  let at = 8;
  while (at + 8 <= bytes.length) {
    const length = view.getUint32(at);
    const type = String.fromCharCode(...bytes.subarray(at + 4, at + 8));
    const data = bytes.subarray(at + 8, Math.min(bytes.length, at + 8 + length));
    if (type === "IHDR" && data.length >= 8) {
      info.width = view.getUint32(at + 8);
      info.height = view.getUint32(at + 12);
    } else if (type === "tEXt" || type === "iTXt") {
      const zero = data.indexOf(0);
      const keyword = new TextDecoder("latin1").decode(data.subarray(0, zero));
      if (keyword === "parameters") {
        if (type === "tEXt") {
          info.parameters = new TextDecoder("latin1").decode(data.subarray(zero + 1));
        } else if (data[zero + 1] === 0) {
          // iTXt, uncompressed: flag, method, language\0, translated keyword\0, UTF-8 text
          let p = data.indexOf(0, zero + 3);
          p = data.indexOf(0, p + 1);
          info.parameters = new TextDecoder("utf-8").decode(data.subarray(p + 1));
        }
      }
    } else if (type === "IEND") {
      break;
    }
    at += 12 + length;
  }
  return info;
}

// A result card, after the previous one of the same job (`after`), or first in the gallery; returns the card.
function addResult(b64, seed, request, after) {
  const bytes = base64Bytes(b64);
  const info = pngInfo(bytes);
  const url = URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
  const card = document.createElement("figure");
  card.className = "card";
  card.dataset.seed = String(seed);

  const link = document.createElement("a");
  link.href = url;
  link.download = `stablekit-${request.task}-${seed}.png`;
  const img = document.createElement("img");
  img.src = url;
  img.alt = `generated image, seed ${seed}`;
  link.append(img);

  const caption = document.createElement("figcaption");
  const prompt = document.createElement("p");
  prompt.className = "prompt";
  prompt.textContent = request.prompt || "(no prompt)";
  const facts = document.createElement("dl");
  const fact = (name, value) => {
    if (value === undefined || value === null || value === "") return;
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = String(value);
    dd.dataset.field = name;
    facts.append(dt, dd);
  };
  fact("task", request.task);
  fact("seed", seed);
  fact("size", `${info.width}×${info.height}`);
  fact("steps", request.steps);
  fact("sampler", state.samplers[request.sampler] || request.sampler);
  fact("guidance", request.guidance_scale);
  fact("strength", request.strength);
  fact("noise level", request.noise_level);
  fact("negative", request.negative_prompt);
  caption.append(prompt, facts);
  if (info.parameters) {
    const details = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = "Parameters";
    const pre = document.createElement("pre");
    pre.className = "parameters";
    pre.textContent = info.parameters;
    details.append(summary, pre);
    caption.append(details);
  }

  const buttons = document.createElement("div");
  buttons.className = "row";
  const download = document.createElement("a");
  download.className = "button download";
  download.href = url;
  download.download = link.download;
  download.textContent = "Download";
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.className = "reuse";
  reuse.textContent = "Reuse seed";
  reuse.addEventListener("click", () => {
    $("seed").value = String(seed);
    setStatus(`Seed ${seed} set.`);
  });
  const asInput = document.createElement("button");
  asInput.type = "button";
  asInput.className = "use-input";
  asInput.textContent = "Use as input";
  asInput.addEventListener("click", () => {
    setInputImage(`data:image/png;base64,${b64}`);
    if (state.task === "txt2img") selectTask("img2img");
  });
  buttons.append(download, reuse, asInput);
  caption.append(buttons);

  card.append(link, caption);
  if (after && after.isConnected) after.after(card);
  else $("gallery").prepend(card);
  $("empty").hidden = true;
  return card;
}

// --- the form ------------------------------------------------------------------------------------------------

function selectTask(task) {
  state.task = task;
  for (const tab of document.querySelectorAll("[data-task]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.task === task));
  }
  const show = (selector, visible) => {
    for (const el of document.querySelectorAll(selector)) el.hidden = !visible;
  };
  show(".for-image", IMAGE_TASKS.includes(task));
  show(".for-inpaint", task === "inpaint");
  show(".for-strength", STRENGTH_TASKS.includes(task));
  show(".for-upscale", task === "upscale");
  show(".for-size", task !== "upscale");
  $("image-thumb").hidden = task === "inpaint" || !state.image;
}

function setInputImage(dataUrl) {
  state.image = dataUrl;
  $("image-thumb").src = dataUrl;
  $("mask-base").src = dataUrl; // the mask canvas is sized when it loads
  $("image-thumb").hidden = state.task === "inpaint";
}

// A number field's value, or undefined when it is blank (the server then uses its default). Whether the
// number is valid is the server's to say.
function numberField(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

// The mask as the server takes it: white where painted (the brush's alpha), black elsewhere, at the image's size.
function maskDataUrl() {
  const canvas = $("mask-canvas");
  const painted = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  const ctx = out.getContext("2d");
  const mask = ctx.createImageData(out.width, out.height);
  for (let i = 0; i < painted.length; i += 4) {
    const v = painted[i + 3] >= 128 ? 255 : 0;
    mask.data[i] = v;
    mask.data[i + 1] = v;
    mask.data[i + 2] = v;
    mask.data[i + 3] = 255;
  }
  ctx.putImageData(mask, 0, 0);
  return out.toDataURL("image/png");
}

function request() {
  const task = state.task;
  const body = {
    task,
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    steps: numberField("steps"),
    guidance_scale: numberField("guidance"),
    seed: numberField("seed"),
    batch_size: numberField("batch"),
    sampler: $("sampler").value || undefined,
  };
  if (task !== "upscale") {
    body.width = numberField("width");
    body.height = numberField("height");
  }
  if (IMAGE_TASKS.includes(task) && state.image) body.image = state.image;
  if (STRENGTH_TASKS.includes(task)) body.strength = numberField("strength");
  if (task === "upscale") body.noise_level = numberField("noise-level");
  if (task === "inpaint" && state.image) {
    if (!state.painted) throw new ServerError("mask: paint the region to regenerate on the image first");
    body.mask = maskDataUrl();
  }
  const steps = typeof body.steps === "number" && body.steps > 0 ? body.steps : 20;
  body.preview_every = Math.min(1000, Math.max(1, Math.ceil(steps / 10)));
  for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
  return body;
}

async function generate(event) {
  event.preventDefault();
  if (state.job) return;
  clearError();
  rememberKey();
  $("notices").replaceChildren();
  $("preview").hidden = true;
  const progress = $("progress");
  progress.max = 1;
  progress.value = 0;
  let body;
  try {
    body = request();
  } catch (e) {
    showError(e.message);
    return;
  }
  const job = { id: null, controller: new AbortController(), received: 0, last: null };
  state.job = job;
  setBusy(true);
  $("cancel").disabled = true; // until the server has given the job an id
  setStatus("Submitting…");
  try {
    const created = await (await call("POST", "/v1/jobs", body)).json();
    job.id = created.id;
    $("cancel").disabled = false;
    setStatus(created.queued ? `Queued (${created.queued} waiting).` : "Queued.");
    const stream = await call("GET", `/v1/jobs/${encodeURIComponent(job.id)}/events`, undefined, job.controller.signal);
    let finished = false;
    for await (const { event: name, data } of events(stream)) {
      if (name === "queued") setStatus("Queued.");
      else if (name === "running") setStatus("Running…");
      else if (name === "progress") {
        progress.max = Math.max(1, data.total);
        progress.value = data.step;
        setStatus(`Step ${data.step} of ${data.total}.`);
      } else if (name === "preview" && data.images && data.images.length) {
        $("preview").src = `data:image/png;base64,${data.images[0]}`;
        $("preview").hidden = false;
      } else if (name === "image") {
        job.received += 1;
        job.last = addResult(data.image, data.seed, body, job.last);
      } else if (name === "notice") {
        addNotice(data.message);
      } else if (name === "done") {
        finished = true;
        await finish(job, data, body);
        break;
      }
    }
    if (!finished) showError("the event stream ended before the job finished; the job may still be running");
  } catch (e) {
    if (e.name !== "AbortError") {
      showError(e.message);
      setStatus("Failed.");
    }
  } finally {
    job.controller.abort();
    state.job = null;
    setBusy(false);
  }
}

async function finish(job, data, body) {
  if (data.state === "done") {
    if (job.received === 0) {
      // The job finished before the stream opened: its images are in its status.
      const status = await (await call("GET", `/v1/jobs/${encodeURIComponent(job.id)}`)).json();
      (status.images || []).forEach((b64, i) => {
        job.last = addResult(b64, status.seeds[i], body, job.last);
      });
    }
    $("progress").value = $("progress").max;
    $("preview").hidden = true;
    setStatus("Done.");
  } else if (data.state === "cancelled") {
    setStatus(data.total ? `Cancelled at step ${data.step} of ${data.total}.` : "Cancelled.");
  } else {
    setStatus("Failed.");
    showError(`the job failed: ${data.error || data.state}`);
  }
}

async function cancel() {
  const job = state.job;
  if (!job || !job.id) return;
  $("cancel").disabled = true;
  setStatus("Cancelling…");
  try {
    await call("DELETE", `/v1/jobs/${encodeURIComponent(job.id)}`);
  } catch (e) {
    showError(`could not cancel: ${e.message}`);
    $("cancel").disabled = false;
  }
}

function rememberKey() {
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
}

// --- the mask canvas -----------------------------------------------------------------------------------------

function setUpMask() {
  const base = $("mask-base");
  const canvas = $("mask-canvas");
  const ctx = canvas.getContext("2d");
  let last = null;
  base.addEventListener("load", () => {
    canvas.width = base.naturalWidth;
    canvas.height = base.naturalHeight;
    state.painted = false;
  });
  const point = (e) => {
    const box = canvas.getBoundingClientRect();
    const scale = canvas.width / Math.max(1, box.width);
    return { x: (e.clientX - box.left) * scale, y: (e.clientY - box.top) * scale, scale };
  };
  const paint = (from, to) => {
    ctx.strokeStyle = "#ff2bd6"; // shown over the image; sent as white (maskDataUrl)
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.lineWidth = Number($("brush").value) * to.scale;
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
    state.painted = true;
  };
  canvas.addEventListener("pointerdown", (e) => {
    if (!canvas.width) return;
    canvas.setPointerCapture(e.pointerId);
    last = point(e);
    paint(last, last);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!last) return;
    const next = point(e);
    paint(last, next);
    last = next;
  });
  const stop = () => {
    last = null;
  };
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);
  $("mask-clear").addEventListener("click", () => {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    state.painted = false;
  });
}

// --- start ---------------------------------------------------------------------------------------------------

async function load() {
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    rememberKey();
    setStatus($("api-key").value.trim() ? "Key set for this tab." : "Key cleared.");
  });
  for (const tab of document.querySelectorAll("[data-task]")) {
    tab.addEventListener("click", () => selectTask(tab.dataset.task));
  }
  $("generate-form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("random-seed").addEventListener("click", () => {
    $("seed").value = "";
  });
  $("image-file").addEventListener("change", () => {
    const file = $("image-file").files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.addEventListener("load", () => setInputImage(reader.result));
    reader.addEventListener("error", () => showError(`could not read ${file.name}`));
    reader.readAsDataURL(file);
  });
  setUpMask();
  selectTask("txt2img");
  try {
    const health = await (await call("GET", "/health")).json();
    $("model").textContent = `model: ${health.model}`;
    const samplers = await (await call("GET", "/static/samplers.json")).json();
    for (const s of samplers) {
      const option = document.createElement("option");
      option.value = s.name;
      option.textContent = s.label;
      state.samplers[s.name] = s.label;
      $("sampler").append(option);
    }
  } catch (e) {
    showError(e.message);
  }
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", load);
