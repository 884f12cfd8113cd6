// In-page model: connections, per-connection event history and per-second rates.
// Everything here is bounded so a busy host cannot grow the tab's memory without limit.

export const EVENT_TYPES = new Set(['syn_sent', 'syn_recv', 'established', 'data_queue', 'close', 'state_change']);

export const LIMITS = {
  maxConnections: 5000,      // evict oldest closed first, then least recently active
  eventsPerConnection: 200,  // keep the first `eventsHead` (the handshake) and the newest rest
  eventsHead: 40,
  closedTtlMs: 60_000,       // closed rows stay visible this long, then age out
  windowSeconds: 300,        // chart history
};

const FIELDS = ['family', 'role', 'state', 'src_addr', 'src_port', 'dst_addr', 'dst_port', 'pid', 'comm', 'netns',
  // TCP health and workload facts: absent from servers that do not report them yet (shown as "-").
  'srtt_us', 'rttvar_us', 'retrans_segs', 'bytes_retrans', 'connect_us', 'close_reason', 'cgroup', 'container_id',
  'host'];

/** What the page keeps of one event (the details panel's rows). */
function eventEntry(msg, ts) {
  return { seq: msg.seq, type: msg.type, state: msg.state, ts, bytes_sent: msg.bytes_sent,
    bytes_received: msg.bytes_received, pid: msg.pid, comm: msg.comm, srtt_us: msg.srtt_us,
    retrans_segs: msg.retrans_segs, close_reason: msg.close_reason };
}

/** Ring of per-second buckets keyed by epoch second (server clock). */
export class Rates {
  constructor(seconds) {
    this.n = seconds;
    this.sec = new Float64Array(seconds).fill(-1);
    this.series = { newConns: new Float64Array(seconds), closes: new Float64Array(seconds),
      bytesIn: new Float64Array(seconds), bytesOut: new Float64Array(seconds) };
    this.latest = 0;
  }

  add(sec, name, v) {
    if (!v || sec <= this.latest - this.n) return; // older than the window: nothing to draw it in
    const i = ((sec % this.n) + this.n) % this.n;
    if (this.sec[i] !== sec) {
      this.sec[i] = sec;
      for (const s of Object.values(this.series)) s[i] = 0;
    }
    this.series[name][i] += v;
    if (sec > this.latest) this.latest = sec;
  }

  get(sec, name) {
    const i = ((sec % this.n) + this.n) % this.n;
    return this.sec[i] === sec ? this.series[name][i] : 0;
  }

  /** Mean per second over the `span` complete seconds before `nowSec`. */
  mean(nowSec, name, span = 5) {
    let t = 0;
    for (let s = nowSec - span; s < nowSec; s++) t += this.get(s, name);
    return t / span;
  }
}

export class Store {
  constructor() {
    this.conns = new Map();   // id -> connection record (insertion order = first seen)
    this.maxSeq = null;       // highest seq seen on the stream; used to resume after a reconnect
    this.rates = new Rates(LIMITS.windowSeconds);
    this.control = new Map(); // control message type -> summed count (e.g. dropped, overwritten)
    this.notices = [];        // newest control messages, for display
    this.evicted = 0;
    this.serverOffsetMs = 0;  // server clock - browser clock (see syncClock)
    this.eventLag = -Infinity; // max(event ts - arrival time) since the last syncClock
    this.version = 0;         // bumps on any change; views redraw when it moves
    this.protect = () => false; // set by the app: connections to evict last
    this.pinned = null;       // the selected connection: never aged out while selected
  }

  now() { return Date.now() + this.serverOffsetMs; }

  /** Estimate the server's clock offset. Events arrive after their timestamp, so max(ts - arrival)
   *  is a tight lower bound; the Date header (1 s resolution, and uvicorn caches it up to a
   *  second) is only a coarse one, used until events arrive. */
  syncClock(dateMs, receivedLocal) {
    const lo = dateMs - receivedLocal;
    if (Number.isFinite(this.eventLag)) {
      this.serverOffsetMs = Math.max(lo, this.eventLag);
      this.clockFromEvents = true;
    } else if (!this.clockFromEvents) {
      this.serverOffsetMs = lo + 500;
    }
    this.eventLag = -Infinity;
  }

