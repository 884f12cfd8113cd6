// Per-second counters from GET /history (sampled by the server), so the chart has the last hour
// as soon as the page opens and a reload keeps it. Polled incrementally with after=<newest t>.

export const HISTORY_SECONDS = 3600;

// Column names of GET /history, by the chart's and counters' names for them.
const COLUMNS = { newConns: 'opened', closes: 'closed', bytesIn: 'bytes_received', bytesOut: 'bytes_sent',
  events: 'events', lost: 'lost', open: 'open' };

export class ServerHistory {
  constructor(seconds = HISTORY_SECONDS) {
    this.seconds = seconds;
    this.rows = new Map(); // epoch second -> {column: value}
    this.latest = null;    // newest second held (server clock), null until loaded
  }

  get loaded() { return this.latest != null; }

  /** Merge a GET /history answer (columns) in; drop what is older than the window. */
  add(cols) {
    const t = cols?.t ?? [];
    for (let i = 0; i < t.length; i++) {
      const row = {};
      for (const col of Object.values(COLUMNS)) row[col] = Number(cols[col]?.[i] ?? 0);
      this.rows.set(t[i], row);
      if (this.latest == null || t[i] > this.latest) this.latest = t[i];
    }
    if (this.latest != null) {
      for (const s of this.rows.keys()) if (s <= this.latest - this.seconds) this.rows.delete(s);
    }
    return t.length;
  }

  /** Value of `name` (chart name) in second `sec`; 0 where no sample exists. */
  get(sec, name) { return this.rows.get(sec)?.[COLUMNS[name]] ?? 0; }

  has(sec) { return this.rows.has(sec); }

  /** Mean per second over the `span` seconds before `endSec` (as Rates.mean). */
  mean(endSec, name, span = 5) {
    let t = 0;
    for (let s = endSec - span; s < endSec; s++) t += this.get(s, name);
    return t / span;
  }

  reset() { this.rows.clear(); this.latest = null; }
}
