// The kiosk page: pick, drop or snap a picture, choose a task, watch the answer stream in,
// see boxes and masks drawn over the picture. Talks to this server's /v1 API only (no CDN).
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"];
let picture = null; // the Blob that will be uploaded
let stream = null; // the webcam MediaStream, while it is on

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
  $("answer").textContent = "";
  $("objects-list").textContent = "";
}

function clearOverlay() {
  const canvas = $("overlay");
  const preview = $("preview");
  canvas.width = preview.naturalWidth;
  canvas.height = preview.naturalHeight;
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

function decodeMask(rle) {
  // Row-major run lengths, starting with a run of "off" pixels.
  const [height, width] = rle.size;
  const mask = new Uint8Array(height * width);
  let at = 0;
  rle.counts.forEach((count, index) => {
    if (index % 2 === 1) mask.fill(1, at, at + count);
    at += count;
  });
  return { mask, width, height };
}

function drawObjects(objects) {
  clearOverlay();
  const canvas = $("overlay");
  const ctx = canvas.getContext("2d");
  const line = Math.max(2, Math.round(canvas.width / 200));
  objects.forEach((item, index) => {
    const color = COLORS[index % COLORS.length];
    if (item.mask) {
      const { mask, width, height } = decodeMask(item.mask);
      const image = ctx.getImageData(0, 0, width, height);
      const [r, g, b] = [1, 3, 5].map((i) => parseInt(color.slice(i, i + 2), 16));
      for (let p = 0; p < mask.length; p++) {
        if (mask[p]) {
          image.data.set([r, g, b, 110], p * 4);
        }
      }
      ctx.putImageData(image, 0, 0);
    }
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
    const entry = document.createElement("li");
    entry.textContent = `${label}: [${item.box.map((v) => v.toFixed(0)).join(", ")}]`;
    $("objects-list").appendChild(entry);
  });
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
    $("answer").textContent += data.text;
  } else if (event === "result") {
    $("answer").textContent = data.text;
    const objects = data.detections || data.segmentations || [];
    drawObjects(objects);
    const t = data.timings;
    setStatus(`done: ${data.token_ids.length} tokens, ${data.finish_reason}; ` +
      `first token ${(t.vision_ms + t.prefill_ms).toFixed(0)} ms, ${t.decode_tokens_per_s.toFixed(1)} tokens/s`);
    document.body.dataset.state = "done";
  } else if (event === "error") {
    setStatus(`error ${data.status}: ${data.error}`, true);
    document.body.dataset.state = "error";
  }
}

async function run(submitEvent) {
  submitEvent.preventDefault();
  if (!picture) return;
  if ($("token").value) localStorage.setItem("paligemma-edge-token", $("token").value);
  $("run").disabled = true;
  $("answer").textContent = "";
  $("objects-list").textContent = "";
  clearOverlay();
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
