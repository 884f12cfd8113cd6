// Dashboard entry point: wires the stream and HTTP polling into the store, and the store into
// the views. All DOM work happens in one requestAnimationFrame pass, however fast events arrive.

import { Chart } from './chart.js';
import { Details } from './details.js';
import { download, exportRow, fileStamp, toCSV, toJSON } from './export.js';
import { humanBytes, humanCount } from './format.js';
import { ServerHistory } from './history.js';
import { LIMITS, Store } from './store.js';
import { Stream, withToken } from './stream.js';
import { ConnTable } from './table.js';
import { renderTalkers } from './talkers.js';

// The API lives at the root this directory is mounted under (/static/ or /web/), or beside us.
const here = new URL('.', import.meta.url);
const API = /\/(static|web)\/$/.test(here.pathname) ? new URL('..', here) : here;
const api = (path) => withToken(new URL(path, API));

const POLL_MS = 2000;
const HISTORY_POLL_MS = 1000;
const DETAIL_EVENTS = 1000; // events of one connection fetched for the details panel
const TABLE_MIN_MS = 150;  // at most ~7 table renders/s; the eye can't follow more
const SLOW_MIN_MS = 1000;  // chart, counters, talkers: per-second data

const $ = (sel) => document.querySelector(sel);
const store = new Store();
const history = new ServerHistory();
let chartWindow = 300;
let selected = null;
let health = { text: 'checking…', ok: null };
let stats = null;
let lastStatsEvents = null;
let lastUptime = Infinity;
let lastTable = 0;
let lastSlow = 0;
let renderedVersion = -1;
let frame = 0;
let snapshotLoaded = false;
let pending = []; // stream messages that arrive before the /connections snapshot is applied

const table = new ConnTable($('#conn-table'), $('#table-summary'), (id) => select(id));
table.onSort = () => { lastTable = 0; schedule(); };
const details = new Details($('#details'), () => select(null));
const chart = new Chart($('#chart'), $('#chart-readout'));

const stream = new Stream(API, () => store.maxSeq, {
  onMessage(msg) {
    if (snapshotLoaded) store.apply(msg); else pending.push(msg);
    if (msg?.type === 'dropped') resyncSoon();
    schedule();
  },
  onStatus() { renderStatus(); },
});

function select(id) {
  selected = id;
  table.selected = id;
  store.pinned = id;
  lastTable = 0;
  schedule();
  if (id) {
    const panel = $('#details');
    panel.scrollTop = 0;
    // Below the table (windows under 1700 px): bring the panel into view if it is out of sight.
    if (panel.getBoundingClientRect().top > window.innerHeight - 80) panel.scrollIntoView({ block: 'nearest' });
    loadEvents(id);
  }
}

/** The selected connection's events the server still holds, including those from before the page opened. */
async function loadEvents(id) {
  const conn = store.conns.get(id);
  if (!conn || conn.eventsFromServer) return;
  details.loading = id;
  schedule();
  try {
    const r = await getJSON(`connections/${encodeURIComponent(id)}/events?limit=${DETAIL_EVENTS}`);
    if (r.ok) store.mergeEvents(id, await r.json());
  } catch { /* the panel then says only streamed events are shown */ }
  if (details.loading === id) details.loading = null;
  lastTable = 0;
  schedule();
}

function schedule() {
  if (!frame) frame = requestAnimationFrame(render);
}

function render() {
  frame = 0;
  const now = Date.now();
  const serverNow = store.now();
  if (store.version !== renderedVersion && now - lastTable < TABLE_MIN_MS) {
    // Coalesce: come back when the minimum interval has passed instead of rendering every frame.
    setTimeout(schedule, TABLE_MIN_MS - (now - lastTable));
  } else if (store.version !== renderedVersion || now - lastTable >= SLOW_MIN_MS) {
    renderedVersion = store.version;
    lastTable = now;
    table.render(store.conns, serverNow);
    if (store.evicted) {
      $('#table-summary').append(` · ${store.evicted} evicted so far to stay under ${LIMITS.maxConnections} in page`);
    }
    details.render(selected ? store.conns.get(selected) ?? detailsKeep(selected) : null, selected, serverNow);
  }
  if (now - lastSlow >= SLOW_MIN_MS) {
    lastSlow = now;
    store.enforceLimits();
    // The chart and the per-second counters come from the server's history once it answered
    // (the same numbers after a reload); until then from what this page saw.
    const nowSec = history.loaded ? history.latest : Math.floor(serverNow / 1000) - 1;
    const source = history.loaded ? history : store.rates;
    chart.draw(source, nowSec, chartWindow);
    renderCounters(source, nowSec + 1);
    renderTalkers($('#top-talkers-body'), store.conns);
  }
}

