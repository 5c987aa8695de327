// Live workers (from their heartbeats) and the depth of the task queue.

import { api } from "../api.js";
import { duration, h, mount } from "../dom.js";
import { every } from "../live.js";

function flowsCell(worker) {
  const versions = worker.versions || {};
  return (worker.flows || []).map((f) =>
    h("span", { class: "tag", title: versions[f] ? `version ${versions[f]}` : "" }, f, versions[f] ? h("span", { class: "muted", text: ` ${String(versions[f]).slice(0, 8)}` }) : null),
  );
}

const stat = (name, value, label) =>
  h(
    "div",
    { class: "stat" },
    h("span", { class: "stat-value", "data-queue": name, text: value === null || value === undefined ? "—" : value.toLocaleString() }),
    h("span", { class: "muted", text: label }),
  );

export async function workersPage(main) {
  const queueBox = h("div", { class: "queue" });
  const body = h("tbody");
  const refresh = async () => {
    const [{ workers }, queue] = await Promise.all([api.workers(), api.queue()]);
    const now = Date.now() / 1000;
    mount(
      queueBox,
      stat("ready", queue.ready, "tasks ready"),
      stat("delayed", queue.delayed, "retries waiting"),
      stat("held", queue.held, "held by paused requests"),
      h("div", { class: "stat" }, h("span", { class: "stat-value", text: String(workers.length) }), h("span", { class: "muted", text: "live workers" })),
    );
    mount(
      body,
      workers.length
        ? workers.map((w) =>
            h(
              "tr",
              { "data-worker": w.name },
              h("td", { class: "mono", text: w.name }),
              h("td", { text: w.host ?? "—" }),
              h("td", { class: "num", text: w.pid ?? "—" }),
              h("td", {}, flowsCell(w)),
              h("td", { class: "num", text: w.concurrency ?? "—" }),
              h("td", { text: w.last_seen ? `${duration(Math.max(0, now - w.last_seen))} ago` : "—" }),
              h("td", {}, w.degraded ? h("span", { class: "badge st-failed", title: String(w.degraded_reason || ""), text: "degraded" }) : h("span", { class: "badge st-completed", text: "ok" })),
            ),
          )
        : h("tr", {}, h("td", { colspan: 7, class: "muted", text: "No live worker." })),
    );
  };
  await refresh();
  mount(
    main,
    h("h1", { text: "Workers" }),
    queueBox,
    h(
      "table",
      { class: "workers" },
      h("thead", {}, h("tr", {}, ["Worker", "Host", "PID", "Flows (version)", "Concurrency", "Last heartbeat", "State"].map((t) => h("th", { text: t })))),
      body,
    ),
  );
  return every(1000, refresh);
}
