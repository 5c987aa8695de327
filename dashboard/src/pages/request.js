// One request: its graph coloured by vertex status, a Gantt timeline, its error, its
// result and vertex outputs, and the buttons that control it. Foreach instances are
// summarised per vertex by the server and listed on demand, a page at a time.

import { api } from "../api.js";
import { badge, download, duration, h, mount, time } from "../dom.js";
import { drawFlow } from "../graph.js";
import { every } from "../live.js";

const PAGE = 100;
const PREVIEW = 4096;
const ORDER = ["failed", "running", "paused", "stopped", "queued", "completed"];

/** The status a vertex shows: the most telling of its instances'. */
function overall(counts) {
  for (const status of ORDER) if (counts[status] && status !== "completed") return status;
  return counts.completed ? "completed" : "queued";
}

function progress(step) {
  const c = step.counts;
  if (step.instances === 1) {
    const status = overall(c);
    const took = step.started && step.ended ? ` · ${duration(step.ended - step.started)}` : "";
    const tries = step.attempts > 1 ? ` · ${step.attempts} attempts` : "";
    return `${status}${took}${tries}`;
  }
  const parts = [`${c.completed || 0}/${step.instances} done`];
  for (const status of ["failed", "running", "paused", "stopped", "queued"]) {
    if (c[status]) parts.push(`${c[status]} ${status}`);
  }
  return parts.join(", ");
}

async function preview(response, name) {
  const bytes = new Uint8Array(await response.arrayBuffer());
  const head = bytes.subarray(0, PREVIEW);
  const text = new TextDecoder("utf-8", { fatal: false }).decode(head);
  const binary = head.includes(0) || (text.match(/\uFFFD/g) || []).length > head.length / 20;
  const shown = binary
    ? Array.from(head.subarray(0, 512), (b) => b.toString(16).padStart(2, "0")).join(" ")
    : text;
  return h(
    "div",
    { class: "preview" },
    h(
      "div",
      { class: "preview-head" },
      h("span", { class: "muted", text: `${bytes.length.toLocaleString()} bytes${bytes.length > PREVIEW ? `, first ${PREVIEW.toLocaleString()} shown` : ""}${binary ? " (binary, hex)" : ""}` }),
      h("button", { type: "button", text: "Download", onclick: () => download(name, new Blob([bytes])) }),
    ),
    h("pre", { class: "output", text: shown || "(empty)" }),
  );
}

const safeName = (text) => text.replace(/[^A-Za-z0-9_.-]+/g, "_").slice(0, 120);

