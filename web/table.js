// Connection table: filter, sort, and a capped, keyed render that reuses row elements
// so thousands of events per second cost only the cells whose text actually changed.

import { endpoint, humanBytes, humanDuration, orDash, procLabel, usAsMs, workload } from './format.js';

export const MAX_ROWS = 300;
const FRESH_MS = 1500;

// `text` renders a cell from a connection; `get` is the sort key. Which columns a narrow screen
// hides is in style.css (by data-col), so the markup stays the same at every width.
export const COLUMNS = [
  { key: 'role', label: 'role', get: (c) => c.role ?? '', text: (c) => c.role ?? '?' },
  { key: 'local', label: 'local', get: (c) => `${c.src_addr ?? ''}\u0000${String(c.src_port ?? 0).padStart(5, '0')}`,
    text: (c) => endpoint(c.src_addr, c.src_port), title: true },
  { key: 'remote', label: 'remote', get: (c) => `${c.dst_addr ?? ''}\u0000${String(c.dst_port ?? 0).padStart(5, '0')}`,
    text: (c) => endpoint(c.dst_addr, c.dst_port), title: true },
  { key: 'state', label: 'state', get: (c) => c.state ?? '', text: (c) => c.state ?? '?' },
  { key: 'pid', label: 'pid / comm', get: (c) => c.pid ?? -1, text: (c) => procLabel(c.pid, c.comm), title: true },
  { key: 'sent', label: 'sent', get: (c) => c.bytes_sent, num: true, text: (c) => String(c.bytes_sent),
    tip: (c) => humanBytes(c.bytes_sent) },
  { key: 'recv', label: 'received', get: (c) => c.bytes_received, num: true, text: (c) => String(c.bytes_received),
    tip: (c) => humanBytes(c.bytes_received) },
  { key: 'rtt', label: 'rtt', get: (c) => c.srtt_us ?? -1, num: true, text: (c) => orDash(c.srtt_us, usAsMs),
    tip: (c) => (c.rttvar_us == null ? 'smoothed RTT' : `smoothed RTT, variance ${usAsMs(c.rttvar_us)}`) },
  { key: 'retrans', label: 'retrans', get: (c) => c.retrans_segs ?? -1, num: true, text: (c) => orDash(c.retrans_segs),
    tip: () => 'segments retransmitted' },
  { key: 'reason', label: 'close', get: (c) => c.close_reason ?? '', text: (c) => orDash(c.close_reason) },
  { key: 'workload', label: 'cgroup', get: (c) => workload(c), text: (c) => workload(c),
    tip: (c) => c.cgroup ?? 'cgroup unknown' },
  { key: 'host', label: 'host', get: (c) => c.host ?? '', text: (c) => orDash(c.host), title: true },
  { key: 'age', label: 'age / duration', get: (c) => -(c.startedMs || c.firstLocal), num: true },
];

/** Build a predicate from the filter box. Whitespace-separated terms must all match.
 *  A bare number matches a port (either end) or pid exactly; `key:value` narrows to one field
 *  (port, pid, addr, state, role, comm, family, id); anything else is a substring of the row. */
export function makeFilter(text) {
  const terms = text.trim().toLowerCase().split(/\s+/).filter(Boolean);
  if (!terms.length) return () => true;
  const preds = terms.map((t) => {
    const kv = t.match(/^(port|pid|addr|state|role|comm|family|id|host|cgroup|reason):(.+)$/);
    if (kv) {
      const [, k, v] = kv;
      if (k === 'port') return (c) => String(c.src_port) === v || String(c.dst_port) === v;
      if (k === 'pid') return (c) => String(c.pid) === v;
      if (k === 'addr') return (c) => `${c.src_addr} ${c.dst_addr}`.toLowerCase().includes(v);
      if (k === 'reason') return (c) => String(c.close_reason ?? '').toLowerCase().includes(v);
      if (k === 'cgroup') return (c) => `${c.cgroup ?? ''} ${c.container_id ?? ''}`.toLowerCase().includes(v);
      return (c) => String(c[k] ?? '').toLowerCase().includes(v);
    }
    if (/^\d+$/.test(t)) return (c) => String(c.src_port) === t || String(c.dst_port) === t || String(c.pid) === t;
    return (c) => haystack(c).includes(t);
  });
  return (c) => preds.every((p) => p(c));
}

function haystack(c) {
  return [c.id, c.family, c.role, c.state, endpoint(c.src_addr, c.src_port), endpoint(c.dst_addr, c.dst_port),
    c.pid, c.comm, c.closedMs != null ? 'closed' : 'open', c.close_reason, c.cgroup, c.container_id, c.host]
    .filter((x) => x != null).join(' ').toLowerCase();
}

export class ConnTable {
  constructor(table, summary, onSelect) {
    this.table = table;
    this.summary = summary;
    this.tbody = table.tBodies[0];
    this.rows = new Map(); // id -> {tr, cells, version}
    this.sortKey = 'age';
    this.sortDir = 1;
    this.filter = () => true;
    this.matching = [];
    this.selected = null;
    this.onSelect = onSelect;
    this.table.dataset.hosts = 'one';
    this.#header();
    this.tbody.addEventListener('click', (e) => {
      const tr = e.target.closest('tr[data-conn-id]');
      if (tr) this.onSelect(tr.dataset.connId);
    });
    this.tbody.addEventListener('keydown', (e) => {
      const tr = e.target.closest('tr[data-conn-id]');
      if (tr && (e.key === 'Enter' || e.key === ' ')) { e.preventDefault(); this.onSelect(tr.dataset.connId); }
    });
  }

