// The kiosk page: pick, drop or snap a picture, choose a task, watch the answer stream in,
// see boxes and masks drawn over the picture. Talks to this server's /v1 API only (no CDN).
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"];
let picture = null; // the Blob that will be uploaded
let stream = null; // the webcam MediaStream, while it is on
let rawStream = false; // a detect/segment request: tokens stream into the raw answer, not the answer box

function token() {
  return $("token").value || localStorage.getItem("paligemma-edge-token") || "";
}

function headers() {
  const value = token();
  return value ? { Authorization: "Bearer " + value } : {};
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function loadInfo() {
  const response = await fetch("/v1/info", { headers: headers() });
  if (response.status === 401) {
    $("token-field").hidden = false;
    $("model-info").textContent = "this server needs an access token";
    return;
  }
  const info = await response.json();
  const m = info.model;
  $("model-info").textContent =
    `${m.name} · PaliGemma ${m.family} · ${m.image_size[1]}px · ${m.precision} · ${info.backend}`;
  $("max-new-tokens").max = info.limits.max_new_tokens;
  if (!m.segmentation) {
    $("task").querySelector('option[value="segment"]').disabled = true;
  }
}

function showFields() {
  const task = $("task").value;
  $("lang-field").hidden = !["caption", "describe", "answer"].includes(task);
  $("question-field").hidden = task !== "answer";
  $("objects-field").hidden = !["detect", "segment"].includes(task);
  $("prompt-field").hidden = task !== "prompt";
}

function usePicture(blob) {
  picture = blob;
  const preview = $("preview");
  preview.onload = () => clearOverlay();
  preview.src = URL.createObjectURL(blob);
  $("stage").hidden = false;
  $("run").disabled = false;
  clearAnswer();
}

function clearOverlay() {
  const canvas = $("overlay");
  const preview = $("preview");
  canvas.width = preview.naturalWidth;
  canvas.height = preview.naturalHeight;
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

function rleCounts(text) {
  // COCO's compressed counts: 5-bit groups from "0" (48), 0x20 = another group follows,
  // 0x10 of the last group = negative; from the fourth count on, add the count two before.
  const counts = [];
  let at = 0;
  while (at < text.length) {
    let value = 0;
    let scale = 1;
    let code;
    do {
      code = text.charCodeAt(at++) - 48;
      value += (code & 0x1f) * scale;
      scale *= 32;
    } while (code & 0x20 && at < text.length);
    if (code & 0x10) value -= scale;
    if (counts.length > 2) value += counts[counts.length - 2];
    counts.push(value);
  }
  return counts;
}

function decodeMask(rle) {
  // COCO RLE: alternating off/on runs down each column in turn, starting with an "off" run.
  const [height, width] = rle.size;
  const counts = typeof rle.counts === "string" ? rleCounts(rle.counts) : rle.counts;
  const mask = new Uint8Array(height * width); // row-major, for ImageData
  let at = 0;
  counts.forEach((count, index) => {
    if (index % 2 === 1) {
      for (let p = at; p < at + count; p++) mask[(p % height) * width + Math.floor(p / height)] = 1;
    }
    at += count;
  });
  return { mask, width, height };
}

function paintMask(ctx, rle, color) {
  // Drawn through a canvas of the mask's size, scaled onto the overlay (the picture's size).
  const { mask, width, height } = decodeMask(rle);
  const layer = document.createElement("canvas");
  layer.width = width;
  layer.height = height;
  const layerCtx = layer.getContext("2d");
  const image = layerCtx.createImageData(width, height);
  const [r, g, b] = [1, 3, 5].map((i) => parseInt(color.slice(i, i + 2), 16));
  for (let p = 0; p < mask.length; p++) {
    if (mask[p]) image.data.set([r, g, b, 110], p * 4);
  }
  layerCtx.putImageData(image, 0, 0);
  ctx.drawImage(layer, 0, 0, ctx.canvas.width, ctx.canvas.height);
  let area = 0;
  for (let p = 0; p < mask.length; p++) area += mask[p];
  return area;
}

function describeObject(item, color, area) {
  // One readable line per object: swatch, label, box corners and size in pixels, mask area.
  const entry = document.createElement("li");
  const swatch = document.createElement("span");
  swatch.className = "swatch";
  swatch.style.background = color;
  const label = document.createElement("strong");
  label.textContent = item.label || "?";
  const [x0, y0, x1, y1] = item.box.map((v) => Math.round(v));
  const details = document.createElement("span");
  details.className = "box";
  details.textContent = ` box (${x0}, ${y0}) to (${x1}, ${y1}), ${x1 - x0} x ${y1 - y0} px` +
    (area === null ? "" : `, mask ${area.toLocaleString("en")} px`);
  entry.append(swatch, label, details);
  return entry;
}

function drawObjects(objects) {
  clearOverlay();
  const canvas = $("overlay");
  const ctx = canvas.getContext("2d");
  const line = Math.max(2, Math.round(canvas.width / 200));
  objects.forEach((item, index) => {
    const color = COLORS[index % COLORS.length];
    const area = item.mask ? paintMask(ctx, item.mask, color) : null;
    const [x0, y0, x1, y1] = item.box;
    ctx.strokeStyle = color;
    ctx.lineWidth = line;
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    ctx.font = `${Math.max(12, line * 6)}px sans-serif`;
    const label = item.label || "?";
    const textWidth = ctx.measureText(label).width;
    ctx.fillStyle = color;
    ctx.fillRect(x0, Math.max(0, y0 - line * 8), textWidth + line * 2, line * 8);
    ctx.fillStyle = "#fff";
    ctx.fillText(label, x0 + line, Math.max(line * 6, y0 - line * 2));
    $("objects-list").appendChild(describeObject(item, color, area));
  });
}

function showAnswer(data) {
  // Text tasks: the answer. Detect/segment: a count and the objects listed, the raw
  // <loc..><seg..> string one click away.
  const objects = data.detections || data.segmentations;
  if (!objects) {
    $("answer").textContent = data.text;
    $("raw").hidden = true;
    return;
  }
  const noun = data.segmentations ? "segmented object" : "object";
  $("answer").textContent = objects.length
    ? `${objects.length} ${noun}${objects.length === 1 ? "" : "s"} found:`
    : "nothing found";
  $("raw-text").textContent = data.text;
  $("raw").hidden = false;
  drawObjects(objects);
}

function clearAnswer() {
  $("answer").textContent = "";
  $("objects-list").textContent = "";
  $("raw-text").textContent = "";
  $("raw").hidden = true;
  $("raw").open = false;
}

function formData() {
  const data = new FormData();
  data.append("image", picture, picture.name || "snapshot.png");
  const task = $("task").value;
  if (task === "prompt") {
    data.append("prompt", $("prompt").value);
  } else {
    data.append("task", task);
    if (!$("lang-field").hidden) data.append("lang", $("lang").value);
    if (!$("question-field").hidden) data.append("question", $("question").value);
    if (!$("objects-field").hidden) data.append("objects", $("objects").value);
  }
  data.append("max_new_tokens", $("max-new-tokens").value);
  return data;
}

function handleEvent(event, data) {
  if (event === "token") {
    $(rawStream ? "raw-text" : "answer").textContent += data.text;
  } else if (event === "result") {
    showAnswer(data);
    const t = data.timings;
    setStatus(`done: ${data.token_ids.length} tokens, ${data.finish_reason}; ` +
      `first token ${(t.vision_ms + t.prefill_ms).toFixed(0)} ms, ${t.decode_tokens_per_s.toFixed(1)} tokens/s`);
    document.body.dataset.state = "done";
  } else if (event === "error") {
    if (rawStream) $("answer").textContent = "";
    setStatus(`error ${data.status}: ${data.error}`, true);
    document.body.dataset.state = "error";
  }
}

async function run(submitEvent) {
  submitEvent.preventDefault();
  if (!picture) return;
  if ($("token").value) localStorage.setItem("paligemma-edge-token", $("token").value);
  $("run").disabled = true;
  clearAnswer();
  clearOverlay();
  rawStream = ["detect", "segment"].includes($("task").value);
  if (rawStream) {
    $("answer").textContent = "finding objects…";
    $("raw").hidden = false;
  }
  setStatus("running…");
  document.body.dataset.state = "running";
  try {
    const response = await fetch("/v1/generate?stream=true", { method: "POST", body: formData(), headers: headers() });
    if (!response.ok) {
      const body = await response.json().catch(() => ({ error: response.statusText }));
      if (response.status === 401) $("token-field").hidden = false;
      handleEvent("error", { status: response.status, error: body.error });
      return;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = (frame.match(/^event: (.*)$/m) || [])[1];
        const data = (frame.match(/^data: (.*)$/m) || [])[1];
        if (event && data) handleEvent(event, JSON.parse(data));
      }
    }
  } catch (error) {
    handleEvent("error", { status: 0, error: String(error) });
  } finally {
    $("run").disabled = false;
  }
}

async function startCamera() {
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: true });
  } catch (error) {
    setStatus("camera unavailable: " + error.message, true);
    return;
  }
  $("video").srcObject = stream;
  $("video").hidden = false;
  $("snapshot").hidden = false;
}

function snapshot() {
  const video = $("video");
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  canvas.toBlob((blob) => usePicture(blob), "image/png");
  stream.getTracks().forEach((track) => track.stop());
  video.hidden = true;
  $("snapshot").hidden = true;
}

$("file").addEventListener("change", (e) => e.target.files[0] && usePicture(e.target.files[0]));
$("drop").addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (e) => {
  e.preventDefault();
  $("drop").classList.remove("over");
  const file = [...e.dataTransfer.files].find((f) => f.type.startsWith("image/"));
  if (file) usePicture(file);
});
$("camera-start").addEventListener("click", startCamera);
$("snapshot").addEventListener("click", snapshot);
$("task").addEventListener("change", showFields);
$("ask").addEventListener("submit", run);
$("token").addEventListener("change", loadInfo);
showFields();
loadInfo().catch((error) => setStatus("cannot reach the server: " + error, true));