export async function requestPage(main, { args }) {
  const [flow, id] = args;
  const [definition, config, spec] = await Promise.all([
    api.definition(flow),
    api.config().catch(() => ({})),
    api.spec().catch(() => ({ paths: {} })),
  ]);
  let state = await api.steps(flow, id);
  const canRetry = Object.keys(spec.paths || {}).some((p) => p.endsWith("/retry"));
  const drawn = drawFlow(definition, { withStatus: true, onSelect: (path) => select(path) });

  const head = h("div", { class: "request-head" });
  const controls = h("div", { class: "controls" });
  const message = h("span", { class: "muted", role: "status" });
  const errorBox = h("div");
  const resultBox = h("div");
  const gantt = h("div", { class: "gantt" });
  const detail = h("div", { class: "vertex-detail" });
  let selected = null;
  let shownResult = null;

  const act = (action) => async () => {
    message.textContent = `${action}…`;
    try {
      const answer = await api.control(flow, id, action);
      message.textContent = `${action}: now ${answer.status}`;
    } catch (error) {
      message.textContent = `${action} failed: ${error.message}`;
    }
    await refresh();
    restart();
  };
  const button = (action, enabled) =>
    h("button", { type: "button", "data-action": action, disabled: !enabled, onclick: act(action), text: action[0].toUpperCase() + action.slice(1) });

  function renderHead() {
    const end = state.ended ?? Date.now() / 1000;
    const trace =
      state.trace_id && config.trace_url
        ? h("a", { href: config.trace_url.replace("{trace_id}", encodeURIComponent(state.trace_id)), target: "_blank", rel: "noopener", class: "mono", text: state.trace_id })
        : state.trace_id
          ? h("span", { class: "mono", text: state.trace_id })
          : null;
    mount(
      head,
      h("h1", {}, "Request ", h("span", { class: "mono", text: id }), " ", badge(state.status)),
      h(
        "dl",
        { class: "facts" },
        h("dt", { text: "Flow" }), h("dd", {}, h("a", { href: `#/requests?flow=${encodeURIComponent(flow)}`, text: flow })),
        h("dt", { text: "Started" }), h("dd", { text: time(state.created) }),
        h("dt", { text: "Ended" }), h("dd", { text: time(state.ended) }),
        h("dt", { text: "Duration" }), h("dd", { text: duration(end - state.created) }),
        trace ? [h("dt", { text: "Trace" }), h("dd", {}, trace)] : null,
      ),
    );
    const live = ["queued", "running"].includes(state.status);
    mount(
      controls,
      button("pause", live),
      button("resume", state.status === "paused"),
      button("stop", live || state.status === "paused"),
      canRetry ? button("retry", ["failed", "stopped"].includes(state.status)) : null,
      message,
    );
    const error = state.error;
    mount(
      errorBox,
      error
        ? h(
            "section",
            { class: "card error-box" },
            h("h2", { text: "Error" }),
            h("p", {}, "At ", h("span", { class: "mono", text: error.vertex }), ": ", h("strong", { text: error.type }), `: ${error.message}`),
            error.traceback ? h("pre", { class: "traceback", text: error.traceback }) : h("p", { class: "muted", text: "No traceback was recorded for this error." }),
          )
        : null,
    );
  }

  async function renderResult() {
    if (state.status !== "completed" || shownResult === id) return;
    shownResult = id;
    const response = await api.result(flow, id);
    mount(resultBox, h("section", { class: "card" }, h("h2", { text: "Result" }), await preview(response, `${safeName(id)}-result.bin`)));
  }

  function renderGraph() {
    const byPath = new Map(state.steps.map((step) => [step.vertex, step]));
    for (const [path, node] of drawn.nodes) {
      const step = byPath.get(path);
      node.group.setAttribute("class", `node st-${step ? overall(step.counts) : "none"}${path === selected ? " selected" : ""}`);
      node.detail.textContent = step ? progress(step) : "not reached";
    }
    for (const [path, cluster] of drawn.clusters) {
      const step = byPath.get(path);
      cluster.classList.remove(...ORDER.map((s) => `st-${s}`));
      if (step) cluster.classList.add(`st-${overall(step.counts)}`);
      cluster.firstChild.textContent = `${path}: ${step ? progress(step) : "not reached"}`;
    }
  }

  function renderGantt() {
    const start = state.created;
    const end = Math.max(state.ended ?? Date.now() / 1000, ...state.steps.map((s) => s.ended ?? s.started ?? start));
    const span = Math.max(end - start, 1e-3);
    const rows = [...state.steps].sort((a, b) => (a.started ?? Infinity) - (b.started ?? Infinity) || a.vertex.localeCompare(b.vertex));
    const bar = (item, status) => {
      const left = item.started ? ((item.started - start) / span) * 100 : 0;
      const right = item.started ? (((item.ended ?? end) - start) / span) * 100 : 0;
      const el = h("div", { class: `bar st-${status}`, title: `${time(item.started)} → ${item.ended ? time(item.ended) : "…"} (${item.started ? duration((item.ended ?? end) - item.started) : "not started"})` });
      el.style.left = `${left}%`;
      el.style.width = `${Math.max(right - left, 0.3)}%`;
      return el;
    };
    mount(
      gantt,
      h("div", { class: "gantt-row gantt-axis" }, h("span", { class: "gantt-label" }), h("span", { class: "gantt-track" }, h("span", { text: "0" }), h("span", { text: duration(span) }))),
      rows.map((step) =>
        h(
          "div",
          { class: `gantt-row${step.vertex === selected ? " selected" : ""}`, "data-vertex": step.vertex, onclick: () => select(step.vertex) },
          h("span", { class: "gantt-label mono", title: step.vertex, text: step.instances > 1 ? `${step.vertex} ×${step.instances}` : step.vertex }),
          h("span", { class: "gantt-track" }, bar(step, overall(step.counts))),
          h("span", { class: "gantt-note", text: `${step.attempts} attempt${step.attempts === 1 ? "" : "s"}` }),
        ),
      ),
    );
    return bar;
  }

  // The selected vertex: its instances (one page, refreshed live) and one output.
  let selectedOffset = 0;
  const instancesBox = h("div");
  const outputBox = h("div");
  mount(detail, h("section", { class: "card" }, instancesBox, outputBox));
  detail.hidden = true;

  async function select(path, offset = 0) {
    if (path !== selected) mount(outputBox);
    selected = path;
    selectedOffset = offset;
    renderGraph();
    renderGantt();
    await renderInstances();
    detail.hidden = false;
  }

  const showOutput = (address) => async () => {
    try {
      const response = await api.output(flow, id, address);
      mount(outputBox, h("h3", {}, "Output of ", h("span", { class: "mono", text: address })), await preview(response, `${safeName(id)}-${safeName(address)}.bin`));
    } catch (error) {
      mount(outputBox, h("p", { class: "error", text: error.message }));
    }
  };

  async function renderInstances() {
    const path = selected;
    const offset = selectedOffset;
    const page = await api.instances(flow, id, { vertex: path, offset, limit: PAGE });
    if (path !== selected || offset !== selectedOffset) return; // another was chosen meanwhile
    const bar = renderGantt();
    const pager =
      page.total > PAGE
        ? h(
            "div",
            { class: "pager" },
            h("button", { type: "button", disabled: offset === 0, text: "← Previous", onclick: () => select(path, Math.max(0, offset - PAGE)) }),
            h("span", { class: "muted", text: `${offset + 1}–${offset + page.instances.length} of ${page.total.toLocaleString()}` }),
            h("button", { type: "button", disabled: page.next_offset === null, text: "Next →", onclick: () => select(path, page.next_offset) }),
          )
        : null;
    mount(
      instancesBox,
      h("h2", {}, "Vertex ", h("span", { class: "mono", text: path }), h("span", { class: "muted", text: ` — ${page.total.toLocaleString()} instance${page.total === 1 ? "" : "s"}` })),
      pager,
      h(
        "div",
        { class: "instances" },
        page.instances.map((v) =>
          h(
            "div",
            { class: "gantt-row", "data-address": v.address },
            h("span", { class: "gantt-label mono", title: v.address, text: v.address }),
            h("span", { class: "gantt-track" }, bar(v, v.status)),
            h(
              "span",
              { class: "gantt-note" },
              badge(v.status),
              ` ${v.attempts}×`,
              v.status === "completed" ? h("button", { type: "button", class: "small", text: "Output", onclick: showOutput(v.address) }) : null,
              v.error ? h("span", { class: "error", title: v.error.traceback || "", text: ` ${v.error.type}: ${v.error.message}` }) : null,
            ),
          ),
        ),
      ),
    );
  }

  async function refresh() {
    state = await api.steps(flow, id);
    renderHead();
    renderGraph();
    renderGantt();
    if (selected) await renderInstances();
    await renderResult();
  }

  let stop = () => {};
  function restart() {
    stop();
    stop = every(700, async () => {
      await refresh();
      if (["completed", "failed", "stopped"].includes(state.status)) stop();
    });
  }

  renderHead();
  renderGraph();
  renderGantt();
  mount(
    main,
    head,
    controls,
    errorBox,
    h("section", { class: "card" }, h("h2", { text: "Graph" }), h("p", { class: "muted", text: "Click a vertex for its instances and outputs." }), h("div", { class: "graph-box" }, drawn.svg)),
    h("section", { class: "card" }, h("h2", { text: "Timeline" }), gantt),
    detail,
    resultBox,
  );
  await renderResult();
  const failed = state.error ? state.steps.find((s) => s.counts.failed) : null;
  if (failed) await select(failed.vertex);
  restart();
  return () => stop();
}
