// Small pure formatting helpers shared by the views.

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];

/** Human byte size, e.g. 1536 -> "1.5 KiB". */
export function humanBytes(n) {
  if (!Number.isFinite(n)) return '–';
  let i = 0;
  let v = Math.abs(n);
  while (v >= 1024 && i < UNITS.length - 1) { v /= 1024; i++; }
  const s = i === 0 ? String(Math.round(v)) : v.toFixed(v < 10 ? 1 : 0);
  return `${n < 0 ? '-' : ''}${s} ${UNITS[i]}`;
}

/** Compact rate, e.g. 1.2k, 34, 0.4. */
export function humanCount(n) {
  if (!Number.isFinite(n)) return '–';
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (n >= 1e4) return `${Math.round(n / 1e3)}k`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}k`;
  if (n >= 10 || n === 0) return String(Math.round(n));
  return n.toFixed(1);
}

/** Duration in ms as "850 ms", "12.3 s", "4m 05s", "2h 03m". */
export function humanDuration(ms) {
  if (!Number.isFinite(ms) || ms < 0) return '–';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(Math.floor(s % 60)).padStart(2, '0')}s`;
  const h = Math.floor(m / 60);
  return `${h}h ${String(m % 60).padStart(2, '0')}m`;
}

/** "addr:port", with IPv6 addresses in brackets so the port stays unambiguous. */
export function endpoint(addr, port) {
  const a = addr ?? '?';
  return a.includes(':') ? `[${a}]:${port}` : `${a}:${port}`;
}

/** ISO timestamp -> local "HH:MM:SS.mmm". */
export function clockTime(ms) {
  if (!Number.isFinite(ms)) return '–';
  const d = new Date(ms);
  const p = (x, n = 2) => String(x).padStart(n, '0');
  return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
}

export function procLabel(pid, comm) {
  if (pid == null && !comm) return '?';
  return `${pid ?? '?'} ${comm ?? ''}`.trim();
}

/** A value for display, or "-" when the field is absent or null (fields the server may not send yet). */
export function orDash(v, fmt = String) {
  return v == null || v === '' ? '-' : fmt(v);
}

/** Microseconds as milliseconds, e.g. 1234 -> "1.23 ms". */
export function usAsMs(us) {
  if (!Number.isFinite(us)) return '-';
  const ms = us / 1000;
  return `${ms < 10 ? ms.toFixed(2) : ms < 100 ? ms.toFixed(1) : Math.round(ms)} ms`;
}

/** Epoch seconds -> local "HH:MM" (or "HH:MM:SS" with seconds=true). */
export function clockLabel(sec, seconds = false) {
  const d = new Date(sec * 1000);
  const p = (x) => String(x).padStart(2, '0');
  return `${p(d.getHours())}:${p(d.getMinutes())}${seconds ? `:${p(d.getSeconds())}` : ''}`;
}

/** The workload a connection belongs to: container id (short) if any, else the cgroup path's last part. */
export function workload(c) {
  if (c.container_id) return String(c.container_id).slice(0, 12);
  if (c.cgroup) return String(c.cgroup).split('/').filter(Boolean).pop() ?? c.cgroup;
  return '-';
}
