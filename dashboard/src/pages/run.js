// Run a flow: body, query (one KEY=VALUE a line) and an optional request id; the new
// request's page opens at once.

import { api } from "../api.js";
import { h, mount } from "../dom.js";

function queryString(text) {
  const search = new URLSearchParams();
  for (const line of text.split("\n")) {
    if (!line.trim()) continue;
    const at = line.indexOf("=");
    if (at < 1) throw new Error(`query line ${JSON.stringify(line)} is not KEY=VALUE`);
    search.append(line.slice(0, at).trim(), line.slice(at + 1));
  }
  return search.toString();
}

export async function runPage(main, { args }) {
  const { flows } = await api.flows();
  const chosen = args[0] && flows.includes(args[0]) ? args[0] : flows[0];
  const flow = h("select", { name: "flow" }, flows.map((f) => h("option", { value: f, selected: f === chosen, text: f })));
  const body = h("textarea", { name: "body", rows: 8, placeholder: "The request body (its input), sent as is." });
  const query = h("textarea", { name: "query", rows: 3, placeholder: "lang=en\nlang=de" });
  const requestId = h("input", { name: "request_id", placeholder: "optional: a fresh id is made", maxLength: 128 });
  const message = h("p", { role: "status" });
  const form = h(
    "form",
    {
      class: "card run-form",
      onsubmit: async (ev) => {
        ev.preventDefault();
        message.className = "muted";
        message.textContent = "Submitting…";
        try {
          const answer = await api.execute(flow.value, body.value, queryString(query.value), requestId.value.trim());
          location.hash = `#/request/${encodeURIComponent(answer.flow)}/${encodeURIComponent(answer.request_id)}`;
        } catch (error) {
          message.className = "error";
          message.textContent = error.message;
        }
      },
    },
    h("label", {}, h("span", { text: "Flow" }), flow),
    h("label", {}, h("span", { text: "Body" }), body),
    h("label", {}, h("span", { text: "Query (KEY=VALUE per line)" }), query),
    h("label", {}, h("span", { text: "Request id" }), requestId),
    h("div", {}, h("button", { type: "submit", class: "primary", text: "Run", disabled: !flows.length })),
    message,
  );
  mount(main, h("h1", { text: "Run a flow" }), form);
}
