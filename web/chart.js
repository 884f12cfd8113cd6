// Canvas chart of the last N seconds: throughput (in/out) on top, new connections/s below, with
// clock times on the x axis. Hand-written so the dashboard needs no third-party code or build step.

import { clockLabel, humanBytes, humanCount } from './format.js';

const PAD = { right: 12, top: 18, bottom: 20, gap: 26 };
// Tick spacing (seconds) by window length: about 5-8 labels across.
const TICKS = [[120, 15], [300, 60], [900, 120], [1800, 300], [3600, 600], [Infinity, 1800]];

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function niceBytesMax(v) {
  // Powers of 1024 keep axis labels round in KiB/MiB; a nice maximum of 1000+ units moves up one.
  if (v <= 0) return 1024;
  let unit = 1;
  while (v / unit >= 1024 || niceMax(v / unit) >= 1024) unit *= 1024;
  return niceMax(v / unit) * unit;
}

export class Chart {
  constructor(canvas, readout) {
    this.canvas = canvas;
    this.readout = readout;
    this.ctx = canvas.getContext('2d');
    this.hoverX = null;
    this.last = null;
    this.xLabels = [];   // what the x axis shows (for tests and screen readers)
    this.yLabels = [];
    this.range = null;   // {first, last} epoch seconds drawn
    this.values = null;  // the drawn series (for tests)
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

  /** @param {{get(sec:number, name:string):number}} source per-second values
   *  @param {number} endSec newest complete second (epoch, server clock) @param {number} n seconds shown */
  draw(source, endSec, n = 300) {
    this.last = [source, endSec, n];
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
    const first = endSec - n + 1;
    const get = (name) => Array.from({ length: n }, (_, i) => source.get(first + i, name));
    const bin = get('bytesIn'), bout = get('bytesOut'), conns = get('newConns');
    this.range = { first, last: endSec };
    this.values = { bytesIn: bin, bytesOut: bout, newConns: conns };

    const bMax = niceBytesMax(Math.max(...bin, ...bout));
    const cMax = niceMax(Math.max(...conns));
    const fmtB = (v) => `${humanBytes(v)}/s`;
    const yTop = [0, 0.5, 1].map((f) => fmtB(bMax * f));
    const yBot = [0, 0.5, 1].map((f) => humanCount(cMax * f));
    this.yLabels = [...yTop, ...yBot];
    // The left margin fits the widest y label, so none is clipped ("000 KiB/s").
    const left = Math.ceil(Math.max(...this.yLabels.map((s) => ctx.measureText(s).width))) + 12;
    this.left = left;
    const plotW = w - left - PAD.right;
    const usable = h - PAD.top - PAD.bottom - PAD.gap;
    const topH = Math.round(usable * 0.62), botH = usable - topH;
    const top = { y: PAD.top, h: topH };
    const bot = { y: PAD.top + topH + PAD.gap, h: botH };
    const x = (i) => left + (i + 0.5) * (plotW / n);

    this.#axis(top, yTop, c, left, w);
    this.#axis(bot, yBot, c, left, w);

    ctx.fillStyle = c.text;
    ctx.textAlign = 'left';
    const title = ['throughput (bytes/s) — solid: in, dashed: out', 'bytes/s — solid: in, dashed: out', 'bytes/s']
      .find((t) => ctx.measureText(t).width <= plotW) ?? 'bytes/s';
    ctx.fillText(title, left, top.y - 6);
    ctx.fillText('new connections/s', left, bot.y - 6);

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
    this.#timeAxis({ first, n, x, c, h, top, bot, plotW });
    this.#hover({ bin, bout, conns, n, first, plotW, top, bot, x, c, left });
  }

  #timeAxis({ first, n, x, c, h, top, bot, plotW }) {
    // Clock times (local) at round multiples of the tick step, so labels do not move as time passes.
    const ctx = this.ctx;
    let step = TICKS.find(([span]) => n <= span)[1];
    const labelW = ctx.measureText('00:00:00').width + 16;
    while ((n / step) * labelW > plotW && step < n) step *= 2; // narrow screens: fewer labels
    const withSeconds = step % 60 !== 0;
    this.xLabels = [];
    ctx.textAlign = 'center';
    for (let s = Math.ceil(first / step) * step; s < first + n; s += step) {
      const px = Math.round(x(s - first)) + 0.5;
      ctx.strokeStyle = c.grid;
      ctx.beginPath();
      ctx.moveTo(px, top.y);
      ctx.lineTo(px, bot.y + bot.h);
      ctx.stroke();
      const label = clockLabel(s, withSeconds);
      ctx.fillStyle = c.text;
      ctx.fillText(label, px, h - 5);
      this.xLabels.push(label);
    }
  }

  #axis(area, labels, c, left, w) {
    const ctx = this.ctx;
    ctx.strokeStyle = c.grid;
    ctx.lineWidth = 1;
    ctx.fillStyle = c.text;
    ctx.textAlign = 'right';
    labels.forEach((text, k) => {
      const y = Math.round(area.y + area.h - (k / 2) * area.h) + 0.5;
      ctx.beginPath();
      ctx.moveTo(left, y);
      ctx.lineTo(w - PAD.right, y);
      ctx.stroke();
      ctx.fillText(text, left - 6, y + 4);
    });
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

  #hover({ bin, bout, conns, n, first, plotW, top, bot, x, c, left }) {
    if (this.hoverX == null || this.hoverX < left) {
      if (this.readout) this.readout.textContent = 'hover the chart for per-second values';
      return;
    }
    const i = Math.min(n - 1, Math.max(0, Math.floor((this.hoverX - left) / (plotW / n))));
    const ctx = this.ctx;
    ctx.strokeStyle = c.text;
    ctx.beginPath();
    ctx.moveTo(Math.round(x(i)) + 0.5, top.y);
    ctx.lineTo(Math.round(x(i)) + 0.5, bot.y + bot.h);
    ctx.stroke();
    if (this.readout) {
      this.readout.textContent = `${clockLabel(first + i, true)}: in ${humanBytes(bin[i])}/s, `
        + `out ${humanBytes(bout[i])}/s, ${conns[i]} new connection${conns[i] === 1 ? '' : 's'}`;
    }
  }
}
