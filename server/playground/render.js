/* epispec playground: the one token renderer, shared by the live page (GET /) and the static
   page of `epispec generate --html`. It turns token events of the /generate shape
   ({text, token_id, logprob, bias, variance, eu, flagged}) into focusable coloured spans
   (background = eu on a colour-blind-safe sequential scale, flagged = outlined), a legend in
   nats, a response summary and a stacked bias/variance chart. No dependencies. */
"use strict";

const EpiView = (() => {
  // ColorBrewer YlGnBu, 9 classes: sequential and colour-blind safe; pale = low eu.
  const STOPS = ["#ffffd9", "#edf8b1", "#c7e9b4", "#7fcdbb", "#41b6c4",
                 "#1d91c0", "#225ea8", "#253494", "#081d58"];
  const RGB = STOPS.map((h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)));
  const SVG = "http://www.w3.org/2000/svg";  // a namespace name, never fetched
  const DIGITS = 3;  // printed precision of nats and log-probabilities
  const FIELDS = ["eu", "bias", "variance", "logprob"];

  function colour(t) {
    const x = Math.min(1, Math.max(0, t)) * (RGB.length - 1);
    const i = Math.min(RGB.length - 2, Math.floor(x));
    const f = x - i;
    return RGB[i].map((v, k) => Math.round(v + (RGB[i + 1][k] - v) * f));
  }

  function luminance(c) {  // WCAG relative luminance
    const [r, g, b] = c.map((v) => {
      const s = v / 255;
      return s <= 0.03928 ? s / 12.92 : ((s + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  }

  // Black or white text, whichever contrasts more with the background.
  const ink = (c) => ((luminance(c) + 0.05) / 0.05 >= 1.05 / (luminance(c) + 0.05) ? "#000" : "#fff");
  const rgb = (c) => `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
  const num = (x) => (x === null || x === undefined || x === "" ? null : Number(x));
  const fmt = (x) => (num(x) === null ? "n/a" : num(x).toFixed(DIGITS));

  // Smallest round number >= x (at least 1 nat): the automatic top of the colour scale.
  function niceMax(x) {
    if (!(x > 1)) return 1;
    const p = 10 ** Math.floor(Math.log10(x));
    return [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10].map((m) => m * p).find((v) => v >= x * (1 - 1e-12));
  }

  const rootTokens = (root) => root.querySelectorAll(".tok:not(.sample)");

  function el(tag, attrs = {}, text = null) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== null) e.textContent = text;
    return e;
  }

  function svg(tag, attrs = {}) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    return e;
  }

  // What a token's tooltip and aria-label say, read back from its data attributes.
  function describe(span) {
    const d = span.dataset;
    const parts = [`eu ${fmt(d.eu)} nats`, `bias ${fmt(d.bias)}`, `variance ${fmt(d.variance)}`,
                   `logprob ${fmt(d.logprob)}`];
    return `${JSON.stringify(span.textContent)}: ${parts.join(", ")}${d.flagged === "true" ? ", flagged" : ""}`;
  }

  class View {
    /* els: {legend, summary, chart, tooltip} (any may be missing); root: where token
       containers live (keyboard, hover and colour scale apply to every token under it). */
    constructor(root, els) {
      this.root = root;
      this.els = els;
      this.scaleMax = null;  // fixed top of the colour scale (nats); null = automatic
      this.threshold = null;  // eu flag threshold to mark on the legend and chart, if known
      this.tokens = [];  // the current response's token events
      this._maxEu = 0;
      this.container = null;
      this._chartQueued = false;
      root.addEventListener("mouseover", (e) => this._hover(e, true));
      root.addEventListener("mouseout", (e) => this._hover(e, false));
      root.addEventListener("focusin", (e) => this._hover(e, true));
      root.addEventListener("focusout", (e) => this._hover(e, false));
      root.addEventListener("keydown", (e) => this._key(e));
      this.legend();
    }

    /* Start a response in `container` (emptied). opts: {scaleMax, threshold}. */
    begin(container, opts = {}) {
      this.container = container;
      container.textContent = "";
      container.classList.add("tokens");
      container.setAttribute("role", "group");
      container.setAttribute("aria-label", "generated tokens; arrow keys move between tokens");
      this.tokens = [];
      this._maxEu = 0;  // over every token under root (earlier chat turns included)
      for (const s of rootTokens(this.root)) this._maxEu = Math.max(this._maxEu, num(s.dataset.eu) || 0);
      this.scaleMax = num(opts.scaleMax);
      this.threshold = num(opts.threshold);
      this.recolour();
      this.summary(null);
      this.chart();
    }

    currentMax() {
      if (this.scaleMax !== null && this.scaleMax > 0) return this.scaleMax;
      return niceMax(Math.max(this.threshold || 0, this._maxEu));
    }

    add(tok) {
      const span = el("span", { class: "tok", tabindex: this.tokens.length ? "-1" : "0" }, tok.text);
      const d = span.dataset;
      d.index = String(this.tokens.length);
      if (tok.token_id !== undefined && tok.token_id !== null) d.tokenId = String(tok.token_id);
      for (const f of FIELDS) d[f] = num(tok[f]) === null ? "" : String(tok[f]);
      d.flagged = tok.flagged ? "true" : "false";
      span.setAttribute("aria-label", describe(span));
      this.tokens.push(tok);
      this.container.appendChild(span);
      this._maxEu = Math.max(this._maxEu, num(tok.eu) || 0);
      const before = this._shownMax;
      if (this.currentMax() !== before) this.recolour(); else this.paint(span);
      this._queueChart();
      return span;
    }

    paint(span) {
      const eu = num(span.dataset.eu);
      span.classList.toggle("flagged", span.dataset.flagged === "true");
      span.classList.toggle("na", eu === null);
      if (eu === null) {
        span.style.backgroundColor = "";
        span.style.color = "";
        return;
      }
      const c = colour(eu / this._shownMax);
      span.style.backgroundColor = rgb(c);
      span.style.color = ink(c);
    }

    recolour() {
      this._shownMax = this.currentMax();
      for (const s of rootTokens(this.root)) this.paint(s);
      this.legend();
    }

    legend() {
      const box = this.els.legend;
      if (!box) return;
      const max = this._shownMax || this.currentMax();
      box.textContent = "";
      box.appendChild(el("div", { class: "legend-title" }, "eu per token (nats)"));
      const bar = el("div", { class: "legend-bar", role: "img",
        "aria-label": `colour scale from 0 (pale yellow) to ${max} nats or more (dark blue)` });
      bar.style.background = `linear-gradient(to right, ${STOPS.join(", ")})`;
      if (this.threshold !== null && this.threshold <= max) {
        const mark = el("span", { class: "legend-threshold", title: `flag threshold ${this.threshold} nats` });
        mark.style.left = `${(100 * this.threshold) / max}%`;
        bar.appendChild(mark);
      }
      box.appendChild(bar);
      const ticks = el("div", { class: "legend-ticks", "aria-hidden": "true" });
      for (let i = 0; i <= 4; i++) {
        ticks.appendChild(el("span", {}, `${+((max * i) / 4).toPrecision(3)}${i === 4 ? "+" : ""}`));
      }
      box.appendChild(ticks);
      const keys = el("div", { class: "legend-keys" });
      keys.appendChild(el("span", { class: "tok flagged sample" }, "flagged"));
      keys.appendChild(el("span", { class: "tok na sample" }, "no eu"));
      if (this.threshold !== null) keys.appendChild(el("span", {}, `threshold ${fmt(this.threshold)} nats`));
      box.appendChild(keys);
    }

    /* Show the response summary: `final` is the /generate final event ({summary,
       finish_reason, usage}), or null while streaming / after a stop (then counted here). */
    summary(final, note = "") {
      const box = this.els.summary;
      if (!box) return;
      const s = final && final.summary ? final.summary : this.localSummary();
      const rows = [
        ["num_tokens", "tokens", s.num_tokens],
        ["num_flagged", "flagged tokens", s.num_flagged],
        ["mean_eu", "mean eu (nats)", fmt(s.mean_eu)],
        ["max_eu", "max eu (nats)", fmt(s.max_eu)],
        ["flagged", "response flagged", s.flagged ? "yes" : "no"],
        ["finish_reason", "finish reason", final ? final.finish_reason || "" : note],
      ];
      if (final && final.usage) rows.push(["prompt_tokens", "prompt tokens", final.usage.prompt_tokens]);
      box.textContent = "";
      for (const [key, label, value] of rows) {
        box.appendChild(el("dt", {}, label));
        box.appendChild(el("dd", { "data-field": key }, String(value)));
      }
    }

    localSummary() {
      const eus = this.tokens.map((t) => num(t.eu)).filter((x) => x !== null);
      const flagged = this.tokens.filter((t) => t.flagged).length;
      return { num_tokens: this.tokens.length, num_flagged: flagged, flagged: flagged > 0,
               mean_eu: eus.length ? eus.reduce((a, b) => a + b, 0) / eus.length : null,
               max_eu: eus.length ? Math.max(...eus) : null };
    }

    _queueChart() {
      if (this._chartQueued) return;
      this._chartQueued = true;
      requestAnimationFrame(() => { this._chartQueued = false; this.chart(); });
    }

    /* eu per token as stacked bars: bias below, variance above; the threshold dashed. */
    chart() {
      const box = this.els.chart;
      if (!box) return;
      const W = 320, H = 140, L = 40, B = 18, T = 8, R = 6;
      const toks = this.tokens;
      let top = this.threshold || 0;
      for (const t of toks) top = Math.max(top, num(t.eu) || 0);
      top = niceMax(top);
      const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
        "aria-label": `eu per token, bias and variance stacked, ${toks.length} tokens, axis to ${top} nats` });
      const y = (v) => H - B - ((H - B - T) * Math.min(v, top)) / top;
      for (const v of [0, top / 2, top]) {
        s.appendChild(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
        const label = svg("text", { x: L - 4, y: y(v) + 3, class: "axis", "text-anchor": "end" });
        label.textContent = `${+v.toPrecision(3)}${v === top ? " nats" : ""}`;
        s.appendChild(label);
      }
      const xlabel = svg("text", { x: (L + W - R) / 2, y: H - 4, class: "axis", "text-anchor": "middle" });
      xlabel.textContent = toks.length ? `tokens 1–${toks.length}` : "no tokens yet";
      s.appendChild(xlabel);
      const step = (W - L - R) / Math.max(toks.length, 1);
      toks.forEach((t, i) => {
        const g = svg("g", { class: "bar", "data-index": String(i) });
        const x = L + i * step, w = Math.max(step * 0.8, 0.5);
        const bias = Math.max(num(t.bias) || 0, 0), variance = Math.max(num(t.variance) || 0, 0);
        g.appendChild(svg("rect", { x, width: w, y: y(bias), height: y(0) - y(bias), class: "bias" }));
        g.appendChild(svg("rect", { x, width: w, y: y(bias + variance),
                                    height: y(bias) - y(bias + variance), class: "variance" }));
        if (t.flagged) g.appendChild(svg("circle", { cx: x + w / 2, cy: T - 3, r: Math.min(2.5, step / 2 + 0.5), class: "flag-dot" }));
        const title = svg("title");
        title.textContent = `token ${i + 1} ${JSON.stringify(t.text)}: bias ${fmt(t.bias)}, variance ${fmt(t.variance)}, eu ${fmt(t.eu)} nats`;
        g.appendChild(title);
        s.appendChild(g);
      });
      if (this.threshold !== null) {
        s.appendChild(svg("line", { x1: L, x2: W - R, y1: y(this.threshold), y2: y(this.threshold), class: "threshold" }));
      }
      box.textContent = "";
      box.appendChild(s);
      const key = el("div", { class: "chart-key" });
      key.appendChild(el("span", { class: "swatch bias" }));
      key.appendChild(document.createTextNode("bias "));
      key.appendChild(el("span", { class: "swatch variance" }));
      key.appendChild(document.createTextNode("variance "));
      key.appendChild(el("span", { class: "swatch flag-dot" }));
      key.appendChild(document.createTextNode("flagged"));
      box.appendChild(key);
    }

    _hover(e, show) {
      const span = e.target.closest && e.target.closest(".tok");
      const tip = this.els.tooltip;
      if (!span || span.classList.contains("sample") || !tip) return;
      if (!show) {
        if (!span.contains(e.relatedTarget)) this.hideTip();
        return;
      }
      const d = span.dataset;
      tip.textContent = "";
      tip.appendChild(el("div", { class: "tip-token" }, JSON.stringify(span.textContent)));
      const table = el("dl");
      for (const f of FIELDS) {
        table.appendChild(el("dt", {}, f));
        table.appendChild(el("dd", { "data-field": f }, fmt(d[f]) + (f === "logprob" || d[f] === "" ? "" : " nats")));
      }
      tip.appendChild(table);
      if (d.flagged === "true") tip.appendChild(el("div", { class: "tip-flag" }, "flagged"));
      tip.hidden = false;
      span.setAttribute("aria-describedby", tip.id);
      const r = span.getBoundingClientRect();
      const below = r.bottom + 6 + tip.offsetHeight <= document.documentElement.clientHeight;
      const top = (below ? r.bottom + 6 : r.top - 6 - tip.offsetHeight) + window.scrollY;
      const left = Math.min(r.left + window.scrollX, window.scrollX + document.documentElement.clientWidth - tip.offsetWidth - 8);
      tip.style.top = `${top}px`;
      tip.style.left = `${Math.max(left, 4)}px`;
    }

    hideTip() {
      if (this.els.tooltip) this.els.tooltip.hidden = true;
    }

    /* Roving focus inside one token container: arrows, Home and End; Escape hides the tip. */
    _key(e) {
      const span = e.target.closest && e.target.closest(".tok");
      if (!span) return;
      if (e.key === "Escape") { this.hideTip(); return; }
      const all = [...span.parentElement.querySelectorAll(".tok")];
      const i = all.indexOf(span);
      const moves = { ArrowRight: i + 1, ArrowDown: i + 1, ArrowLeft: i - 1, ArrowUp: i - 1,
                      Home: 0, End: all.length - 1 };
      if (!(e.key in moves)) return;
      e.preventDefault();
      const next = all[Math.max(0, Math.min(all.length - 1, moves[e.key]))];
      span.tabIndex = -1;
      next.tabIndex = 0;
      next.focus();
    }
  }

  return { View, colour, niceMax, fmt, describe, STOPS };
})();
