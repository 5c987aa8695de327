// A flow's definition drawn as SVG: dagre lays it out (sub-DAGs, conditional and
// foreach branches as nested clusters); this module only turns the layout into shapes.
// Ids are vertex paths as the API's step summary names them: "users[]/verify/check[pass]/x".

import dagre from "@dagrejs/dagre";
import { s } from "./dom.js";

const FONT = "13px system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";
const SMALL = "11px system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";
const TITLE = `600 ${SMALL}`; // cluster titles, as app.css draws them
const LINE = 16;
const PAD_X = 12;
const CLUSTER_LABEL = 22;
// Room in a node for "12345/12345 done, 1234 failed" when the graph shows a request.
const STATUS_WIDTH = 190;

let canvas;
function textWidth(text, font = FONT) {
  canvas ||= document.createElement("canvas").getContext("2d");
  canvas.font = font;
  return Math.ceil(canvas.measureText(text).width);
}

const clip = (text, max = 44) => (text.length > max ? `${text.slice(0, max - 1)}…` : text);

// "define.<locals>.<lambda>" reads as "<lambda>".
const short = (name) => name.split(".<locals>.").pop();

function detailOf(vertex) {
  if (vertex.aggregator) return `⊕ ${short(vertex.aggregator)}`;
  const handlers = (vertex.handlers || []).map(short).join(" → ");
  const extra = [];
  if (vertex.retries) extra.push(`retries ${vertex.retries}`);
  if (vertex.timeout) extra.push(`timeout ${vertex.timeout}s`);
  return clip([handlers, ...extra].filter(Boolean).join(" · "));
}

function clusterTitle(vertex) {
  const agg = vertex.aggregator ? ` ⊕ ${short(vertex.aggregator)}` : "";
  if (vertex.kind === "foreach") return `${vertex.name} · foreach${agg}`;
  if (vertex.kind === "conditional") return `${vertex.name} · conditional${agg}`;
  return `${vertex.name} · sub-DAG`;
}

function clusterTip(vertex) {
  if (vertex.kind === "foreach") return `runs once per item of ${short(vertex.foreach)}(input)`;
  if (vertex.kind === "conditional") return `runs the branches ${short(vertex.condition)}(input) picks`;
  return "a sub-DAG";
}

/** Add one DAG's vertices and edges to `g`; returns name -> {firsts, lasts} leaf ids. */
function addDag(g, dag, prefix, parent, withStatus) {
  const ends = {};
  for (const vertex of dag.vertices) {
    const path = prefix + vertex.name;
    if (vertex.kind === "node") {
      const detail = detailOf(vertex);
      const width =
        Math.max(textWidth(vertex.name), textWidth(detail, SMALL), withStatus ? STATUS_WIDTH : 0) +
        2 * PAD_X;
      g.setNode(path, { kind: "node", path, title: vertex.name, detail, width, height: 2 * LINE + 12 });
      if (parent) g.setParent(path, parent);
      ends[vertex.name] = { firsts: [path], lasts: [path] };
      continue;
    }
    const title = clusterTitle(vertex);
    const tip = clusterTip(vertex);
    g.setNode(path, { kind: vertex.kind, path, title, tip, minWidth: textWidth(title, TITLE) + 20 });
    if (parent) g.setParent(path, parent);
    if (vertex.kind === "conditional") {
      const firsts = [];
      const lasts = [];
      for (const [key, branch] of Object.entries(vertex.branches)) {
        const bpath = `${path}[${key}]`;
        const tip = `branch ${key} of ${vertex.name}`;
        g.setNode(bpath, { kind: "branch", path: bpath, title: `[${key}]`, tip, minWidth: textWidth(`[${key}]`, TITLE) + 20 });
        g.setParent(bpath, path);
        const sub = addDag(g, branch, `${bpath}/`, bpath, withStatus);
        const { first, last } = bounds(branch);
        firsts.push(...first.flatMap((n) => sub[n].firsts));
        lasts.push(...sub[last].lasts);
      }
      ends[vertex.name] = { firsts, lasts };
    } else {
      const inner = vertex.kind === "foreach" ? `${path}[]/` : `${path}/`;
      const sub = addDag(g, vertex.dag, inner, path, withStatus);
      const { first, last } = bounds(vertex.dag);
      ends[vertex.name] = { firsts: first.flatMap((n) => sub[n].firsts), lasts: sub[last].lasts };
    }
  }
  for (const edge of dag.edges) {
    for (const v of ends[edge.from].lasts) {
      for (const w of ends[edge.to].firsts) {
        const label = edge.forwarder ? `↦ ${edge.forwarder}` : "";
        const attrs = { kind: edge.kind, label };
        if (label) Object.assign(attrs, { width: textWidth(label, SMALL) + 6, height: LINE, labelpos: "c" });
        g.setEdge(v, w, attrs, `${v}->${w}`);
      }
    }
  }
  return ends;
}

