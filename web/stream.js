// WebSocket to /ws that reconnects by itself and resumes with after=<highest seq seen>,
// so an outage loses nothing that is still in the server's replay buffer.

const BACKOFF_MIN_MS = 500;

/** `url` with the page's own ?token= (if it was opened with one), for the API and /ws. */
export function withToken(url) {
  const token = new URLSearchParams(location.search).get('token');
  const u = new URL(url);
  if (token) u.searchParams.set('token', token);
  return u;
}
const BACKOFF_MAX_MS = 15_000;

export class Stream {
  /**
   * @param {URL} base  API root (http/https); /ws is resolved against it
   * @param {() => number|null} lastSeq  where to resume from
   * @param {{onMessage: Function, onStatus: Function}} handlers
   */
  constructor(base, lastSeq, handlers) {
    this.base = base;
    this.lastSeq = lastSeq;
    this.handlers = handlers;
    this.ws = null;
    this.status = 'connecting';
    this.attempt = 0;
    this.retryAt = null;
    this.holdUntil = 0;
    this.timer = null;
    this.urls = [];
  }

  url() {
    const u = new URL('ws', this.base);
    u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
    const seq = this.lastSeq();
    if (seq != null) u.searchParams.set('after', String(seq));
    // Arrays of up to 256 events per message: on a busy host one message per event costs the
    // server ~4 us each and the page one callback each (README, "What a subscriber costs").
    u.searchParams.set('batch', '256');
    return withToken(u).toString();
  }

  connect() {
    clearTimeout(this.timer);
    this.timer = null;
    this.retryAt = null;
    const url = this.url();
    this.urls.push(url);
    const ws = new WebSocket(url);
    this.ws = ws;
    this.#setStatus(this.attempt ? 'reconnecting' : 'connecting');
    ws.onopen = () => {
      if (ws !== this.ws) return;
      this.attempt = 0;
      this.#setStatus('live');
    };
    ws.onmessage = (e) => {
      if (ws !== this.ws || typeof e.data !== 'string') return;
      let msg;
      try { msg = JSON.parse(e.data); } catch { return; } // one bad frame must not stop the page
      if (Array.isArray(msg)) msg.forEach((m) => this.handlers.onMessage(m));
      else this.handlers.onMessage(msg);
    };
    // No onerror handler: an error is always followed by close, which is where we retry.
    ws.onclose = () => {
      if (ws !== this.ws) return;
      this.ws = null;
      this.#scheduleRetry();
    };
  }

  /** Drop the connection and stay down at least `ms` (used by tests to simulate an outage). */
  simulateOutage(ms) {
    this.holdUntil = Date.now() + ms;
    if (this.ws) this.ws.close(4000, 'simulated outage');
    else this.#scheduleRetry();
  }

  /** Reconnect from scratch (e.g. after the server restarted). */
  restart() {
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(1000, 'restart');
    this.attempt = 0;
    this.connect();
  }

  #scheduleRetry() {
    clearTimeout(this.timer);
    // Exponential backoff with jitter so many open dashboards don't reconnect in lockstep.
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** this.attempt);
    const delay = Math.max(base * (0.75 + Math.random() * 0.5), this.holdUntil - Date.now());
    this.attempt++;
    this.retryAt = Date.now() + delay;
    this.#setStatus('disconnected');
    this.timer = setTimeout(() => this.connect(), delay);
  }

  #setStatus(s) {
    this.status = s;
    this.handlers.onStatus(s, this);
  }
}
