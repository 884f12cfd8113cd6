// Top talkers over the connections held in the page: by bytes and by connection count,
// grouped per process and per remote address.

import { humanBytes } from './format.js';

const TOP = 5;

function top(conns, keyOf, valueOf) {
  const m = new Map();
  for (const c of conns.values()) {
    const k = keyOf(c);
    m.set(k, (m.get(k) ?? 0) + valueOf(c));
  }
  return [...m].filter(([, v]) => v > 0).sort((a, b) => b[1] - a[1]).slice(0, TOP);
}

export function renderTalkers(root, conns) {
  const proc = (c) => (c.pid == null && !c.comm ? 'unknown process' : `${c.comm ?? '?'} (${c.pid ?? '?'})`);
  const remote = (c) => c.dst_addr ?? '?';
  const bytes = (c) => c.bytes_sent + c.bytes_received;
  const one = () => 1;
  const groups = [
    ['Process by bytes', top(conns, proc, bytes), humanBytes],
    ['Remote by bytes', top(conns, remote, bytes), humanBytes],
    ['Process by connections', top(conns, proc, one), String],
    ['Remote by connections', top(conns, remote, one), String],
  ];
  const frag = document.createDocumentFragment();
  for (const [title, rows, fmt] of groups) {
    const sec = document.createElement('section');
    const h = document.createElement('h3');
    h.textContent = title;
    const ol = document.createElement('ol');
    const max = rows.length ? rows[0][1] : 1;
    for (const [k, v] of rows) {
      const li = document.createElement('li');
      const name = document.createElement('span');
      name.className = 'name';
      name.textContent = k;
      name.title = k;
      const val = document.createElement('span');
      val.className = 'val';
      val.textContent = fmt(v);
      // The bar is decoration; the number beside it carries the value.
      li.style.setProperty('--share', `${Math.max(2, (v / max) * 100)}%`);
      li.append(name, val);
      ol.append(li);
    }
    if (!rows.length) {
      const li = document.createElement('li');
      li.className = 'muted';
      li.textContent = 'nothing yet';
      ol.append(li);
    }
    sec.append(h, ol);
    frag.append(sec);
  }
  root.replaceChildren(frag);
}
