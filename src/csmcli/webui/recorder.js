// Records the microphone with MediaRecorder (webm/opus in Chromium and Firefox, mp4 in Safari).

const PREFERRED = ["audio/webm;codecs=opus", "audio/webm", "audio/ogg;codecs=opus", "audio/mp4"];

/** The file name extension for a recording's MIME type. */
export function extensionFor(mime) {
  if (mime.includes("webm")) return "webm";
  if (mime.includes("ogg")) return "ogg";
  if (mime.includes("mp4")) return "m4a";
  return "audio";
}

/** A started recording; `stop()` resolves to the recorded Blob. */
export async function startRecording() {
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    throw new Error("this browser cannot record audio here (it needs https or localhost, and MediaRecorder)");
  }
  const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  const mimeType = PREFERRED.find((type) => MediaRecorder.isTypeSupported(type)) || "";
  const recorder = new MediaRecorder(stream, mimeType ? { mimeType } : {});
  const chunks = [];
  recorder.addEventListener("dataavailable", (event) => event.data.size && chunks.push(event.data));
  const stopped = new Promise((resolve) => recorder.addEventListener("stop", resolve, { once: true }));
  recorder.start(250);
  return {
    mimeType: recorder.mimeType || mimeType,
    async stop() {
      recorder.stop();
      await stopped;
      for (const track of stream.getTracks()) track.stop();
      return new Blob(chunks, { type: recorder.mimeType || mimeType || "audio/webm" });
    },
  };
}
