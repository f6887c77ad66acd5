// The playground: speak text with streamed playback, download it, and manage voices.
import { ApiError, apiFetch, getJson } from "./api.js";
import { playPcmStream } from "./player.js";
import { extensionFor, startRecording } from "./recorder.js";

const OPTION_FIELDS = ["temperature", "top_k", "top_p", "repetition_penalty", "max_audio_ms", "seed"];
const $ = (id) => document.getElementById(id);

/** What the page is doing, for people (the status line) and for tests (window.csmPlayground). */
const state = (window.csmPlayground = {
  ready: false,
  phase: "starting",
  error: null,
  last: null,
  live: null,
  downloaded: null,
  savedVoice: null,
});

let config = null;
let voices = [];
let controller = null;
let lastRequest = null;
let recording = null;
let recorded = null;

function setStatus(message, isError = false) {
  const status = $("status");
  status.textContent = message;
  status.classList.toggle("error", isError);
  state.error = isError ? message : null;
}

function showError(error) {
  const message = error instanceof ApiError ? error.describe() : error.message || String(error);
  setStatus(message, true);
  state.phase = "error";
}

function setBusy(speaking) {
  $("speak").disabled = speaking;
  $("stop").disabled = !speaking;
  $("download").disabled = speaking || !lastRequest;
}

// -- start-up --------------------------------------------------------------------------------------

async function init() {
  config = await getJson("/v1/playground");
  $("server-info").textContent = `${config.model} · ${config.sample_rate / 1000} kHz`;
  $("text").maxLength = config.max_text_chars;
  for (const name of OPTION_FIELDS) {
    const value = config.defaults[name];
    $(name).value = value === null || value === undefined ? "" : value;
  }
  const format = $("format");
  format.replaceChildren(
    ...config.formats.filter((f) => f !== "raw").map((f) => new Option(f, f)),
  );
  if (config.voices.read_only) {
    for (const el of $("record-form").elements) el.disabled = true;
    $("record-state").textContent = "This server does not accept new voices (--read-only-voices).";
  }
  await loadVoices();
  state.ready = true;
  state.phase = "idle";
}

// -- voices ----------------------------------------------------------------------------------------

async function loadVoices(select = null) {
  voices = (await getJson("/v1/audio/voices")).voices;
  const picker = $("voice");
  const current = select ?? picker.value;
  const group = (label, list) => {
    const el = document.createElement("optgroup");
    el.label = label;
    for (const v of list) el.append(new Option(v.source === "openai" ? `${v.name} (${v.voice})` : v.name, v.id));
    return el;
  };
  const user = voices.filter((v) => v.source === "user");
  const presets = voices.filter((v) => v.source === "preset");
  const other = voices.filter((v) => v.source === "builtin" || v.source === "openai");
  picker.replaceChildren(new Option("default for the speaker", ""));
  if (user.length) picker.append(group("Your voices", user));
  if (presets.length) picker.append(group("Presets", presets));
  picker.append(group("Other", other));
  picker.value = voices.some((v) => v.id === current) ? current : "";
  renderVoiceTable(user, presets);
}

function renderVoiceTable(user, presets) {
  const body = $("voices").tBodies[0];
  body.replaceChildren();
  for (const v of [...user, ...presets]) {
    const row = body.insertRow();
    row.dataset.voice = v.name;
    row.insertCell().textContent = v.name;
    row.insertCell().textContent = v.source;
    row.insertCell().textContent = String(v.speaker);
    row.insertCell().textContent = v.duration_s === null ? "?" : `${v.duration_s.toFixed(1)} s`;
    const text = row.insertCell();
    text.className = "transcript";
    text.textContent = v.text;
    text.title = v.text;
    const actions = row.insertCell();
    if (v.source === "user" && !config.voices.read_only) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "delete";
      button.textContent = "Delete";
      button.setAttribute("aria-label", `Delete voice ${v.name}`);
      button.addEventListener("click", () => deleteVoice(v.name));
      actions.append(button);
    }
  }
}

async function deleteVoice(name) {
  try {
    await apiFetch(`/v1/audio/voices/${encodeURIComponent(name)}`, { method: "DELETE" });
    setStatus(`Deleted voice ${name}.`);
    await loadVoices();
  } catch (error) {
    showError(error);
  }
}

function pickVoice() {
  const voice = voices.find((v) => v.id === $("voice").value);
  if (voice) $("speaker").value = String(voice.speaker);
}

// -- speaking --------------------------------------------------------------------------------------

function requestBody() {
  const body = { input: $("text").value, speaker: Number($("speaker").value) };
  if ($("voice").value) body.voice = $("voice").value;
  for (const name of OPTION_FIELDS) {
    const raw = $(name).value.trim();
    if (raw !== "") body[name] = Number(raw);
  }
  return body;
}