// The selected connection stays in the details panel after it ages out of the table.
let keptForDetails = null;
function detailsKeep(id) { return keptForDetails?.id === id ? keptForDetails : null; }
setInterval(() => { if (selected && store.conns.has(selected)) keptForDetails = store.conns.get(selected); }, 1000);

function setText(sel, text) {
  const e = $(sel);
  if (e && e.textContent !== text) e.textContent = text;
}

function renderCounters(r, nowSec) {
  setText('#c-open', stats ? String(stats.connections_open ?? '–') : '–');
  setText('#c-new', humanCount(r.mean(nowSec, 'newConns')));
  setText('#c-close', humanCount(r.mean(nowSec, 'closes')));
  setText('#c-in', `${humanBytes(r.mean(nowSec, 'bytesIn'))}/s`);
  setText('#c-out', `${humanBytes(r.mean(nowSec, 'bytesOut'))}/s`);
  setText('#c-lost', stats ? String(stats.lost_kernel ?? 0) : '–');
  setText('#c-dropped', String(store.control.get('dropped') ?? 0));
  const others = [...store.control].filter(([t]) => t !== 'dropped').map(([t, n]) => `${t}: ${n}`);
  setText('#notices', others.length ? `stream notices — ${others.join(', ')}` : '');
  $('#c-lost').closest('.counter').classList.toggle('warn', !!stats?.lost_kernel);
  $('#c-dropped').closest('.counter').classList.toggle('warn', store.control.has('dropped'));
}

function renderStatus() {
  const el = $('#ws-status');
  const s = stream.status;
  let text;
  if (s === 'live') text = 'live';
  else if (s === 'connecting') text = 'connecting…';
  else if (stream.retryAt && s === 'disconnected') {
    text = `disconnected — reconnecting in ${Math.max(1, Math.ceil((stream.retryAt - Date.now()) / 1000))} s…`;
  } else text = 'disconnected — reconnecting…';
  if (el.textContent !== text) el.textContent = text;
  el.dataset.status = s === 'live' ? 'live' : s === 'connecting' ? 'connecting' : 'down';
}
setInterval(renderStatus, 500); // the countdown

function renderHealth() {
  setText('#health', health.text);
  $('#health').dataset.ok = String(health.ok);
  const mode = stats?.attach_mode;
  const modeText = mode == null ? '–' : typeof mode === 'object'
    ? Object.entries(mode).map(([k, v]) => `${k}=${v}`).join(', ') : String(mode);
  setText('#attach-mode', modeText);
  // serve --nats: the exporter's figures; a fleet view: how many hosts it hears from.
  const ex = stats?.export;
  const hosts = stats?.hosts ? Object.keys(stats.hosts).length : null;
  $('#nats-item').hidden = !ex && hosts == null;
  if (ex) {
    setText('#nats', `${ex.connected ? 'NATS connected' : 'NATS unreachable'} · ${ex.acknowledged} acked · `
      + `${ex.buffered} buffered · ${ex.dropped} dropped · ${ex.reconnects} reconnects`);
  } else if (hosts != null) {
    setText('#nats', `fleet of ${hosts} host${hosts === 1 ? '' : 's'} · ${stats.lost_export ?? 0} lost in export`);
  }
}

async function getJSON(path) {
  const res = await fetch(api(path), { cache: 'no-store' });
  const date = Date.parse(res.headers.get('date') ?? '');
  if (Number.isFinite(date)) store.syncClock(date, Date.now());
  return res;
}

async function poll() {
  try {
    const h = await getJSON('healthz');
    health = h.ok ? { text: 'healthy', ok: true } : { text: `unhealthy (HTTP ${h.status})`, ok: false };
  } catch {
    health = { text: 'unreachable', ok: false };
  }
  try {
    const r = await getJSON('stats');
    if (r.ok) {
      stats = await r.json();
      const total = Object.values(stats.events ?? {}).reduce((a, b) => a + (Number(b) || 0), 0);
      const uptime = Number(stats.uptime_s ?? Infinity);
      // Counters since start (and uptime) only go down if the service restarted: ids and seqs start over.
      if (lastStatsEvents != null && (total < lastStatsEvents || uptime < lastUptime)) restartedServer();
      lastStatsEvents = total;
      lastUptime = uptime;
    }
  } catch { /* reported through health */ }
  renderHealth();
  lastSlow = 0;
  schedule();
}

