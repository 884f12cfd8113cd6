// Canvas chart of the last N seconds: throughput (in/out) on top, new connections/s below.
// Hand-written so the dashboard needs no third-party code or build step.

import { humanBytes, humanCount } from './format.js';

const PAD = { left: 64, right: 12, top: 18, bottom: 20, gap: 26 };

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function niceBytesMax(v) {
  // Powers of 1024 keep axis labels round in KiB/MiB.
  if (v <= 0) return 1024;
  let unit = 1;
  while (v / unit >= 1024) unit *= 1024;
  return niceMax(v / unit) * unit;
}

export class Chart {
  constructor(canvas, readout) {
    this.canvas = canvas;
    this.readout = readout;
    this.ctx = canvas.getContext('2d');
    this.hoverX = null;
    this.last = null;
    canvas.addEventListener('mousemove', (e) => { this.hoverX = e.offsetX; this.redrawLast(); });
    canvas.addEventListener('mouseleave', () => { this.hoverX = null; this.redrawLast(); });
  }

  colors() {
    const cs = getComputedStyle(this.canvas);
    const v = (n) => cs.getPropertyValue(n).trim();
    return { grid: v('--grid'), text: v('--muted'), inC: v('--in'), outC: v('--out'), conn: v('--conn'),
      font: `11px ${v('--mono-font') || 'monospace'}` };
  }

  redrawLast() { if (this.last) this.draw(...this.last); }

  /** @param {import('./store.js').Rates} rates @param {number} nowSec newest complete second */
  draw(rates, nowSec) {
    this.last = [rates, nowSec];
    const dpr = window.devicePixelRatio || 1;
    const w = this.canvas.clientWidth, h = this.canvas.clientHeight;
    if (!w || !h) return;
    if (this.canvas.width !== Math.round(w * dpr) || this.canvas.height !== Math.round(h * dpr)) {
      this.canvas.width = Math.round(w * dpr);
      this.canvas.height = Math.round(h * dpr);
    }
    const ctx = this.ctx;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const c = this.colors();
    ctx.font = c.font;
    const n = rates.n;
    const first = nowSec - n + 1;
    const get = (name) => Array.from({ length: n }, (_, i) => rates.get(first + i, name));
    const bin = get('bytesIn'), bout = get('bytesOut'), conns = get('newConns');

    const plotW = w - PAD.left - PAD.right;
    const usable = h - PAD.top - PAD.bottom - PAD.gap;
    const topH = Math.round(usable * 0.62), botH = usable - topH;
    const top = { y: PAD.top, h: topH };
    const bot = { y: PAD.top + topH + PAD.gap, h: botH };
    const x = (i) => PAD.left + (i + 0.5) * (plotW / n);

    const bMax = niceBytesMax(Math.max(...bin, ...bout));
    const cMax = niceMax(Math.max(...conns));
    this.#axis(top, bMax, (v) => `${humanBytes(v)}/s`, c, w);
    this.#axis(bot, cMax, (v) => humanCount(v), c, w);

    ctx.fillStyle = c.text;
    ctx.textAlign = 'left';
    ctx.fillText('throughput (bytes/s) — solid: in, dashed: out', PAD.left, top.y - 6);
    ctx.fillText('new connections/s', PAD.left, bot.y - 6);

    // Bars for connection counts: discrete events per second read better as bars than a line.
    ctx.fillStyle = c.conn;
    const bw = Math.max(1, plotW / n - 1);
    conns.forEach((v, i) => {
      if (!v) return;
      const bh = (v / cMax) * bot.h;
      ctx.fillRect(x(i) - bw / 2, bot.y + bot.h - bh, bw, bh);
    });
    this.#line(bin, top, bMax, x, c.inC, []);
    this.#line(bout, top, bMax, x, c.outC, [5, 3]);

    // Time labels: the x axis is "seconds ago", which needs no clock agreement with the server.
    ctx.fillStyle = c.text;
    ctx.textAlign = 'center';
    for (const ago of [300, 240, 180, 120, 60, 0]) {
      if (ago >= n) continue;
      ctx.fillText(ago ? `-${ago / 60}m` : 'now', x(n - 1 - ago), h - 5);
    }
    this.#hover({ bin, bout, conns, n, plotW, top, bot, x, c });
  }

  #axis(area, max, fmt, c, w) {
    const ctx = this.ctx;
    ctx.strokeStyle = c.grid;
    ctx.lineWidth = 1;
    ctx.fillStyle = c.text;
    ctx.textAlign = 'right';
    for (const f of [0, 0.5, 1]) {
      const y = Math.round(area.y + area.h - f * area.h) + 0.5;
      ctx.beginPath();
      ctx.moveTo(PAD.left, y);
      ctx.lineTo(w - PAD.right, y);
      ctx.stroke();
      ctx.fillText(fmt(max * f), PAD.left - 6, y + 4);
    }
  }

  #line(values, area, max, x, color, dash) {
    const ctx = this.ctx;
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.5;
    ctx.setLineDash(dash);
    ctx.beginPath();
    values.forEach((v, i) => {
      const y = area.y + area.h - (v / max) * area.h;
      if (i === 0) ctx.moveTo(x(i), y); else ctx.lineTo(x(i), y);
    });
    ctx.stroke();
    ctx.setLineDash([]);
  }

  #hover({ bin, bout, conns, n, plotW, top, bot, x, c }) {
    if (this.hoverX == null || this.hoverX < PAD.left) {
      if (this.readout) this.readout.textContent = 'hover the chart for per-second values';
      return;
    }
    const i = Math.min(n - 1, Math.max(0, Math.floor((this.hoverX - PAD.left) / (plotW / n))));
    const ctx = this.ctx;
    ctx.strokeStyle = c.text;
    ctx.beginPath();
    ctx.moveTo(Math.round(x(i)) + 0.5, top.y);
    ctx.lineTo(Math.round(x(i)) + 0.5, bot.y + bot.h);
    ctx.stroke();
    if (this.readout) {
      this.readout.textContent = `${n - 1 - i} s ago: in ${humanBytes(bin[i])}/s, out ${humanBytes(bout[i])}/s, `
        + `${conns[i]} new connection${conns[i] === 1 ? '' : 's'}`;
    }
  }
}
