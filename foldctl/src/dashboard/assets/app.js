// foldctl dashboard: polls /api/view and draws the mesh (a force-directed graph in SVG), the
// problems `check` finds, and each node's schemas, replicas and traffic. Everything from the
// mesh is put into the page as text (textContent, setAttribute): never parsed as markup.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const W = 800, H = 600;
const MAX_TEXT = 300;
const positions = new Map(); // node id -> {x, y}, kept across refreshes
let selected = null;
let lastView = null;

function clip(s) {
  s = String(s == null ? "" : s);
  return s.length > MAX_TEXT ? s.slice(0, MAX_TEXT) + "…" : s;
}

// An element with attributes and children (strings become text nodes).
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, clip(v));
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(clip(c)));
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text != null) e.textContent = clip(text);
  return e;
}

function ms(micros) {
  return micros == null ? "" : (micros / 1000).toFixed(2) + " ms";
}

function hash(s) {
  let h = 2166136261;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 16777619);
  return (h >>> 0) / 4294967296;
}

// Fruchterman–Reingold: repulsion between every pair, springs along links; positions persist
// so a refresh moves the picture only as much as the mesh changed.
function layout(nodes, links) {
  const n = nodes.length;
  const k = Math.sqrt((W * H) / Math.max(n, 1)) * 0.9;
  const pos = nodes.map((node, i) => {
    let p = positions.get(node.id);
    if (!p) {
      const a = 2 * Math.PI * (i / Math.max(n, 1)) + hash(node.id);
      const r = node.this ? 0 : 180 + 60 * hash(node.id + "r");
      p = { x: W / 2 + r * Math.cos(a), y: H / 2 + r * Math.sin(a) };
    }
    return { x: p.x, y: p.y };
  });
  const index = new Map(nodes.map((node, i) => [node.id, i]));
  const edges = links
    .map(l => [index.get(l.from), index.get(l.to)])
    .filter(([a, b]) => a !== undefined && b !== undefined);
  let t = W / 10;
  for (let iter = 0; iter < 300; iter++) {
    const d = pos.map(() => ({ x: 0, y: 0 }));
    for (let i = 0; i < n; i++) {
      for (let j = i + 1; j < n; j++) {
        let dx = pos[i].x - pos[j].x, dy = pos[i].y - pos[j].y;
        let dist = Math.hypot(dx, dy) || 0.01;
        const f = (k * k) / dist;
        dx /= dist; dy /= dist;
        d[i].x += dx * f; d[i].y += dy * f;
        d[j].x -= dx * f; d[j].y -= dy * f;
      }
    }
    for (const [a, b] of edges) {
      let dx = pos[a].x - pos[b].x, dy = pos[a].y - pos[b].y;
      const dist = Math.hypot(dx, dy) || 0.01;
      const f = (dist * dist) / k;
      dx /= dist; dy /= dist;
      d[a].x -= dx * f; d[a].y -= dy * f;
      d[b].x += dx * f; d[b].y += dy * f;
    }
    for (let i = 0; i < n; i++) {
      const len = Math.hypot(d[i].x, d[i].y) || 0.01;
      pos[i].x += (d[i].x / len) * Math.min(len, t);
      pos[i].y += (d[i].y / len) * Math.min(len, t);
      // Gravity toward the centre keeps separate parts on the canvas.
      pos[i].x += (W / 2 - pos[i].x) * 0.003;
      pos[i].y += (H / 2 - pos[i].y) * 0.003;
      pos[i].x = Math.min(W - 70, Math.max(70, pos[i].x));
      pos[i].y = Math.min(H - 40, Math.max(40, pos[i].y));
    }
    t = Math.max(1, t * 0.98);
  }
  nodes.forEach((node, i) => positions.set(node.id, pos[i]));
}

function linkClass(l) {
  if (l.denied) return "link denied";
  if (!l.connected) return "link down";
  if (l.relayed) return "link relayed";
  return "link direct";
}

function drawGraph(view) {
  const g = document.getElementById("graph");
  g.replaceChildren();
  layout(view.nodes, view.links);
  const edges = svg("g", { id: "edges" });
  for (const l of view.links) {
    const a = positions.get(l.from), b = positions.get(l.to);
    if (!a || !b) continue;
    const line = svg("line", {
      class: linkClass(l), x1: a.x, y1: a.y, x2: b.x, y2: b.y,
      "data-from": l.from, "data-to": l.to,
    });
    const how = [l.connected ? (l.relayed ? "relayed" : "direct") : "not connected"];
    if (l.transport) how.push(l.transport);
    if (l.denied) how.push("denied");
    line.append(svg("title", {}, `${l.from} ⇄ ${l.to}: ${how.join(", ")} ${ms(l.rtt_micros)}`));
    edges.append(line);
    const label = [ms(l.rtt_micros), l.relayed ? "relayed" : "", l.denied ? "denied" : ""]
      .filter(Boolean).join(" · ");
    if (label) {
      edges.append(svg("text", { class: "rtt", x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 - 4,
        "text-anchor": "middle" }, label));
    }
  }
  g.append(edges);
  const nodes = svg("g", { id: "vertices" });
  for (const node of view.nodes) {
    const p = positions.get(node.id);
    const cls = ["node", node.state, node.this ? "this" : "", node.id === selected ? "sel" : ""];
    const grp = svg("g", { class: cls.filter(Boolean).join(" "), "data-node-id": node.id,
      transform: `translate(${p.x},${p.y})` });
    grp.append(svg("circle", { r: node.this ? 16 : 12 }));
    grp.append(svg("title", {}, `${node.id}${node.state_detail ? " — " + node.state_detail : ""}`));
    grp.append(svg("text", { x: 0, y: 30, "text-anchor": "middle" }, node.short));
    if (node.this) grp.append(svg("text", { class: "tag", x: 0, y: -22, "text-anchor": "middle" }, "this node"));
    else if (node.state !== "ok") grp.append(svg("text", { class: "tag", x: 0, y: -18, "text-anchor": "middle" }, node.state));
    grp.addEventListener("click", () => { selected = node.id; render(lastView); });
    nodes.append(grp);
  }
  g.append(nodes);
  // Zoom to the drawing (with room for labels), keeping a small mesh from looking lost.
  const ps = view.nodes.map(n => positions.get(n.id)).filter(Boolean);
  if (ps.length) {
    const xs = ps.map(p => p.x), ys = ps.map(p => p.y);
    const pad = 90;
    let x0 = Math.min(...xs) - pad, x1 = Math.max(...xs) + pad;
    let y0 = Math.min(...ys) - pad, y1 = Math.max(...ys) + pad;
    const w = Math.max(x1 - x0, 400), h = Math.max(y1 - y0, 300);
    g.setAttribute("viewBox", `${(x0 + x1 - w) / 2} ${(y0 + y1 - h) / 2} ${w} ${h}`);
  }
  const sel = view.nodes.find(n => n.id === selected);
  document.getElementById("selected").replaceChildren(
    sel ? el("span", {}, "selected: ", el("b", {}, sel.id), sel.agent ? "  agent " + sel.agent : "",
      sel.addrs.length ? "  " + sel.addrs.join(", ") : "") :
      el("span", { class: "muted" }, "click a node for its full id; hover for details"));
}