let historyBusy = false;
async function pollHistory() {
  if (historyBusy) return;
  historyBusy = true;
  try {
    const after = history.latest ?? 0;
    const r = await getJSON(`history?after=${after}&seconds=${history.seconds}`);
    if (r.ok && history.add(await r.json())) { lastSlow = 0; schedule(); }
  } catch { /* the chart falls back to what the page saw */ }
  historyBusy = false;
}

async function loadSnapshot() {
  try {
    const r = await getJSON(`connections?limit=500`);
    if (!r.ok) throw new Error(`GET /connections answered ${r.status}`);
    store.load(await r.json());
    setText('#load-error', '');
  } catch (e) {
    setText('#load-error', `Could not load existing connections: ${e.message}. Showing live events only.`);
  }
  snapshotLoaded = true;
  for (const m of pending) store.apply(m);
  pending = [];
  schedule();
}

/** Server-side narrowing for the filter box: /connections takes port and pid, so a filter naming
 *  one can fetch matches the page never received (opened before it, evicted, or dropped). */
function filterQueries(text) {
  const terms = text.trim().split(/\s+/);
  const q = new URLSearchParams({ limit: '500' });
  for (const t of terms) {
    const m = t.match(/^(port|pid):(\d+)$/);
    if (m) q.set(m[1], m[2]);
  }
  if (q.has('port') || q.has('pid')) return [q.toString()];
  const bare = terms.find((t) => /^\d+$/.test(t));
  return bare ? [`port=${bare}&limit=500`, `pid=${bare}&limit=500`] : [];
}

async function fetchInto(queries) {
  for (const q of queries) {
    try {
      const r = await getJSON(`connections?${q}`);
      if (r.ok) store.load(await r.json());
    } catch { /* best effort: the stream still delivers */ }
  }
  schedule();
}

// Dropped events may include a connection's close or its last bytes: refetch the snapshot
// (at most every few seconds) so rows heal instead of staying stale until they age out.
let resyncTimer = null;
function resyncSoon() {
  if (resyncTimer || !snapshotLoaded) return;
  resyncTimer = setTimeout(async () => {
    await fetchInto(['limit=500', ...filterQueries($('#filter').value)]);
    setTimeout(() => { resyncTimer = null; }, 3000);
  }, 250);
}

function restartedServer() {
  store.reset();
  history.reset();
  snapshotLoaded = false;
  pending = [];
  stream.restart();
  loadSnapshot();
}

let filtering = false;
let filterFetch = null;
store.protect = (c) => c.id === selected || (filtering && table.filter(c));
$('#filter').addEventListener('input', (e) => {
  table.setFilter(e.target.value);
  filtering = e.target.value.trim() !== '';
  clearTimeout(filterFetch);
  filterFetch = setTimeout(() => fetchInto(filterQueries(e.target.value)), 300);
  lastTable = 0;
  schedule();
});
document.addEventListener('keydown', (e) => {
  if (e.key === '/' && document.activeElement !== $('#filter')) { e.preventDefault(); $('#filter').focus(); }
  if (e.key === 'Escape' && selected) select(null);
});
window.addEventListener('resize', () => { lastSlow = 0; schedule(); });
for (const b of document.querySelectorAll('.range button')) {
  b.addEventListener('click', () => {
    chartWindow = Number(b.dataset.window);
    for (const o of document.querySelectorAll('.range button')) o.setAttribute('aria-pressed', String(o === b));
    lastSlow = 0;
    schedule();
  });
}

function exportTable(kind) {
  const now = store.now();
  const rows = table.matching.map((c) => exportRow(c, now));
  const name = `conn-tracer-${fileStamp(Date.now())}.${kind}`;
  if (kind === 'csv') download(name, 'text/csv', toCSV(rows));
  else download(name, 'application/json', toJSON(rows));
}
$('#export-csv').addEventListener('click', () => exportTable('csv'));
$('#export-json').addEventListener('click', () => exportTable('json'));
setInterval(schedule, 1000); // ages, chart and eviction move on even when no events arrive

// For tests and for poking from the console.
window.__connTracer = {
  store, stream, history, chart, table, limits: LIMITS,
  get ws() { return stream.ws; },
  simulateOutage: (ms) => stream.simulateOutage(ms),
};

// Subscribe first, then snapshot: events in between are buffered, so the seam has no gap.
await poll();
stream.connect();
await Promise.all([loadSnapshot(), pollHistory()]);
setInterval(poll, POLL_MS);
setInterval(pollHistory, HISTORY_POLL_MS);

