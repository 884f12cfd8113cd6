// Details panel: one connection's facts and its events (those the server still holds, from
// GET /connections/{id}/events, plus what the stream brought since), so the state timeline
// (SYN_SENT -> ESTABLISHED -> ... -> CLOSE) can be read top to bottom.

import { clockTime, endpoint, humanBytes, humanDuration, orDash, procLabel, usAsMs } from './format.js';

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v; else e.setAttribute(k, v);
  }
  e.append(...children.filter((c) => c != null));
  return e;
}

/** Distinct consecutive states seen in the events, e.g. ["SYN_SENT", "ESTABLISHED", "CLOSE"]. */
export function stateTimeline(events) {
  const out = [];
  for (const ev of events) if (ev.state && out[out.length - 1] !== ev.state) out.push(ev.state);
  return out;
}

export class Details {
  constructor(root, onClose) {
    this.root = root;
    this.onClose = onClose;
    this.shown = null; // [id, version] last rendered
    this.loading = null; // id whose events are being fetched
  }

  render(conn, id, serverNow) {
    if (!id) {
      if (this.shown !== null) {
        this.shown = null;
        this.root.replaceChildren(el('h2', {}, 'Connection details'),
          el('p', { class: 'muted' }, 'Click a row to see its events and state timeline.'));
      }
      return;
    }
    const key = `${id}:${conn ? conn.version : 'gone'}:${conn?.closedMs == null ? Math.floor(serverNow / 1000) : ''}`
      + `:${this.loading === id}`;
    if (this.shown === key) return;
    this.shown = key;
    const close = el('button', { type: 'button', class: 'close', 'aria-label': 'close details' }, '×');
    close.addEventListener('click', () => this.onClose());
    if (!conn) {
      this.root.replaceChildren(el('div', { class: 'details-head' }, el('h2', {}, 'Connection details'), close),
        el('p', { class: 'muted' }, `Connection ${id} is no longer held by this page (aged out or evicted).`));
      return;
    }
    const closed = conn.closedMs != null;
    const dur = closed ? conn.closedMs - conn.startedMs : serverNow - conn.startedMs;
    const facts = el('dl', { class: 'facts' });
    const fact = (k, v) => facts.append(el('dt', {}, k), el('dd', {}, v));
    fact('id', conn.id);
    fact('role', `${conn.role ?? '?'} (${conn.family ?? '?'})`);
    fact('local', endpoint(conn.src_addr, conn.src_port));
    fact('remote', endpoint(conn.dst_addr, conn.dst_port));
    fact('process', procLabel(conn.pid, conn.comm));
    fact('state', conn.state ?? '?');
    fact('sent', `${conn.bytes_sent} (${humanBytes(conn.bytes_sent)})`);
    fact('received', `${conn.bytes_received} (${humanBytes(conn.bytes_received)})`);
    fact('started', clockTime(conn.startedMs));
    fact(closed ? 'duration' : 'age', humanDuration(dur));
    fact('rtt', conn.srtt_us == null ? '-'
      : `${usAsMs(conn.srtt_us)}${conn.rttvar_us == null ? '' : ` ± ${usAsMs(conn.rttvar_us)}`}`);
    fact('retransmits', conn.retrans_segs == null ? '-'
      : `${conn.retrans_segs} segments${conn.bytes_retrans ? ` (${humanBytes(conn.bytes_retrans)})` : ''}`);
    fact('connect', orDash(conn.connect_us, usAsMs));
    fact('close reason', orDash(conn.close_reason));
    fact('cgroup', orDash(conn.cgroup));
    fact('container', orDash(conn.container_id));
    fact('host', orDash(conn.host));
    fact('netns', orDash(conn.netns));

    const states = stateTimeline(conn.events);
    const timeline = el('ol', { class: 'timeline', 'aria-label': 'state timeline' });
    states.forEach((s, i) => {
      if (i) timeline.append(el('li', { class: 'arrow', 'aria-hidden': 'true' }, '→'));
      timeline.append(el('li', { 'data-state': s }, s));
    });

    const parts = [el('div', { class: 'details-head' }, el('h2', {}, 'Connection details'), close), facts];
    if (states.length) parts.push(el('h3', {}, 'State timeline'), timeline);
    if (this.loading === id && !conn.eventsFromServer) {
      parts.push(el('p', { class: 'muted' }, 'Loading its events from the server…'));
    } else if (!conn.eventsFromServer && (!conn.events.length || conn.fromSnapshot)) {
      // The server's replay buffer could not be read: say what is missing rather than imply none.
      const known = conn.knownEvents != null ? ` The server counted ${conn.knownEvents} events for it.` : '';
      parts.push(el('p', { class: 'muted' }, `Only events streamed since the page opened are shown.${known}`));
    } else if (conn.knownEvents != null && conn.knownEvents > conn.events.length + conn.omitted) {
      parts.push(el('p', { class: 'muted' }, `The server counted ${conn.knownEvents} events; older ones have `
        + 'left its replay buffer.'));
    }
    if (conn.events.length) {
      const tbody = el('tbody');
      conn.events.forEach((ev, i) => {
        if (conn.omitted && i === 40) {
          tbody.append(el('tr', { class: 'omitted' }, el('td', { colspan: '5' }, `… ${conn.omitted} events omitted …`)));
        }
        tbody.append(el('tr', {}, el('td', {}, clockTime(ev.ts)), el('td', {}, ev.type), el('td', {}, ev.state ?? ''),
          el('td', { class: 'num' }, String(ev.bytes_sent ?? '')), el('td', { class: 'num' }, String(ev.bytes_received ?? ''))));
      });
      const head = el('thead', {}, el('tr', {}, ...['time', 'event', 'state', 'sent', 'recv'].map(
        (h, i) => el('th', { scope: 'col', class: i > 2 ? 'num' : '' }, h))));
      parts.push(el('h3', {}, `Events (${conn.events.length + conn.omitted})`),
        el('div', { class: 'events-wrap' }, el('table', { class: 'events' }, head, tbody)));
    }
    this.root.replaceChildren(...parts);
  }
}
