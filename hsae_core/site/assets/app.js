/* HSAE feature-forest browser: overview of trees, one tree at a time (the paper's Figure 1),
   search by feature id or token. Data arrive as scripts (data/*.js) calling HSAE.put. */
"use strict";
(function () {
  const H = window.HSAE;
  const main = document.getElementById("main");
  const results = document.getElementById("results");
  const search = document.getElementById("search");
  const PAGE = 200;          // overview rows rendered per step
  const KIDS = 40;           // children rendered per parent before "show more"
  const OPEN_CTX = 24;       // nodes whose contexts are open when a tree opens
  const embedded = new URLSearchParams(location.search).has("embed");

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const k of kids) if (k != null) e.append(k);
    return e;
  }

  function load(key, src) {
    if (key in H.store) return Promise.resolve(H.store[key]);
    return new Promise((ok, fail) => {
      (H.waiting[key] = H.waiting[key] || []).push({ ok });
      if (document.querySelector(`script[data-key="${key}"]`)) return;
      const s = el("script", { src, "data-key": key });
      s.onerror = () => fail(new Error(`could not load ${src} (is the site complete?)`));
      document.head.append(s);
    });
  }

  const ov = H.store.overview;
  if (!ov) { return; }
  const models = Object.fromEntries(ov.models.map(m => [m.name, m]));
  const fmtPct = f => (f == null ? "–" : (100 * f).toFixed(f < 0.001 ? 3 : 2) + "%");
  const fmtP = p => (p == null ? "–" : p.toFixed(2));
  const fid = (l, i) => `L${l}#${i}`;
  // semantic scores (issue 14): m.semantic = {labels, min_docs, documents, scored} or null
  const hasLabels = m => !!(m.semantic && m.semantic.labels.length);

  // ----- routing: #/model | #/model/tKEY[/l_i] | #/model/sKEY/l_i | #/compare -----
  function route() {
    const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean);
    const model = models[parts[0]] ? parts[0] : ov.models[0].name;
    if (parts[0] === "compare") return { view: "compare", model };
    if (parts[1] && /^[ts]\d+_\d+$/.test(parts[1])) return { view: "tree", model, key: parts[1], focus: parts[2] };
    return { view: "overview", model };
  }
  function go(hash) { if (location.hash !== hash) location.hash = hash; else render(); }

  function renderModels(r) {
    const nav = document.getElementById("models");
    nav.replaceChildren(...ov.models.map(m => el("button", {
      class: r.view !== "compare" && m.name === r.model ? "on" : "", text: m.label,
      onclick: () => go(`#/${m.name}`)
    })));
    if (ov.models.length > 1 && !embedded)
      nav.append(el("button", { class: r.view === "compare" ? "on" : "", text: "side by side", onclick: () => go("#/compare") }));
  }

  // ----- overview -----
  const COLS = [
    ["root", "tree root", r => r.l * 1e7 + r.i], ["top", "top tokens", r => r.top, "lab"],
    ["size", "nodes", r => r.size], ["live", "firing nodes", r => r.live], ["kids", "root's children", r => r.kids], ["depth", "levels", r => r.depth],
    ["branch", "mean branching", r => r.branch], ["f", "root freq.", r => r.f], ["yes", "judge yes / judged", r => (r.judged ? r.yes / r.judged : -1)],
    ["coh", "topic coherence", r => r.coh, "", m => hasLabels(m)], ["co", "doc co-occurrence", r => r.co, "", m => !!m.semantic]
  ];
  // the sort control above the table: [column, label]; columns whose value is null (no scored link) sort last
  const SORTS = [["live", "firing nodes"], ["size", "nodes"], ["coh", "topic coherence"], ["co", "document co-occurrence"],
                 ["depth", "levels"], ["yes", "judge yes rate"]];
  const colsOf = m => COLS.filter(c => !c[4] || c[4](m));
  const sortState = {};

  function rowsOf(m) {
    const t = m.trees, out = [];
    for (let k = 0; k < t.l.length; k++)
      out.push({ l: t.l[k], i: t.i[k], size: t.size[k], live: t.live[k], kids: t.kids[k], depth: t.depth[k], branch: t.branch[k],
                 f: t.f[k], top: t.top[k], judged: t.judged[k], yes: t.yes[k],
                 coh: t.coh ? t.coh[k] : null, co: t.co ? t.co[k] : null, scored: t.scored ? t.scored[k] : 0 });
    return out;
  }

  function renderOverview(r) {
    const m = models[r.model];
    const st = sortState[m.name] || (sortState[m.name] = { col: "live", asc: false, shown: PAGE });
    const rows = rowsOf(m);
    const cols = colsOf(m);
    if (!cols.some(c => c[0] === st.col)) st.col = "live";
    const key = cols.find(c => c[0] === st.col)[2];
    rows.sort((a, b) => {
      const x = key(a), y = key(b);
      if (x == null || y == null) return (x == null) - (y == null);  // unscored trees last, either direction
      const c = x < y ? -1 : x > y ? 1 : 0; return st.asc ? c : -c;
    });
    const sizes = m.level_sizes.reduce((a, b) => a + b, 0);
    const info = el("div", {},
      el("h2", { text: `${m.label}: ${rows.length} trees over ${sizes.toLocaleString()} features` }),
      el("p", { class: "note", text: `Levels ${m.level_sizes.join(" / ")}; ${m.n_lone.toLocaleString()} features belong to no tree ` +
        `(search finds them). Firing frequencies and P(parent|child) over ${m.tokens.toLocaleString()} eval tokens.` }));
    if (m.about) info.append(el("p", { class: "note about", text: m.about }));
    if (!m.judge) info.append(el("p", { class: "warn", text: `No judge output for this model: link verdicts are not shown (${m.judge_how || "run the judge stage"}).` }));
    else info.append(el("p", { class: "note", text: `${m.judged_links} judge answers (yes or no) about this forest's links; the last column counts them per tree.` }));
    for (const n of m.notes || []) info.append(el("p", { class: "warn", text: n }));
    info.append(semanticNote(m));
    const sortBy = el("select", { id: "sortby", onchange: e => { st.col = e.target.value; st.asc = false; st.shown = PAGE; render(); } },
      ...SORTS.map(([c, label]) => {
        const ok = cols.some(x => x[0] === c);
        const o = el("option", { value: c, text: ok ? label : `${label} (unavailable)` });
        if (!ok) o.disabled = true;
        if (c === st.col) o.selected = true;
        return o;
      }));
    info.append(el("p", { class: "sortbar" }, el("label", { for: "sortby", text: "sort trees by " }), sortBy,
      el("span", { class: "note", text: " (highest first; trees with no scored link last; or click a column)" })));
    const head = el("tr", {}, ...cols.map(([c, label, , cls]) => el("th", {
      class: `${cls || ""} ${st.col === c ? "sorted" + (st.asc ? " asc" : "") : ""}`, text: label, "data-col": c,
      onclick: () => { if (st.col === c) st.asc = !st.asc; else { st.col = c; st.asc = c === "root" || c === "top"; } st.shown = PAGE; render(); }
    })));
    const body = el("tbody");
    const maxSize = rows.reduce((a, x) => Math.max(a, x.size), 1);
    for (const x of rows.slice(0, st.shown)) {
      body.append(el("tr", { "data-root": `t${x.l}_${x.i}`, onclick: () => go(`#/${m.name}/t${x.l}_${x.i}`) },
        el("td", {}, el("span", { class: "fid", text: fid(x.l, x.i) })),
        el("td", { class: "lab top", text: x.top || "" }),
        el("td", {}, el("span", { class: "bar", style: `width:${Math.max(1, Math.round(60 * x.size / maxSize))}px` }), ` ${x.size}`),
        el("td", { text: x.live }), el("td", { text: x.kids }), el("td", { text: x.depth }), el("td", { text: x.branch }),
        el("td", { text: fmtPct(x.f) }), el("td", { text: x.judged ? `${x.yes} / ${x.judged}` : "–" }),
        ...cols.filter(c => c[0] === "coh" || c[0] === "co").map(c =>
          el("td", { class: c[0], title: `mean over ${x.scored} scored links`, text: fmtP(x[c[0]]) }))));
    }
    const table = el("table", { class: "trees" }, el("thead", {}, head), body);
    const more = rows.length > st.shown ? el("button", { class: "more pill", text: `show ${Math.min(PAGE, rows.length - st.shown)} more of ${rows.length - st.shown}`,
      onclick: () => { st.shown += PAGE; render(); } }) : null;
    main.replaceChildren(info, table, more || "");
    performance.mark("hsae-overview");
  }

  function semanticNote(m) {
    const s = m.semantic;
    if (!s) return el("p", { class: "warn semantic", text: "No semantic scores for this model (top labels, topic coherence, document co-occurrence)." });
    const scope = `links scored where both ends fire in at least ${s.min_docs} of the ${s.documents.toLocaleString()} eval documents ` +
      `(${s.scored.toLocaleString()} links); a tree's score is the mean over its scored links.`;
    if (!hasLabels(m)) return el("p", { class: "warn semantic", text: `Topic coherence and top labels: unavailable, the corpus has no document ` +
      `label column (name one in extract.label_column and re-extract). Document co-occurrence (P(parent fires in a document | child fires in it)) needs none: ${scope}` });
    return el("p", { class: "note semantic", text: `Semantic scores: each feature's top document labels (${s.labels.length} labels; share of the ` +
      `documents it fires in, and lift over the eval split), each link's topic coherence (correlation of parent's and child's label lift) ` +
      `and document co-occurrence; ${scope}` });
  }

  function labelsView(node, m) {
    if (!hasLabels(m) || node.d == null) return null;
    const s = m.semantic;
    if (!node.lab) return el("div", { class: "labels none", text: `labels: fires in ${node.d} eval documents (fewer than ${s.min_docs}: no top labels)` });
    return el("div", { class: "labels" }, "labels: ", ...node.lab.flatMap(([t, share, lift], k) => [k ? " · " : "",
      el("span", { class: "lab", title: `${(100 * share).toFixed(1)}% of the labelled documents it fires in; lift ${lift.toFixed(2)} over the eval split`,
                   text: `${s.labels[t]} ${Math.round(100 * share)}% (×${lift.toFixed(1)})` })]));
  }

  function scoreView(node, m) {
    const s = m.semantic;
    if (!s) return null;
    if (!node.sc) return el("span", { class: "score none", text: `semantic scores: not scored (an end fires in fewer than ${s.min_docs} eval documents)` });
    const [coh, co] = node.sc;
    const cohText = !hasLabels(m) ? "topic coherence unavailable (no labels)" : `topic coherence ${coh == null ? "– (flat lift)" : coh.toFixed(2)}`;
    return el("span", { class: "score", "data-coh": coh == null ? "" : String(coh), text: `${cohText} · doc co-occurrence ${fmtP(co)}` });
  }

  // ----- one tree -----
  function ctxView(node) {
    const box = el("div", { class: "ctxs" });
    if (!node.ctx.length) { box.append(el("div", { class: "note", text: "no activating contexts collected for this feature" })); return box; }
    for (const [toks, q] of node.ctx) {
      const line = el("div", { class: "ctx" });
      toks.forEach((t, k) => {
        const a = q[k] / 100;
        const span = el("span", { class: a > 0 ? "tok act" : "tok", text: t.replace(/\n/g, "\u23ce ") });
        if (a > 0) { span.style.background = `rgba(255,140,0,${(0.15 + 0.85 * a).toFixed(3)})`; span.title = `activation ${(a * node.amax).toFixed(3)}`; }
        line.append(span);
      });
      box.append(line);
    }
    return box;
  }

  function nodeCard(node, open, linkInfo, m) {
    const ctxHolder = el("div");
    const toggle = el("button", { class: "more pill", text: open ? "hide contexts" : `contexts (${node.ctx.length})` });
    let shown = false;
    const setOpen = v => { shown = v; ctxHolder.replaceChildren(v ? ctxView(node) : ""); toggle.textContent = v ? "hide contexts" : `contexts (${node.ctx.length})`; };
    toggle.addEventListener("click", e => { e.stopPropagation(); setOpen(!shown); });
    const head = el("div", { class: "nodehead" },
      el("span", { class: "fid", text: fid(node.l, node.i) }),
      el("span", { class: "top", text: node.top || "" }),
      el("span", { class: "link", text: `freq ${fmtPct(node.f)}` + (node.d != null ? ` · ${node.d} docs` : "") + ` · ${node.n} children` }),
      linkInfo, toggle);
    const card = el("div", { class: "node", id: `n${node.l}_${node.i}` }, head, labelsView(node, m), ctxHolder);
    setOpen(open);
    return card;
  }

  function linkInfo(node, m) {
    if (node.p < 0) return null;
    const span = el("span", { class: "link", text: `P(parent|child) ${fmtP(node.pc)} · P(child|parent) ${fmtP(node.cp)}` });
    const out = el("span", {}, span);
    const score = scoreView(node, m);
    if (score) out.append(" · ", score);
    if (!node.j) out.append(" ", el("span", { class: "judge none", text: m.judge ? "not judged" : "no judge run" }));
    else for (const [v, conf, order] of node.j)
      out.append(" ", el("span", { class: `judge ${v}`, title: order ? `asked ${order.replace("_", " ")}` : "",
                                   text: `judge: ${v}${conf ? " (" + conf + ")" : ""}` }));
    return out;
  }

  function renderTree(r, data) {
    const m = models[r.model];
    const nodes = data.nodes;
    const kids = nodes.map(() => []);
    nodes.forEach((n, k) => { if (n.p >= 0) kids[n.p].push(k); });
    let opened = 0;
    const focusId = r.focus ? `n${r.focus}` : null;
    function sub(k, depth) {
      const n = nodes[k];
      const open = (depth <= 1 && opened < OPEN_CTX) || focusId === `n${n.l}_${n.i}`;
      if (open) opened++;
      const li = el("li", {}, nodeCard(n, open, linkInfo(n, m), m));
      if (kids[k].length) {
        const ul = el("ul");
        const add = (from, count) => {
          for (const c of kids[k].slice(from, from + count)) ul.append(sub(c, depth + 1));
          const rest = kids[k].length - from - count;
          if (rest > 0) ul.append(el("li", {}, el("button", { class: "more pill", text: `show ${Math.min(KIDS, rest)} more of ${rest} children`,
            onclick: e => { e.target.parentNode.remove(); add(from + count, KIDS); } })));
        };
        // a focused node deep in a long child list is rendered too
        const at = focusId ? kids[k].findIndex(c => contains(c, focusId)) : -1;
        add(0, Math.max(KIDS, at + 1));
        li.append(ul);
      }
      return li;
    }
    function contains(k, id) { if (`n${nodes[k].l}_${nodes[k].i}` === id) return true; return kids[k].some(c => contains(c, id)); }
    const root = nodes[0];
    const levels = new Set(nodes.map(n => n.l));
    const answers = nodes.flatMap(n => n.j || []).filter(v => v[0] === "yes" || v[0] === "no");
    const judged = answers, yes = answers.filter(v => v[0] === "yes");
    const scored = nodes.filter(n => n.sc);
    const mean = k => { const v = scored.map(n => n.sc[k]).filter(x => x != null); return v.length ? (v.reduce((a, b) => a + b, 0) / v.length).toFixed(2) : "–"; };
    const semLine = !m.semantic ? null : el("p", { class: "note semantic", text: scored.length
      ? (hasLabels(m) ? `Mean topic coherence ${mean(0)}` : "Topic coherence unavailable (no labels)") +
        `, mean document co-occurrence ${mean(1)}, over this tree's ${scored.length} scored links of ${nodes.length - 1}.`
      : `No link of this tree is scored (an end fires in fewer than ${m.semantic.min_docs} eval documents).` });
    const head = el("div", {},
      el("p", {}, el("a", { href: `#/${m.name}`, text: `\u2190 all ${m.label} trees` })),
      el("h2", { text: `${m.label}: tree of ${fid(root.l, root.i)}` }),
      el("p", { class: "note", text: `${nodes.length} features over ${levels.size} levels. Orange marks the tokens where a feature fires; ` +
        `the stronger the orange, the larger the activation (relative to the feature's largest shown). ` +
        (m.judge ? `Judge: ${yes.length} yes of ${judged.length} answers about this tree's links.` : "No judge output: links show no verdicts.") }),
      semLine);
    main.replaceChildren(head, el("ul", { class: "tree" }, sub(0, 0)));
    if (focusId) { const f = document.getElementById(focusId); if (f) { f.classList.add("focus"); f.scrollIntoView({ block: "center" }); } }
    performance.mark("hsae-tree");
  }

  function renderLone(r, chunk) {
    const m = models[r.model];
    const [l, i] = (r.focus || "").split("_").map(Number);
    const node = chunk[String(i)];
    if (!node) { main.replaceChildren(el("p", { class: "warn", text: `feature ${r.focus} is not in ${r.key}` })); return; }
    main.replaceChildren(el("p", {}, el("a", { href: `#/${m.name}`, text: `\u2190 all ${m.label} trees` })),
      el("h2", { text: `${m.label}: ${fid(l, i)} (in no tree: no parent, no children)` }), el("ul", { class: "tree" }, el("li", {}, nodeCard(node, true, null, m))));
  }

  // ----- search -----
  let searchTimer = null;
  function featureHash(m, s, l, i) {
    const code = s.root[l][i], rl = Math.floor(code / 1e7), ri = code % 1e7;
    if (rl === l && ri === i && !m.trees.l.some((x, k) => x === l && m.trees.i[k] === i))
      return `#/${m.name}/s${l}_${Math.floor(i / m.single_chunk)}/${l}_${i}`;
    return `#/${m.name}/t${rl}_${ri}/${l}_${i}`;
  }
  async function doSearch() {
    const q = search.value.trim();
    if (!q) { results.hidden = true; return; }
    const r = route();
    const m = models[r.model];
    let s;
    try { s = await load(`${m.name}/search`, `data/${m.name}/search.js`); }
    catch (e) { results.replaceChildren(el("div", { class: "warn", text: e.message })); results.hidden = false; return; }
    const hits = [];
    const idm = q.match(/^(?:l\s*(\d+)\s*[#:_ ]\s*)?#?(\d+)$/i);
    if (idm) {
      const want = Number(idm[2]);
      s.toks.forEach((lv, l) => { if ((idm[1] == null || Number(idm[1]) === l) && want < lv.length) hits.push([l, want, 0]); });
    } else {
      // features whose activating tokens contain the text; a match among the first tokens ranks first
      const needle = q.toLowerCase();
      s.toks.forEach((lv, l) => lv.forEach((t, i) => {
        if (!t) return;
        const at = t.toLowerCase().indexOf(needle);
        if (at >= 0) hits.push([l, i, t.slice(0, at).split(" | ").length]);
      }));
      hits.sort((a, b) => a[2] - b[2] || (s.f[b[0]][b[1]] || 0) - (s.f[a[0]][a[1]] || 0));
    }
    const shown = hits.slice(0, 100);
    results.replaceChildren(el("div", { class: "note", text: hits.length ? `${hits.length} features in ${m.label}` + (hits.length > shown.length ? ` (first ${shown.length})` : "") : `no feature of ${m.label} matches "${q}"` }),
      ...shown.map(([l, i]) => el("div", { class: "hit", onclick: () => { results.hidden = true; go(featureHash(m, s, l, i)); } },
        el("span", { class: "fid", text: fid(l, i) }), "  ", el("span", { class: "top", text: s.toks[l][i] || "(no contexts)" }),
        el("span", { class: "link", text: `  freq ${fmtPct(s.f[l][i])}` }))));
    results.hidden = false;
  }
  search.addEventListener("input", () => { clearTimeout(searchTimer); searchTimer = setTimeout(doSearch, 150); });
  search.addEventListener("keydown", e => { if (e.key === "Escape") { results.hidden = true; } });

  // ----- render -----
  let token = 0;
  async function render() {
    const r = route();
    const mine = ++token;
    renderModels(r);
    document.title = `${ov.title}`;
    if (r.view === "compare") {
      // every forest side by side (two or three panes)
      main.replaceChildren(el("div", { class: "panes" },
        ...ov.models.map(m => el("iframe", { src: `index.html?embed#/${m.name}`, title: m.label }))));
      return;
    }
    if (r.view === "overview") { renderOverview(r); return; }
    const m = models[r.model];
    main.replaceChildren(el("p", { class: "note", text: "loading…" }));
    try {
      const data = await load(`${m.name}/${r.key}`, `data/${m.name}/${r.key}.js`);
      if (mine !== token) return;
      if (r.key[0] === "t") renderTree(r, data); else renderLone(r, data);
    } catch (e) {
      if (mine === token) main.replaceChildren(el("p", { class: "warn", text: e.message }));
    }
  }
  window.addEventListener("hashchange", render);
  if (embedded) document.querySelector("header").style.position = "static";
  render();
})();