  /** Seed from GET /connections; events arriving later refine these records. */
  load(list) {
    const localNow = Date.now();
    for (const c of list) {
      const known = this.conns.get(c.id);
      if (known) { this.#heal(known, c, localNow); continue; }
      const rec = this.#newRecord(c.id, localNow);
      this.#assign(rec, c);
      rec.bytes_sent = c.bytes_sent ?? 0;
      rec.bytes_received = c.bytes_received ?? 0;
      rec.startedMs = Date.parse(c.started_at);
      rec.closedMs = c.closed_at ? Date.parse(c.closed_at) : null;
      // A closed connection from the snapshot ages out relative to when it really closed.
      rec.closedLocal = rec.closedMs == null ? null : rec.closedMs - this.serverOffsetMs;
      rec.fresh = false;
      rec.fromSnapshot = true;
      rec.knownEvents = c.events ?? null;
      this.conns.set(c.id, rec);
    }
    this.version++;
    this.enforceLimits();
  }

  /** After events were dropped, a fresh snapshot fills in what they would have told us;
   *  it only moves a connection forward (more bytes, closed), never back. */
  #heal(rec, c, localNow) {
    let changed = false;
    if ((c.bytes_sent ?? 0) > rec.bytes_sent) { rec.bytes_sent = c.bytes_sent; changed = true; }
    if ((c.bytes_received ?? 0) > rec.bytes_received) { rec.bytes_received = c.bytes_received; changed = true; }
    if (rec.closedMs == null && c.closed_at) {
      rec.closedMs = Date.parse(c.closed_at);
      rec.closedLocal = localNow;
      changed = true;
    }
    if (rec.closedMs == null || c.closed_at) {
      if (c.state && c.state !== rec.state) { rec.state = c.state; changed = true; }
    }
    if (rec.pid == null && c.pid != null) { rec.pid = c.pid; rec.comm = c.comm; changed = true; }
    for (const f of ['srtt_us', 'rttvar_us', 'retrans_segs', 'connect_us', 'close_reason', 'cgroup', 'container_id']) {
      if (c[f] != null && rec[f] == null) { rec[f] = c[f]; changed = true; }
    }
    if (changed) rec.version++;
  }

  /** Apply one stream message: an event, or a control message such as {"type":"dropped"}. */
  apply(msg) {
    if (!msg || typeof msg !== 'object') return;
    if (!EVENT_TYPES.has(msg.type) || msg.conn_id == null) {
      this.#control(msg);
      return;
    }
    if (typeof msg.seq === 'number') {
      // Resume with after=SEQ can never repeat an event; anything at or below it is a replay we hold.
      if (this.maxSeq != null && msg.seq <= this.maxSeq) return;
      this.maxSeq = msg.seq;
    }
    const localNow = Date.now();
    const ts = Date.parse(msg.ts);
    const sec = Math.floor((Number.isFinite(ts) ? ts : this.now()) / 1000);
    if (ts - localNow > this.eventLag) this.eventLag = ts - localNow;
    let rec = this.conns.get(msg.conn_id);
    const isNew = !rec;
    if (isNew) {
      rec = this.#newRecord(msg.conn_id, localNow);
      rec.startedMs = ts;
      // Bytes before our first sight of a connection are unknown unless we saw its SYN,
      // so only count from zero then; otherwise start the baseline here (no false spike).
      const fromStart = msg.type === 'syn_sent' || msg.type === 'syn_recv';
      rec.bytes_sent = fromStart ? 0 : msg.bytes_sent ?? 0;
      rec.bytes_received = fromStart ? 0 : msg.bytes_received ?? 0;
      this.conns.set(msg.conn_id, rec);
    }
    const closedAlready = rec.closedMs != null;
    // Kernel counters only grow; deltas between events are this connection's throughput.
    const sent = Math.max(rec.bytes_sent, msg.bytes_sent ?? 0);
    const recv = Math.max(rec.bytes_received, msg.bytes_received ?? 0);
    this.rates.add(sec, 'bytesOut', sent - rec.bytes_sent);
    this.rates.add(sec, 'bytesIn', recv - rec.bytes_received);
    rec.bytes_sent = sent;
    rec.bytes_received = recv;
    if (!closedAlready) this.#assign(rec, msg);
    else if (rec.pid == null && msg.pid != null) { rec.pid = msg.pid; rec.comm = msg.comm; }
    if (msg.close_reason != null) rec.close_reason = msg.close_reason;
    if ((msg.type === 'syn_sent' || msg.type === 'syn_recv') && !rec.countedNew) {
      rec.countedNew = true;
      this.rates.add(sec, 'newConns', 1);
    }
    if ((msg.type === 'close' || msg.state === 'CLOSE') && !closedAlready) {
      rec.closedMs = ts;
      rec.closedLocal = localNow;
      rec.state = 'CLOSE';
      this.rates.add(sec, 'closes', 1);
    }
    rec.lastLocal = localNow;
    // A fetch of this connection's events (details panel) may already hold events the stream brings later.
    if (!(rec.eventsFromServer && rec.events.some((e) => e.seq === msg.seq))) this.#pushEvent(rec, msg, ts);
    rec.version++;
    this.version++;
    if (isNew && this.conns.size > LIMITS.maxConnections) this.enforceLimits();
  }

