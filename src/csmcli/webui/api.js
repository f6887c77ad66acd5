// Talking to csm serve: the API key (asked for once, kept in sessionStorage) and readable errors.

const KEY_ITEM = "csm-api-key";

/** An error the page can show: the server's JSON message, with the field it names. */
export class ApiError extends Error {
  constructor(status, message, code = "", param = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param;
  }

  /** One line for the status area, e.g. "audio: audio is larger than the 10 MB upload limit (413)". */
  describe() {
    const field = this.param && !this.message.startsWith(this.param) ? `${this.param}: ` : "";
    return `${field}${this.message}${this.status ? ` (${this.status})` : ""}`;
  }
}

/** The ApiError for a failed response (JSON error body if there is one, else the status text). */
export async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const err = body && body.error;
  if (err && typeof err.message === "string") {
    return new ApiError(response.status, err.message, err.code || "", err.param || null);
  }
  return new ApiError(response.status, response.statusText || "request failed");
}

/** Asks for the key in the page's dialog; resolves to the key, or null when cancelled. */
function askForKey(reason) {
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("api-key");
  document.getElementById("key-reason").textContent = reason;
  input.value = "";
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => resolve(dialog.returnValue === "ok" && input.value.trim() ? input.value.trim() : null),
      { once: true },
    );
    dialog.showModal();
    input.focus();
  });
}

/**
 * fetch() with the API key: on a 401 the key is asked for (again) and the request retried, so the
 * page works the same with and without --api-key.  Non-2xx answers throw an ApiError.
 */
export async function apiFetch(path, init = {}) {
  for (;;) {
    const headers = new Headers(init.headers || {});
    const key = sessionStorage.getItem(KEY_ITEM);
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(path, { ...init, headers });
    if (response.ok) return response;
    const error = await errorFrom(response);
    if (response.status !== 401) throw error;
    const reason = key ? `The key was not accepted: ${error.message}.` : "This server needs an API key.";
    const entered = await askForKey(reason);
    if (entered === null) throw error;
    sessionStorage.setItem(KEY_ITEM, entered);
  }
}

/** GET a JSON document. */
export async function getJson(path) {
  return (await apiFetch(path)).json();
}
