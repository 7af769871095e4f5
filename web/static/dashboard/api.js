/**
 * The REST API with the operator's key. The key lives in this browser's
 * localStorage only and is sent as `Authorization: Bearer <key>`.
 */

const STORAGE_KEY = "emp.dashboard.apiKey";

/** Fires `unauthorized` when the API refuses the key (401). */
export const authEvents = new EventTarget();

export function apiKey() {
  return localStorage.getItem(STORAGE_KEY) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(STORAGE_KEY, key);
  else localStorage.removeItem(STORAGE_KEY);
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Call the API; resolves to the JSON body or rejects with an ApiError. */
export async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch {
    throw new ApiError(0, "UNREACHABLE", "the API cannot be reached");
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok || !data || data.success === false) {
    const error = (data && data.error) || {};
    const failure = new ApiError(
      response.status,
      error.code || `HTTP_${response.status}`,
      error.message || response.statusText || "request failed",
    );
    if (response.status === 401) authEvents.dispatchEvent(new Event("unauthorized"));
    throw failure;
  }
  return data;
}

/** What to tell the operator about a failed call. */
export function explain(error) {
  if (!(error instanceof ApiError)) return String(error);
  if (error.status === 401) {
    return "The API key was refused (401 UNAUTHORIZED): enter a valid key above.";
  }
  if (error.status === 403) {
    return `${error.message || "this needs an admin key"} (403 FORBIDDEN).`;
  }
  if (error.status === 0) return "The API cannot be reached; retrying.";
  return `${error.code}: ${error.message}`;
}

export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") search.set(name, value);
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}
