/** How times, ids and sizes read on the dashboard. */

/** The distinctive end of an id (ids are time-ordered UUIDs: their starts are alike). */
export function shortId(id) {
  return id ? `…${String(id).slice(-12)}` : "—";
}

/** "12 s ago" for an ISO time (the exact time goes in a title). */
export function ago(iso) {
  if (!iso) return "—";
  const seconds = Math.round((Date.now() - Date.parse(iso)) / 1000);
  if (Number.isNaN(seconds)) return "—";
  if (seconds < 2) return "just now";
  if (seconds < 90) return `${seconds} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 129600) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

export function localTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "—";
}

export function percent(progress) {
  return `${Math.round(Number(progress) || 0)} %`;
}

export function gigabytes(value) {
  return value === null || value === undefined ? "—" : `${value} GB`;
}

/** Requirements as `key=value` pairs: `gpu_memory_gb=24 models=sdxl,vae`. */
export function pairs(object) {
  const entries = Object.entries(object || {});
  if (!entries.length) return "—";
  return entries
    .map(([key, value]) => `${key}=${Array.isArray(value) ? value.join(",") : value}`)
    .join(" ");
}
