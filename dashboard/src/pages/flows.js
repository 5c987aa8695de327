// Every registered flow, each drawn as a graph.

import { api } from "../api.js";
import { h, mount } from "../dom.js";
import { drawFlow } from "../graph.js";

const legend = () =>
  h(
    "p",
    { class: "legend muted" },
    "Boxes are nodes; framed groups are sub-DAGs, conditional branches (one frame per key) " +
      "and foreach branches (run once per item). Solid arrows carry data, dashed ones only " +
      "order; ↦ marks a forwarder, ⊕ an aggregator.",
  );

export async function flowsPage(main) {
  const { flows } = await api.flows();
  const definitions = await Promise.all(flows.map((name) => api.definition(name)));
  const cards = definitions.map((definition) =>
    h(
      "section",
      { class: "card flow", "data-flow": definition.name },
      h(
        "div",
        { class: "card-head" },
        h("h2", { text: definition.name }),
        h(
          "span",
          { class: "actions" },
          h("a", { href: `#/requests?flow=${encodeURIComponent(definition.name)}`, text: "Requests" }),
          h("a", { href: `#/run/${encodeURIComponent(definition.name)}`, text: "Run" }),
        ),
      ),
      h("div", { class: "graph-box" }, drawFlow(definition).svg),
    ),
  );
  mount(
    main,
    h("h1", { text: `Flows (${flows.length})` }),
    legend(),
    flows.length ? cards : h("p", { class: "muted", text: "No flow is registered." }),
  );
}