  /** Age out closed connections and keep the page under its connection cap. Connections the
   *  user is looking at (`this.protect`: the selected one, those matching the filter) go last. */
  enforceLimits() {
    const localNow = Date.now();
    const protect = this.protect;
    let changed = false;
    for (const [id, c] of this.conns) {
      if (c.closedLocal != null && localNow - c.closedLocal > LIMITS.closedTtlMs && id !== this.pinned) {
        this.conns.delete(id);
        changed = true;
      }
    }
    if (this.conns.size > LIMITS.maxConnections) {
      // Evict down to 95% so a busy host doesn't pay for a sort on every new connection.
      const excess = this.conns.size - Math.floor(LIMITS.maxConnections * 0.95);
      const rank = (c) => (protect(c) ? 2 : 0) + (c.closedLocal != null ? 0 : 1);
      const order = [...this.conns.values()].map((c) => [rank(c), c]).sort(([ra, a], [rb, b]) => {
        if (ra !== rb) return ra - rb; // unprotected closed, unprotected open, protected closed, ...
        return (a.closedLocal ?? a.lastLocal) - (b.closedLocal ?? b.lastLocal);
      });
      for (const [, c] of order.slice(0, excess)) this.conns.delete(c.id);
      this.evicted += excess;
      changed = true;
    }
    if (changed) this.version++;
  }

  /** Forget everything (the server restarted: ids and seqs start over). */
  reset() {
    this.conns.clear();
    this.maxSeq = null;
    this.rates = new Rates(LIMITS.windowSeconds);
    this.version++;
  }

  #newRecord(id, localNow) {
    return {
      id, family: null, role: null, state: null, src_addr: null, src_port: null, dst_addr: null,
      dst_port: null, pid: null, comm: null, bytes_sent: 0, bytes_received: 0,
      startedMs: NaN, closedMs: null, closedLocal: null, firstLocal: localNow, lastLocal: localNow,
      fresh: true, fromSnapshot: false, knownEvents: null, countedNew: false, eventsFromServer: false,
      events: [], omitted: 0, version: 0,
    };
  }

  #assign(rec, src) {
    for (const f of FIELDS) {
      // pid/comm can be unknown on some events (softirq); never overwrite a known owner with null.
      if (src[f] === undefined || (src[f] === null && rec[f] != null)) continue;
      rec[f] = src[f];
    }
  }

  /** Events of one connection from GET /connections/{id}/events (those from before the page opened
   *  too): merged with what the stream delivered, by seq, oldest first. */
  mergeEvents(id, list) {
    const rec = this.conns.get(id);
    if (!rec || !Array.isArray(list)) return;
    const bySeq = new Map(rec.events.map((e) => [e.seq, e]));
    for (const ev of list) {
      if (ev && typeof ev.seq === 'number' && !bySeq.has(ev.seq)) bySeq.set(ev.seq, eventEntry(ev, Date.parse(ev.ts)));
    }
    rec.events = [...bySeq.values()].sort((a, b) => a.seq - b.seq);
    rec.omitted = 0;
    if (rec.events.length > LIMITS.eventsPerConnection) {
      const cut = rec.events.length - LIMITS.eventsPerConnection;
      rec.events.splice(LIMITS.eventsHead, cut);
      rec.omitted = cut;
    }
    rec.eventsFromServer = true;
    rec.version++;
    this.version++;
  }

  #pushEvent(rec, msg, ts) {
    rec.events.push(eventEntry(msg, ts));
    if (rec.events.length > LIMITS.eventsPerConnection) {
      // Drop from the middle: the handshake and the newest events tell the story.
      rec.events.splice(LIMITS.eventsHead, 1);
      rec.omitted++;
    }
  }

  #control(msg) {
    const type = String(msg.type ?? 'unknown');
    const count = Number.isFinite(msg.count) ? msg.count : 1;
    this.control.set(type, (this.control.get(type) ?? 0) + count);
    this.notices.unshift({ at: Date.now(), type, count, msg });
    this.notices.length = Math.min(this.notices.length, 20);
    this.version++;
  }
}
