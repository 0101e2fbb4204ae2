// SAE feature browser. Data layout: see sae_lens_lite/browser/__init__.py (FIELDS).
// Token text only ever reaches the page through textContent / attributes, never as markup.
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("data").textContent);
  const V = D.vocab, F = D.features;
  const ID = 0, RANK = 1, SCORE = 2, COMP = 3, FREQ = 4, MEAN = 5, MAX = 6, BW = 7, HIST = 8,
    TOP = 9, PROM = 10, SUPP = 11, EX = 12, STEER = 13;
  const PAGE = 100; // rows rendered at a time
  const $ = (id) => document.getElementById(id);
  const list = $("list"), card = $("card"), more = $("more"), search = $("search"), sort = $("sort");

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  // Whitespace made visible, still as plain text.
  const show = (s) => s.replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192");
  const tok = (v) => show(V[v]);
  const fmt = (x, d) => (x === null || x === undefined ? "-" : Number(x).toFixed(d === undefined ? 3 : d));
  const pct = (x) => (x >= 0.01 ? (100 * x).toFixed(1) + "%" : x > 0 ? (100 * x).toExponential(1) + "%" : "0");

  const m = D.meta;
  $("meta").textContent = [m.model, m.hook, m.d_sae + " features", m.n_tokens + " tokens",
    m.n_shown < m.d_sae ? "best " + m.n_shown + " shown" : ""].filter(Boolean).join(" \u00b7 ");

  // ---- list: sort, search, incremental rendering ----------------------------------------------
  let searchText = null; // per feature, lower-case top input tokens and lens tokens, built on first search
  function buildSearch() {
    searchText = F.map((f) => {
      const ts = f[TOP].map((t) => V[t[0]]);
      for (const ex of f[EX]) ts.push(V[ex[2][ex[0]]]);
      for (const t of f[PROM]) ts.push(V[t[0]]);
      return "\n" + ts.join("\n").toLowerCase() + "\n";
    });
  }
  const keys = {
    score: (f) => -f[SCORE], frequency: (f) => -f[FREQ], max: (f) => -f[MAX], id: (f) => f[ID],
  };
  let order = [], shown = 0, openIdx = -1;

  function refresh() {
    const q = search.value.trim().toLowerCase();
    let idx = F.map((_, i) => i);
    const idq = /^#(\d+)$/.exec(q);
    if (idq) {
      idx = idx.filter((i) => F[i][ID] === Number(idq[1]));
    } else if (q) {
      if (!searchText) buildSearch();
      idx = idx.filter((i) => searchText[i].includes(q));
    }
    const key = keys[sort.value];
    idx.sort((a, b) => key(F[a]) - key(F[b]) || F[a][ID] - F[b][ID]);
    order = idx;
    shown = 0;
    list.replaceChildren();
    $("count").textContent = order.length + " of " + F.length + " features";
    renderMore();
  }

  function renderMore() {
    const frag = document.createDocumentFragment();
    for (const i of order.slice(shown, shown + PAGE)) {
      const f = F[i];
      const row = el("div", "row" + (i === openIdx ? " open" : ""));
      row.dataset.i = i;
      row.setAttribute("role", "listitem");
      row.append(el("span", "fid", "#" + f[ID]), el("span", "num", fmt(f[SCORE], 2)),
        el("span", "num", pct(f[FREQ])), el("span", "num", fmt(f[MAX], 2)));
      const toks = el("span", "toks");
      for (const t of f[TOP].slice(0, 3)) toks.append(el("span", "tok chip", tok(t[0])));
      row.append(toks);
      frag.append(row);
    }
    shown = Math.min(order.length, shown + PAGE);
    list.append(frag);
    more.hidden = shown >= order.length;
  }

  list.addEventListener("click", (e) => {
    const row = e.target.closest(".row");
    if (row) open(Number(row.dataset.i));
  });
  more.addEventListener("click", renderMore);
  // Load the next rows before the user reaches the end of the list.
  if ("IntersectionObserver" in window) {
    new IntersectionObserver((es) => { if (es.some((x) => x.isIntersecting) && shown < order.length) renderMore(); },
      { root: $("list-pane"), rootMargin: "400px" }).observe(more);
  }
  let timer = 0;
  search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(refresh, 150); });
  sort.addEventListener("change", refresh);

  // ---- the card of one feature ---------------------------------------------------------------
  function open(i) {
    openIdx = i;
    for (const r of list.querySelectorAll(".row.open")) r.classList.remove("open");
    const r = list.querySelector('.row[data-i="' + i + '"]');
    if (r) r.classList.add("open");
    const f = F[i];
    card.replaceChildren();
    card.dataset.feature = f[ID];
    card.append(el("h2", null, "Feature #" + f[ID] + " \u2014 rank " + f[RANK]));
    card.append(el("div", "stats", "score " + fmt(f[SCORE]) + " (token " + fmt(f[COMP][0]) + ", context " +
      fmt(f[COMP][1]) + ", logit lens " + fmt(f[COMP][2]) + ") \u00b7 fires on " + pct(f[FREQ]) +
      " of tokens \u00b7 mean " + fmt(f[MEAN]) + " \u00b7 max " + fmt(f[MAX])));

    card.append(el("h3", null, "Top input tokens (share of top-activation mass)"));
    const top = el("div");
    for (const t of f[TOP]) top.append(el("span", "tok chip", tok(t[0]) + "  " + t[1] + "%"));
    card.append(top);

    card.append(el("h3", null, "Activation histogram (tokens where it fires)"));
    card.append(histogram(f[HIST], f[BW]));

    card.append(el("h3", null, "Logit lens (decoder direction \u2192 final norm \u2192 unembedding)"));
    const lens = el("div", "lens");
    lens.append(lensTable("promotes", f[PROM], "pos"), lensTable("suppresses", f[SUPP], "neg"));
    card.append(lens);

    if (f[STEER] && m.steer) { // from analyze --steer: the prompt continued with the direction added
      card.append(el("h3", null, "Steered: + " + fmt(f[STEER].strength, 2) + " \u00d7 decoder direction (" +
        m.steer.times_max + " \u00d7 max activation), greedy"));
      card.append(el("div", "ctx", show(m.steer.prompt + f[STEER].text)),
        el("div", "ctx", "unsteered: " + show(m.steer.prompt + m.steer.clean)));
    }

    card.append(el("h3", null, "Top activations"));
    const peak = f[MAX] || 1;
    for (const ex of f[EX]) {
      const line = el("div", "ctx");
      line.append(el("span", "act", fmt(ex[1], 2)));
      ex[2].forEach((v, j) => {
        const s = el("span", "tok" + (j === ex[0] ? " center" : ""), tok(v));
        const q = ex[3][j];
        if (q > 0) s.style.background = "rgba(255, 120, 0, " + (0.08 + 0.82 * q / 99).toFixed(3) + ")";
        s.title = V[v] + "  \u2248 " + (q * peak / 99).toFixed(3);
        line.append(s);
      });
      card.append(line);
    }
    card.scrollTop = 0;
    history.replaceState(null, "", "#f" + f[ID]);
  }

  function lensTable(title, rows, cls) {
    const t = el("table");
    const cap = el("caption", null, title);
    t.append(cap);
    for (const [v, x] of rows) {
      const tr = el("tr");
      tr.append(el("td", "tok", tok(v)), el("td", cls, (x > 0 ? "+" : "") + fmt(x, 2)));
      t.append(tr);
    }
    return t;
  }

  function histogram(counts, width) {
    const NS = "http://www.w3.org/2000/svg", W = 420, H = 110, pad = 14;
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("class", "hist");
    svg.setAttribute("width", W);
    svg.setAttribute("height", H + pad);
    const top = Math.max(1, ...counts), bw = W / Math.max(1, counts.length);
    counts.forEach((c, j) => {
      if (!c) return;
      const r = document.createElementNS(NS, "rect");
      const h = Math.max(1, (H - 4) * Math.log1p(c) / Math.log1p(top)); // log scale: the tail stays visible
      r.setAttribute("x", j * bw); r.setAttribute("y", H - h);
      r.setAttribute("width", Math.max(1, bw - 1)); r.setAttribute("height", h);
      const tt = document.createElementNS(NS, "title");
      tt.textContent = fmt(j * width) + "\u2013" + fmt((j + 1) * width) + ": " + c;
      r.append(tt);
      svg.append(r);
    });
    for (const [x, label, anchor] of [[0, "0", "start"], [W, fmt(counts.length * width, 2), "end"]]) {
      const t = document.createElementNS(NS, "text");
      t.setAttribute("x", x); t.setAttribute("y", H + pad - 2); t.setAttribute("text-anchor", anchor);
      t.textContent = label;
      svg.append(t);
    }
    return svg;
  }

  refresh();
  const h = /^#f(\d+)$/.exec(location.hash);
  if (h) {
    const i = F.findIndex((f) => f[ID] === Number(h[1]));
    if (i >= 0) open(i);
  }
  document.body.dataset.ready = "1";
})();
