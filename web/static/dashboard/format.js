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

/** A length of time in seconds as it reads best: "0.4 s", "12 s", "3.5 min", "2.1 h". */
export function duration(seconds) {
  const s = Number(seconds);
  if (seconds === null || seconds === undefined || !Number.isFinite(s) || s < 0) return "—";
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${(s / 60).toFixed(1)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

/** Seconds from one ISO time to another (or to now), or null when the start is unknown. */
export function secondsBetween(fromIso, toIso) {
  if (!fromIso) return null;
  const end = toIso ? Date.parse(toIso) : Date.now();
  const start = Date.parse(fromIso);
  if (Number.isNaN(start) || Number.isNaN(end)) return null;
  return Math.max(0, (end - start) / 1000);
}