/** A DAG's first vertices (no incoming edge) and its last one (no outgoing edge). */
function bounds(dag) {
  const names = dag.vertices.map((v) => v.name);
  const targets = new Set(dag.edges.map((e) => e.to));
  const sources = new Set(dag.edges.map((e) => e.from));
  const first = names.filter((n) => !targets.has(n));
  const last = [...names].reverse().find((n) => !sources.has(n)) ?? names[names.length - 1];
  return { first, last };
}

export function layout(definition, withStatus = false) {
  const g = new dagre.graphlib.Graph({ compound: true, multigraph: true });
  g.setGraph({ rankdir: "TB", nodesep: 22, ranksep: 34, edgesep: 10, marginx: 12, marginy: 24 });
  g.setDefaultEdgeLabel(() => ({}));
  addDag(g, definition.dag, "", null, withStatus);
  dagre.layout(g);
  return g;
}

/**
 * Draw `definition`; returns {svg, nodes, clusters}: maps from vertex path to the drawn
 * group, so that a request page can colour them and write each one's progress.
 */
export function drawFlow(definition, { withStatus = false, onSelect } = {}) {
  const g = layout(definition, withStatus);
  let { width, height } = g.graph();
  let left = 0;
  const clusters = new Map();
  const nodes = new Map();
  const back = s("g", { class: "clusters" });
  const edges = s("g", { class: "edges" });
  const front = s("g", { class: "nodes" });
  const depth = (id) => {
    let d = 0;
    for (let p = g.parent(id); p; p = g.parent(p)) d += 1;
    return d;
  };
  const composite = g.nodes().filter((id) => g.children(id).length).sort((a, b) => depth(a) - depth(b));
  for (const id of composite) {
    const n = g.node(id);
    const top = n.y - n.height / 2 - CLUSTER_LABEL / 2;
    const w = Math.max(n.width, n.minWidth || 0);
    left = Math.min(left, n.x - w / 2 - 4);
    width = Math.max(width, n.x + w / 2 + 4);
    const group = s(
      "g",
      { class: `cluster k-${n.kind}`, "data-path": id },
      s("title", {}, `${id}: ${n.tip}`),
      s("rect", { x: n.x - w / 2, y: top, width: w, height: n.height + CLUSTER_LABEL / 2, rx: 6 }),
      s("text", { x: n.x - w / 2 + 8, y: top + 14, class: "cluster-title" }, n.title),
    );
    clusters.set(id, group);
    back.append(group);
  }
  for (const e of g.edges()) {
    const edge = g.edge(e);
    const d = edge.points.map((p, i) => `${i ? "L" : "M"}${p.x.toFixed(1)},${p.y.toFixed(1)}`).join(" ");
    const group = s("g", { class: `edge k-${edge.kind}` }, s("path", { d, "marker-end": "url(#arrow)" }));
    if (edge.label) {
      group.append(s("text", { x: edge.x, y: edge.y + 4, "text-anchor": "middle", class: "edge-label" }, edge.label));
    }
    edges.append(group);
  }
  for (const id of g.nodes()) {
    const n = g.node(id);
    if (n.kind !== "node") continue;
    const x = n.x - n.width / 2;
    const y = n.y - n.height / 2;
    const detail = s("text", { x: n.x, y: y + 2 * LINE + 4, class: "node-detail", "text-anchor": "middle" }, n.detail);
    const group = s(
      "g",
      { class: "node", "data-path": id, tabindex: onSelect ? 0 : undefined },
      s("title", {}, id),
      s("rect", { x, y, width: n.width, height: n.height, rx: 5 }),
      s("text", { x: n.x, y: y + LINE + 2, class: "node-title", "text-anchor": "middle" }, n.title),
      detail,
    );
    if (onSelect) {
      group.addEventListener("click", () => onSelect(id));
      group.addEventListener("keydown", (ev) => ev.key === "Enter" && onSelect(id));
    }
    nodes.set(id, { group, detail, original: n.detail });
    front.append(group);
  }
  const svg = s(
    "svg",
    { class: "graph", viewBox: `${Math.floor(left)} 0 ${Math.ceil(width - left)} ${Math.ceil(height)}`, width: Math.ceil(width - left), height: Math.ceil(height), role: "img" },
    s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" }, s("path", { d: "M0,0 L10,5 L0,10 z" }))),
    back,
    edges,
    front,
  );
  return { svg, nodes, clusters };
}
