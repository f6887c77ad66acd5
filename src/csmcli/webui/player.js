// Plays a streamed response of headerless s16le mono PCM through Web Audio as the bytes arrive.

/**
 * Reads `response.body` to the end, scheduling each piece right after the previous one, and calls
 * `onProgress(stats)` as it goes.  Stops (and silences) when `signal` aborts.  Resolves to the stats:
 * requestStart, firstByteAt, firstScheduledAt, fetchDoneAt (performance.now() times) and samples.
 */
export async function playPcmStream(response, { sampleRate, requestStart, signal, onProgress }) {
  const ctx = new AudioContext({ sampleRate });
  if (ctx.state === "suspended") await ctx.resume();
  const sources = [];
  const stats = {
    sampleRate,
    requestStart,
    firstByteAt: null,
    firstScheduledAt: null,
    fetchDoneAt: null,
    samples: 0,
    pcm: [],
  };
  let nextTime = 0;
  let carry = null; // an odd trailing byte waiting for its partner

  const silence = () => {
    for (const source of sources) {
      try {
        source.stop();
      } catch {
        /* already stopped */
      }
    }
    ctx.close();
  };
  signal.addEventListener("abort", silence, { once: true });

  const reader = response.body.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      if (stats.firstByteAt === null) stats.firstByteAt = performance.now();
      let bytes = value;
      if (carry !== null) {
        const joined = new Uint8Array(bytes.length + 1);
        joined[0] = carry;
        joined.set(bytes, 1);
        bytes = joined;
        carry = null;
      }
      if (bytes.length % 2) {
        carry = bytes[bytes.length - 1];
        bytes = bytes.subarray(0, bytes.length - 1);
      }
      if (!bytes.length) continue;
      const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
      const samples = new Float32Array(bytes.length / 2);
      for (let i = 0; i < samples.length; i++) samples[i] = view.getInt16(2 * i, true) / 32768;
      stats.pcm.push(samples);
      stats.samples += samples.length;

      const buffer = ctx.createBuffer(1, samples.length, sampleRate);
      buffer.copyToChannel(samples, 0);
      const source = ctx.createBufferSource();
      source.buffer = buffer;
      source.connect(ctx.destination);
      nextTime = Math.max(nextTime, ctx.currentTime + 0.05);
      source.start(nextTime);
      nextTime += buffer.duration;
      sources.push(source);
      if (stats.firstScheduledAt === null) stats.firstScheduledAt = performance.now();
      onProgress(stats);
    }
    stats.fetchDoneAt = performance.now();
  } finally {
    signal.removeEventListener("abort", silence);
  }
  const left = Math.max(0, nextTime - ctx.currentTime);
  setTimeout(() => ctx.state !== "closed" && ctx.close(), left * 1000 + 250);
  return stats;
}
