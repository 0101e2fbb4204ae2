// SAE feature browser. Data layout: see sae_lens_lite/browser/__init__.py (FIELDS).
// Token text only ever reaches the page through textContent / attributes, never as markup.
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("data").textContent);
  const V = D.vocab, F = D.features;
  const ID = 0, RANK = 1, SCORE = 2, COMP = 3, FREQ = 4, MEAN = 5, MAX = 6, BW = 7, HIST = 8,
    TOP = 9, PROM = 10, SUPP = 11, EX = 12, EXPL = 13, DET = 14, FAM = 15, QUANT = 16, NEAR = 17, MODEL = 18, STEER = 19,
    SWEEP = 20;
  const PAGE = 100; // rows rendered at a time
  const $ = (id) => document.getElementById(id);
  const list = $("list"), card = $("card"), more = $("more"), search = $("search"), group = $("group");
  const byId = new Map(F.map((f, i) => [f[ID], i]));

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
  // Frequencies for people: 0.20 %, 3.1 %, 0.0042 %.
  function pct(x) {
    if (x === null || x === undefined) return "-";
    const p = 100 * x;
    if (p === 0) return "0 %";
    return (p >= 1 ? p.toFixed(1) : p >= 0.01 ? p.toFixed(2) : p.toPrecision(2)) + " %";
  }

  const m = D.meta;
  $("meta").textContent = [m.model, m.hook, m.d_sae + " features", m.n_tokens + " tokens",
    m.heldout ? "scores on " + m.heldout.tokens + " held-out tokens (" + Math.round(100 * m.heldout.share) + " % of contexts)" : "",
    m.n_shown < m.d_sae ? "best " + m.n_shown + " shown" : ""].filter(Boolean).join(" \u00b7 ");

  // ---- list: families or features, labelled sortable columns, search, incremental rendering ------
  const num = (x) => (x === null || x === undefined ? null : x);
  const COLS = [
    { key: "id", label: "feature", cls: "fid", tip: "feature id", val: (f) => f[ID], text: (f) => "#" + f[ID], up: true },
    { key: "explanation", label: "explanation", cls: "expl", tip: "built-in explanation: the pattern read from the explain split",
      val: (f) => f[EXPL], text: (f) => f[EXPL] || "(never fires)", up: true },
    { key: "score", label: "score", tip: "held-out detection score 2TP / (2TP + FP + FN + 2): what the ranking uses", val: (f) => f[SCORE], text: (f) => fmt(f[SCORE], 2) },
    { key: "f1", label: "F1", tip: "held-out detection F1 of the explanation", val: (f) => num(f[DET][2]), text: (f) => fmt(f[DET][2], 2) },
    { key: "precision", label: "precision", tip: "share of held-out tokens matching the explanation where the feature fires", val: (f) => num(f[DET][0]), text: (f) => fmt(f[DET][0], 2) },
    { key: "recall", label: "recall", tip: "share of the feature's held-out firings that match the explanation", val: (f) => num(f[DET][1]), text: (f) => fmt(f[DET][1], 2) },
    { key: "frequency", label: "frequency", tip: "share of all tokens where the feature fires", val: (f) => f[FREQ], text: (f) => pct(f[FREQ]) },
    { key: "max", label: "max act", tip: "largest activation", val: (f) => f[MAX], text: (f) => fmt(f[MAX], 2) },
    { key: "members", label: "family", tip: "features with the same explanation (click a row to open its family)", val: (f, n) => n, text: (f, n) => (n > 1 ? "\u25b8 " + n : "") },
  ];
  let sortKey = "score", sortUp = false;
  const head = $("head");
  for (const c of COLS) {
    const h = el("span", "col " + (c.cls || "num"), c.label);
    h.dataset.key = c.key;
    h.title = c.tip + " \u2014 click to sort";
    h.setAttribute("role", "columnheader");
    head.append(h);
  }
  head.addEventListener("click", (e) => {
    const h = e.target.closest(".col");
    if (!h) return;
    const c = COLS.find((x) => x.key === h.dataset.key);
    if (sortKey === c.key) sortUp = !sortUp;
    else { sortKey = c.key; sortUp = !!c.up; }
    refresh();
  });

  let searchText = null; // per feature: explanation, top input, example and lens tokens, lower case
  function buildSearch() {
    searchText = F.map((f) => {
      const ts = [f[EXPL], f[MODEL] ? f[MODEL][0] : ""].concat(f[TOP].map((t) => V[t[0]]));
      for (const ex of f[EX]) ts.push(V[ex[2][ex[0]]]);
      for (const t of f[PROM]) ts.push(V[t[0]]);
      return "\n" + ts.join("\n").toLowerCase() + "\n";
    });
  }
  // A unit of the list: a family (members best first) or, ungrouped, one feature.
  const FAMS = D.families.map((fam) => fam[1].map((id) => byId.get(id)).filter((i) => i !== undefined));
  let order = [], shown = 0, openIdx = -1;
  const expanded = new Set();

  function refresh() {
    const q = search.value.trim().toLowerCase();
    let units = group.checked ? FAMS.map((x) => x.slice()) : F.map((_, i) => [i]);
    const idq = /^#(\d+)$/.exec(q);
    let keep = null;
    if (idq) keep = (i) => F[i][ID] === Number(idq[1]);
    else if (q) {
      if (!searchText) buildSearch();
      keep = (i) => searchText[i].includes(q);
    }
    if (keep) units = units.map((u) => u.filter(keep)).filter((u) => u.length);
    const c = COLS.find((x) => x.key === sortKey);
    const sign = sortUp ? 1 : -1;
    const cmp = (a, b) => {
      const x = c.val(F[a[0]], a.length), y = c.val(F[b[0]], b.length);
      if (x === y) return F[a[0]][RANK] - F[b[0]][RANK];
      if (x === null) return 1; // unknown values last, whichever the direction
      if (y === null) return -1;
      return sign * (typeof x === "string" ? x.localeCompare(y) : x - y);
    };
    units.sort(cmp);
    order = units;
    shown = 0;
    list.replaceChildren();
    for (const h of head.children) h.classList.toggle("sorted", h.dataset.key === sortKey);
    const nf = units.reduce((n, u) => n + u.length, 0);
    $("count").textContent = (group.checked ? units.length + " families, " : "") + nf + " of " + F.length + " features";
    renderMore();
  }

  function featureRow(i, n, cls) {
    const f = F[i];
    const row = el("div", "row" + (cls ? " " + cls : "") + (i === openIdx ? " open" : ""));
    row.dataset.i = i;
    row.setAttribute("role", "listitem");
    for (const c of COLS) {
      const cell = el("span", c.cls || "num", c.text(f, n));
      if (c.key === "explanation") cell.title = f[EXPL];
      row.append(cell);
    }
    return row;
  }

  function renderMore() {
    const frag = document.createDocumentFragment();
    for (const u of order.slice(shown, shown + PAGE)) {
      const row = featureRow(u[0], u.length, u.length > 1 ? "family" : "");
      row.dataset.family = F[u[0]][FAM];
      frag.append(row);
      if (u.length > 1 && expanded.has(F[u[0]][FAM])) for (const i of u.slice(1)) frag.append(featureRow(i, 1, "member"));
    }
    shown = Math.min(order.length, shown + PAGE);
    list.append(frag);
    more.hidden = shown >= order.length;
  }

  list.addEventListener("click", (e) => {
    const row = e.target.closest(".row");
    if (!row) return;
    const i = Number(row.dataset.i);
    if (row.classList.contains("family")) {
      // A family row opens (or closes) its members and shows its best member's card.
      const fam = Number(row.dataset.family);
      const u = order.find((x) => x[0] === i);
      if (expanded.has(fam)) {
        expanded.delete(fam);
        let next = row.nextElementSibling;
        while (next && next.classList.contains("member")) { const n = next.nextElementSibling; next.remove(); next = n; }
      } else {
        expanded.add(fam);
        let after = row;
        for (const j of u.slice(1)) { const r = featureRow(j, 1, "member"); after.after(r); after = r; }
      }
    }
    open(i);
  });
  more.addEventListener("click", renderMore);
  // Load the next rows before the user reaches the end of the list.
  if ("IntersectionObserver" in window) {
    new IntersectionObserver((es) => { if (es.some((x) => x.isIntersecting) && shown < order.length) renderMore(); },
      { root: $("list-pane"), rootMargin: "400px" }).observe(more);
  }
  let timer = 0;
  search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(refresh, 150); });
  group.addEventListener("change", refresh);

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
    const ex = el("div", "explanation");
    ex.append(el("span", "label", "Explanation (built in): "), el("span", "text", f[EXPL] || "never fires in the explain split"));
    card.append(ex);
    const d = f[DET];
    card.append(el("div", "scores", "held-out detection: precision " + fmt(d[0], 2) + ", recall " + fmt(d[1], 2) +
      ", F1 " + fmt(d[2], 2) + " (fires on " + d[3] + " held-out tokens, the explanation matches " + d[4] +
      ") \u00b7 score " + fmt(f[SCORE], 2)));
    if (f[MODEL]) {
      const me = el("div", "explanation model");
      me.append(el("span", "label", "Explanation (model): "), el("span", "text", f[MODEL][0]));
      card.append(me);
      card.append(el("div", "scores", "yes/no on " + f[MODEL][3] + " held-out contexts: balanced accuracy " +
        fmt(f[MODEL][1], 2) + ", AUROC " + fmt(f[MODEL][2], 2)));
    }
    card.append(el("div", "stats", "fires on " + pct(f[FREQ]) + " of tokens \u00b7 mean " + fmt(f[MEAN]) +
      " \u00b7 max " + fmt(f[MAX]) + " \u00b7 monosemanticity of the top examples " + fmt(f[COMP][3], 2) +
      " (token " + fmt(f[COMP][0], 2) + ", context " + fmt(f[COMP][1], 2) + ", logit lens " + fmt(f[COMP][2], 2) + ")"));

    const fam = FAMS.find((u) => u.includes(i));
    if (fam && fam.length > 1) {
      card.append(el("h3", null, "Family: " + fam.length + " features with this explanation"));
      const fl = el("div", "family-list");
      for (const j of fam) fl.append(link(j, null));
      card.append(fl);
    }
    if (f[NEAR].length) {
      card.append(el("h3", null, "Nearest features (cosine of decoder directions)"));
      const t = el("table", "nearest");
      for (const [id, cos, text] of f[NEAR]) {
        const tr = el("tr");
        const a = el("td");
        const j = byId.get(id);
        a.append(j === undefined ? el("span", null, "#" + id) : link(j, null));
        tr.append(a, el("td", "num", fmt(cos, 2)), el("td", "expl", text || "-"));
        t.append(tr);
      }
      card.append(t);
    }

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

    if (f[SWEEP] && m.sweep) { // from sae-lite sweep: concept and fluency against strength
      const s = f[SWEEP];
      card.append(el("h3", null, "Steering sweep: best strength " + fmt(s.best_strength, 2) + " (" +
        s.best_times + " \u00d7 max activation), the activation's peak before fluency drops by more than " +
        m.sweep.max_drop + " nats/token"));
      const t = el("table", "sweep");
      const head = el("tr");
      for (const h of ["\u00d7 max act", "activation", "log p lens", "fluency cost"]) head.append(el("th", null, h));
      t.append(head);
      s.times.forEach((x, i) => {
        const tr = el("tr", x === s.best_times ? "best" : null);
        for (const v of [x, s.activation[i], s.lens_logp[i], s.fluency_cost[i]]) tr.append(el("td", "num", fmt(v, 2)));
        t.append(tr);
      });
      card.append(t, el("div", "ctx", "at the best strength: " + show(m.sweep.prompts[0] + s.text)));
    }

    card.append(el("h3", null, "Top activations"));
    const peak = f[MAX] || 1;
    for (const x of f[EX]) card.append(context(x, peak));
    const names = ["highest", "second", "third", "lowest"];
    f[QUANT].forEach((q, k) => {
      if (!q.length) return;
      const label = f[QUANT].length === 4 ? names[k] + " quarter" : "quantile " + (k + 1);
      const h = el("h3", "quantile", "Examples from the " + label + " of its activations");
      card.append(h);
      for (const x of q) card.append(context(x, peak));
    });
    card.scrollTop = 0;
    history.replaceState(null, "", "#f" + f[ID]);
  }

  function context(ex, peak) {
    const line = el("div", "ctx");
    line.append(el("span", "act", fmt(ex[1], 2)));
    ex[2].forEach((v, j) => {
      const s = el("span", "tok" + (j === ex[0] ? " center" : ""), tok(v));
      const q = ex[3][j];
      if (q > 0) s.style.background = "rgba(255, 120, 0, " + (0.08 + 0.82 * q / 99).toFixed(3) + ")";
      s.title = V[v] + "  \u2248 " + (q * peak / 99).toFixed(3);
      line.append(s);
    });
    return line;
  }

  function link(j, text) {
    const a = el("a", "flink", text || "#" + F[j][ID]);
    a.href = "#f" + F[j][ID];
    a.dataset.i = j;
    a.addEventListener("click", (e) => { e.preventDefault(); open(j); });
    return a;
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