function showMetrics(stats, seed) {
  const seconds = stats.samples / stats.sampleRate;
  const end = stats.fetchDoneAt ?? performance.now();
  $("ttfa").textContent = stats.firstByteAt === null ? "–" : `${Math.round(stats.firstByteAt - stats.requestStart)} ms`;
  $("rtf").textContent = seconds > 0 ? ((end - stats.requestStart) / 1000 / seconds).toFixed(2) : "–";
  $("audio-seconds").textContent = `${seconds.toFixed(2)} s`;
  $("last-seed").textContent = seed ?? "–";
}

async function speak(event) {
  event.preventDefault();
  const body = requestBody();
  controller = new AbortController();
  const requestStart = performance.now();
  state.phase = "speaking";
  state.last = null;
  state.live = null;
  setBusy(true);
  setStatus("Speaking…");
  let seed = null;
  try {
    const response = await apiFetch("/v1/audio/speech", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...body, response_format: "pcm" }),
      signal: controller.signal,
    });
    const sampleRate = Number(response.headers.get("X-Sample-Rate")) || config.sample_rate;
    seed = response.headers.get("X-Seed");
    const stats = await playPcmStream(response, {
      sampleRate,
      requestStart,
      signal: controller.signal,
      onProgress: (s) => {
        state.live = { samples: s.samples, firstScheduledAt: s.firstScheduledAt };
        showMetrics(s, seed);
      },
    });
    showMetrics(stats, seed);
    const { pcm, ...summary } = stats;
    state.last = { ...summary, seed: Number(seed) };
    lastRequest = { ...body, seed: Number(seed) };
    state.phase = "done";
    setStatus(`Done: ${(stats.samples / sampleRate).toFixed(2)} s of audio.`);
  } catch (error) {
    if (error.name === "AbortError") {
      state.phase = "stopped";
      setStatus("Stopped.");
    } else {
      showError(error);
    }
  } finally {
    controller = null;
    setBusy(false);
  }
}

function stop() {
  if (controller) controller.abort();
}

async function download() {
  if (!lastRequest) return;
  const format = $("format").value;
  $("download").disabled = true;
  setStatus(`Making ${format} (same seed, so the same audio)…`);
  try {
    const response = await apiFetch("/v1/audio/speech", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...lastRequest, response_format: format }),
    });
    const blob = await response.blob();
    const link = $("download-link");
    if (link.href) URL.revokeObjectURL(link.href);
    link.href = URL.createObjectURL(blob);
    link.download = `speech-${lastRequest.seed}.${format}`;
    link.click();
    state.downloaded = { format, bytes: blob.size, type: blob.type };
    setStatus(`Downloaded ${link.download} (${Math.round(blob.size / 1024)} KB).`);
  } catch (error) {
    showError(error);
  } finally {
    $("download").disabled = false;
  }
}

// -- recording a voice -----------------------------------------------------------------------------

async function record() {
  try {
    recording = await startRecording();
    recorded = null;
    $("record").disabled = true;
    $("record-stop").disabled = false;
    $("record-stop").focus();
    $("record-state").textContent = "Recording… read the transcript aloud.";
  } catch (error) {
    showError(error);
  }
}

async function stopRecording() {
  if (!recording) return;
  const blob = await recording.stop();
  recorded = { blob, filename: `recording.${extensionFor(blob.type)}` };
  recording = null;
  $("record").disabled = false;
  $("record-stop").disabled = true;
  $("record-state").textContent = `Recorded ${Math.round(blob.size / 1024)} KB.`;
  const preview = $("record-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(blob);
  preview.hidden = false;
  $("voice-file").value = "";
  updateSaveButton();
}

function updateSaveButton() {
  $("save-voice").disabled = !(recorded || $("voice-file").files.length);
}

async function saveVoice(event) {
  event.preventDefault();
  const file = $("voice-file").files[0];
  const audio = file ? { blob: file, filename: file.name } : recorded;
  if (!audio) return;
  const name = $("voice-name").value.trim();
  const form = new FormData();
  form.append("name", name);
  form.append("text", $("record-text").value);
  form.append("speaker", $("voice-speaker").value);
  form.append("audio", audio.blob, audio.filename);
  $("save-voice").disabled = true;
  try {
    const response = await apiFetch("/v1/audio/voices", { method: "POST", body: form });
    const saved = await response.json();
    await loadVoices(saved.voice.id);
    pickVoice();
    state.savedVoice = saved.voice; // set once the list shows it and it is selected
    setStatus(`Saved voice ${saved.voice.name}${saved.warning ? ` (${saved.warning})` : ""}; it is selected above.`);
  } catch (error) {
    showError(error);
  } finally {
    updateSaveButton();
  }
}

// -- wiring ----------------------------------------------------------------------------------------

$("speak-form").addEventListener("submit", speak);
$("stop").addEventListener("click", stop);
$("download").addEventListener("click", download);
$("voice").addEventListener("change", pickVoice);
$("record").addEventListener("click", record);
$("record-stop").addEventListener("click", stopRecording);
$("voice-file").addEventListener("change", updateSaveButton);
$("record-form").addEventListener("submit", saveVoice);

init().catch((error) => {
  showError(error);
  state.phase = "error";
});