  #header() {
    const tr = this.table.tHead.rows[0];
    tr.replaceChildren();
    for (const col of COLUMNS) {
      const th = document.createElement('th');
      th.scope = 'col';
      th.dataset.col = col.key;
      if (col.num) th.className = 'num';
      const b = document.createElement('button');
      b.type = 'button';
      b.textContent = col.label;
      b.addEventListener('click', () => {
        if (this.sortKey === col.key) this.sortDir = -this.sortDir;
        else { this.sortKey = col.key; this.sortDir = col.num ? -1 : 1; }
        this.dirty = true;
        this.onSort?.();
      });
      th.append(b);
      tr.append(th);
    }
    this.#markSort();
  }

  #markSort() {
    for (const th of this.table.tHead.rows[0].cells) {
      const on = th.dataset.col === this.sortKey;
      th.setAttribute('aria-sort', on ? (this.sortDir > 0 ? 'ascending' : 'descending') : 'none');
    }
  }

  setFilter(text) { this.filter = makeFilter(text); }

  /** Render the current model; cheap when little changed. */
  render(conns, serverNow) {
    const localNow = Date.now();
    this.#markSort();
    const col = COLUMNS.find((c) => c.key === this.sortKey);
    const dir = this.sortDir;
    const matching = [];
    for (const c of conns.values()) if (this.filter(c)) matching.push(c);
    matching.sort((a, b) => {
      const x = col.get(a), y = col.get(b);
      if (x < y) return -dir;
      if (x > y) return dir;
      return a.id < b.id ? -1 : a.id > b.id ? 1 : 0; // stable order keeps rows from jumping
    });
    this.matching = matching; // the current table, in order, for export
    const shown = matching.slice(0, MAX_ROWS);
    const keep = new Set();
    let prev = null;
    for (const c of shown) {
      keep.add(c.id);
      let row = this.rows.get(c.id);
      if (!row) {
        row = this.#makeRow(c, localNow);
        this.rows.set(c.id, row);
      }
      this.#fill(row, c, serverNow);
      // Move only rows that are out of place; DOM moves are the expensive part.
      const want = prev ? prev.nextSibling : this.tbody.firstChild;
      if (want !== row.tr) this.tbody.insertBefore(row.tr, want);
      prev = row.tr;
    }
    for (const [id, row] of this.rows) {
      if (!keep.has(id)) { row.tr.remove(); this.rows.delete(id); }
    }
    let open = 0;
    const hosts = new Set();
    for (const c of conns.values()) {
      if (c.closedMs == null) open++;
      if (c.host != null && hosts.size < 2) hosts.add(c.host);
    }
    // The host column only says something when the page holds connections of several hosts (fleet).
    const many = hosts.size > 1 ? 'many' : 'one';
    if (this.table.dataset.hosts !== many) this.table.dataset.hosts = many;
    const hidden = matching.length - shown.length;
    this.summary.textContent = `${matching.length} matching of ${conns.size} in page (${open} open, `
      + `${conns.size - open} closed)` + (hidden > 0 ? ` — showing the first ${shown.length}; `
      + `${hidden} more match, narrow the filter or change the sort to see them` : '');
    this.empty = matching.length === 0;
  }

  #makeRow(c, localNow) {
    const tr = document.createElement('tr');
    tr.dataset.connId = c.id;
    tr.tabIndex = 0;
    // Only rows that appeared just now flash; a row re-entering the view after a filter change doesn't.
    if (c.fresh && localNow - c.firstLocal < FRESH_MS) tr.classList.add('fresh');
    const cells = {};
    for (const col of COLUMNS) {
      const td = document.createElement('td');
      td.dataset.col = col.key;
      if (col.num) td.className = 'num';
      tr.append(td);
      cells[col.key] = td;
    }
    return { tr, cells, version: -1, closed: null, selected: null };
  }

  #fill(row, c, serverNow) {
    const closed = c.closedMs != null;
    // Open rows show age (ticks every render), closed rows their final duration; both on the server clock.
    const ms = closed ? c.closedMs - c.startedMs : serverNow - c.startedMs;
    set(row.cells.age, humanDuration(Number.isFinite(ms) ? Math.max(0, ms) : Date.now() - c.firstLocal));
    if (row.version !== c.version) {
      row.version = c.version;
      for (const col of COLUMNS) {
        if (!col.text) continue;
        const td = row.cells[col.key];
        const text = col.text(c);
        set(td, text);
        const tip = col.tip ? col.tip(c) : col.title ? text : null; // a cell may be cut with an ellipsis
        if (tip != null && td.title !== tip) td.title = tip;
      }
      row.cells.state.dataset.state = c.state ?? '';
    }
    if (row.closed !== closed) {
      row.closed = closed;
      row.tr.classList.toggle('closed', closed);
    }
    const sel = this.selected === c.id;
    if (row.selected !== sel) {
      row.selected = sel;
      row.tr.classList.toggle('selected', sel);
      row.tr.setAttribute('aria-selected', String(sel));
    }
  }
}

function set(el, text) { if (el.textContent !== text) el.textContent = text; }