function drawProblems(view) {
  const list = document.getElementById("problems");
  list.replaceChildren();
  if (view.problems.length === 0) {
    list.append(el("li", { class: "muted" }, "no problems found"));
    return;
  }
  const short = new Map(view.nodes.map(n => [n.id, n.short]));
  for (const p of view.problems) {
    const li = el("li", { "data-check": p.check },
      el("span", { class: "sev " + p.severity }, p.severity.toUpperCase()),
      el("b", {}, p.check), " ",
      el("span", { class: "muted", title: p.node }, "on " + (short.get(p.node) || p.node)), ": ",
      p.what);
    if (p.fix) li.append(el("div", { class: "fix" }, "fix: " + p.fix));
    list.append(li);
  }
}

function pct(x) { return x == null ? "-" : (x * 100).toFixed(1) + "%"; }
function num(x, unit) { return x == null ? "-" : x.toFixed(2) + (unit || ""); }

function card(node) {
  const c = el("div", { class: "card" + (node.this ? " this" : ""), "data-node-id": node.id },
    el("b", {}, node.short), el("span", { class: "state " + node.state }, node.this ? "this node" : node.state),
    el("div", { class: "id", title: node.id }, node.id));
  if (node.state_detail) c.append(el("div", { class: "muted" }, node.state_detail));
  if (node.agent) c.append(el("div", { class: "muted agent" }, "agent " + node.agent));
  c.append(el("div", {}, "schemas: ", node.schemas.length ? node.schemas.join(", ") :
    (node.asked ? "none approved" : "—")));
  if (node.traffic) {
    const t = node.traffic;
    c.append(el("div", { class: "traffic" },
      `requests ${num(t.rps)}/s · success ${pct(t.success_rate)} · p50 ${num(t.p50_ms, " ms")} · p99 ${num(t.p99_ms, " ms")} · ${t.total} total`));
  } else if (node.asked) {
    c.append(el("div", { class: "muted" }, "traffic: after the next refresh"));
  }
  for (const r of node.replicas) {
    const line = el("div", { class: "replica" },
      "replica ", el("b", {}, r.schema), " from ", el("span", { title: r.source }, "…" + r.source.slice(-8)),
      ` at ${r.applied}, lag ${r.lag} — `,
      el("span", { class: r.error ? "bad" : "" }, r.error ? r.cause : "in step"));
    if (r.error) line.append(el("div", { class: "muted small" }, r.error));
    c.append(line);
  }
  if (node.admin.length) c.append(el("div", { class: "muted" }, "admin " + node.admin.join(", ")));
  return c;
}

function drawNodes(view) {
  const box = document.getElementById("nodes");
  box.replaceChildren();
  const order = [...view.nodes].sort((a, b) => (b.this - a.this) || (b.asked - a.asked) || a.id.localeCompare(b.id));
  for (const node of order) box.append(card(node));
}

function render(view) {
  if (!view) return;
  lastView = view;
  const me = view.nodes.find(n => n.this);
  document.getElementById("subtitle").textContent =
    clip(`${view.nodes.length} node(s), ${view.links.length} link(s) — asked ${view.addr}` +
      (me ? ` (node ${me.short})` : ""));
  document.getElementById("updated").textContent =
    "updated " + new Date(view.generated_unix_ms).toLocaleTimeString() + ` · every ${view.refresh_ms / 1000} s`;
  drawGraph(view);
  drawProblems(view);
  drawNodes(view);
  document.getElementById("errors").textContent = clip(view.errors.join("; "));
  document.body.setAttribute("data-ready", "1");
}

async function refresh() {
  let wait = 2000;
  try {
    const r = await fetch("/api/view", { cache: "no-store" });
    if (r.ok) {
      const view = await r.json();
      render(view);
      wait = Math.max(500, view.refresh_ms || 2000);
    } else {
      document.getElementById("errors").textContent = clip("the dashboard answered " + r.status);
    }
  } catch (e) {
    document.getElementById("errors").textContent = clip("foldctl dashboard is not answering: " + e);
  }
  setTimeout(refresh, wait);
}

refresh();
