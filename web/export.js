// Export of the current table (filtered and sorted as shown) as CSV or JSON, made in the page:
// the rows are the page's own model, so what is downloaded is what the table holds.

// Connection fields in API order (API.md); timestamps as ISO 8601 UTC like GET /connections.
export const EXPORT_FIELDS = ['id', 'host', 'family', 'role', 'state', 'src_addr', 'src_port', 'dst_addr', 'dst_port',
  'pid', 'comm', 'bytes_sent', 'bytes_received', 'started_at', 'closed_at', 'duration_ms', 'close_reason',
  'srtt_us', 'rttvar_us', 'retrans_segs', 'bytes_retrans', 'connect_us', 'cgroup', 'container_id', 'netns'];

const iso = (ms) => (Number.isFinite(ms) ? new Date(ms).toISOString() : null);

/** One connection of the page as a plain object with EXPORT_FIELDS (null where unknown). */
export function exportRow(c, serverNow) {
  const end = c.closedMs ?? serverNow;
  const derived = {
    started_at: iso(c.startedMs),
    closed_at: iso(c.closedMs),
    duration_ms: Number.isFinite(c.startedMs) ? Math.max(0, end - c.startedMs) : null,
  };
  const out = {};
  for (const f of EXPORT_FIELDS) out[f] = f in derived ? derived[f] : c[f] ?? null;
  return out;
}

function csvCell(v) {
  if (v == null) return '';
  const s = String(v);
  // Quote what would break a field; a leading = + - @ is neutralised so spreadsheets do not run it.
  const safe = /^[=+\-@]/.test(s) && !/^-?\d/.test(s) ? `'${s}` : s;
  return /[",\r\n]/.test(safe) ? `"${safe.replaceAll('"', '""')}"` : safe;
}

export function toCSV(rows) {
  const lines = [EXPORT_FIELDS.join(',')];
  for (const r of rows) lines.push(EXPORT_FIELDS.map((f) => csvCell(r[f])).join(','));
  return `${lines.join('\r\n')}\r\n`;
}

export function toJSON(rows) {
  return `${JSON.stringify(rows, null, 1)}\n`;
}

/** Save `text` as a file through a temporary object URL (no server round trip). */
export function download(name, type, text) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = document.createElement('a');
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

export function fileStamp(ms) {
  const d = new Date(ms);
  const p = (x) => String(x).padStart(2, '0');
  return `${d.getFullYear()}${p(d.getMonth() + 1)}${p(d.getDate())}-${p(d.getHours())}${p(d.getMinutes())}${p(d.getSeconds())}`;
}
