// The request list, across flows or of one, filtered by status, paged on the server and
// refreshed twice a second.

import { api } from "../api.js";
import { badge, duration, h, mount, time } from "../dom.js";
import { every } from "../live.js";

const STATUSES = ["queued", "running", "paused", "completed", "failed", "stopped"];
const LIMIT = 50;

function link(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) if (value) search.set(key, value);
  const text = search.toString();
  return `#/requests${text ? `?${text}` : ""}`;
}

function select(name, value, options, onchange) {
  return h(
    "select",
    { name, onchange },
    options.map(([v, label]) => h("option", { value: v, selected: v === value, text: label })),
  );
}

function row(r, now) {
  const end = r.ended ?? (["queued", "running", "paused"].includes(r.status) ? now : null);
  return h(
    "tr",
    { "data-request": r.request_id, "data-status": r.status },
    h("td", {}, h("a", { href: `#/request/${encodeURIComponent(r.flow)}/${encodeURIComponent(r.request_id)}`, class: "mono", text: r.request_id })),
    h("td", {}, h("a", { href: link({ flow: r.flow }), text: r.flow })),
    h("td", {}, badge(r.status)),
    h("td", { text: time(r.created) }),
    h("td", { class: "num", text: end === null ? "—" : duration(end - r.created) }),
    h("td", { class: "error-cell", text: r.error ? `${r.error.vertex}: ${r.error.type}: ${r.error.message}` : "" }),
  );
}

export async function requestsPage(main, { params }) {
  const flow = params.get("flow") || "";
  const status = params.get("status") || "";
  const offset = Math.max(0, Number.parseInt(params.get("offset") || "0", 10) || 0);
  const { flows } = await api.flows();
  const go = (changes) => {
    location.hash = link({ flow, status, offset: 0, ...changes });
  };
  const body = h("tbody");
  const pager = h("div", { class: "pager" });
  const count = h("span", { class: "muted" });

  const refresh = async () => {
    const page = await api.requests(flow, { status, offset, limit: LIMIT });
    const now = Date.now() / 1000;
    mount(body, page.requests.length ? page.requests.map((r) => row(r, now)) : h("tr", {}, h("td", { colspan: 6, class: "muted", text: "No request." })));
    count.textContent = page.requests.length
      ? `${offset + 1}–${offset + page.requests.length}`
      : "";
    mount(
      pager,
      h("a", { class: `button${offset ? "" : " disabled"}`, href: offset ? link({ flow, status, offset: Math.max(0, offset - LIMIT) }) : undefined, text: "← Newer" }),
      count,
      h("a", { class: `button${page.next_offset ? "" : " disabled"}`, href: page.next_offset ? link({ flow, status, offset: page.next_offset }) : undefined, text: "Older →" }),
    );
  };
  await refresh();
  mount(
    main,
    h("h1", { text: flow ? `Requests of ${flow}` : "Requests" }),
    h(
      "div",
      { class: "toolbar" },
      h("label", {}, "Flow ", select("flow", flow, [["", "all flows"], ...flows.map((f) => [f, f])], (ev) => go({ flow: ev.target.value }))),
      h("label", {}, "Status ", select("status", status, [["", "any status"], ...STATUSES.map((s) => [s, s])], (ev) => go({ status: ev.target.value }))),
      flow ? h("a", { class: "button", href: `#/run/${encodeURIComponent(flow)}`, text: `Run ${flow}` }) : null,
    ),
    h(
      "table",
      { class: "requests" },
      h("thead", {}, h("tr", {}, ["Request", "Flow", "Status", "Started", "Duration", "Error"].map((t) => h("th", { text: t })))),
      body,
    ),
    pager,
  );
  return every(500, refresh);
}
