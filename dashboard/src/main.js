// The dashboard: a small single-page app over the public HTTP API, routed by the URL's
// hash (#/requests?flow=x, #/request/FLOW/ID, ...). Each page returns a function that
// stops its live updates when the page is left.

import { api, ApiError } from "./api.js";
import { h, mount } from "./dom.js";
import { flowsPage } from "./pages/flows.js";
import { requestPage } from "./pages/request.js";
import { requestsPage } from "./pages/requests.js";
import { runPage } from "./pages/run.js";
import { workersPage } from "./pages/workers.js";

const main = document.getElementById("main");
let leave = () => {};
let generation = 0;

const routes = [
  [/^\/?$/, "flows", () => flowsPage],
  [/^\/flows$/, "flows", () => flowsPage],
  [/^\/requests$/, "requests", () => requestsPage],
  [/^\/request\/([^/]+)\/([^/]+)$/, "requests", () => requestPage],
  [/^\/run(?:\/([^/]+))?$/, "run", () => runPage],
  [/^\/workers$/, "workers", () => workersPage],
];

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, search = ""] = raw.split("?");
  return { path, params: new URLSearchParams(search) };
}

let config = null;

async function route() {
  leave();
  leave = () => {};
  const mine = ++generation;
  config ||= await api.config().catch(() => ({ auth: false, signed_in: true }));
  if (!config.signed_in) {
    loginForm();
    return;
  }
  const { path, params } = parseHash();
  const found = routes.find(([re]) => re.test(path));
  if (!found) {
    mount(main, h("h1", { text: "Not found" }), h("p", { text: `No page at #${path}.` }));
    return;
  }
  const [re, nav, page] = found;
  for (const a of document.querySelectorAll("[data-nav]")) {
    a.classList.toggle("active", a.dataset.nav === nav);
  }
  const args = re.exec(path).slice(1).map((a) => (a === undefined ? a : decodeURIComponent(a)));
  try {
    const stop = await page()(main, { args, params });
    if (mine === generation) leave = stop || (() => {});
    else if (stop) stop();
  } catch (error) {
    if (mine === generation) showError(error);
  }
}

function showError(error) {
  if (error instanceof ApiError && error.status === 401) {
    config = null; // the session has expired: ask again
    loginForm();
    return;
  }
  mount(main, h("div", { class: "error-box" }, h("strong", { text: "Error: " }), error.message));
}

function loginForm() {
  leave();
  leave = () => {};
  const input = h("input", { type: "password", name: "token", autocomplete: "current-password", required: true, autofocus: true });
  const message = h("p", { class: "muted" });
  const form = h(
    "form",
    {
      class: "login",
      onsubmit: async (ev) => {
        ev.preventDefault();
        try {
          await api.login(input.value);
          config = null;
          await route();
          showBackend();
        } catch (error) {
          message.textContent = error.status === 401 ? "Wrong token." : error.message;
          message.className = "error";
        }
      },
    },
    h("h1", { text: "Sign in" }),
    h("p", { text: "This flowloom server needs its access token." }),
    h("label", {}, "Token ", input),
    h("button", { type: "submit", text: "Sign in" }),
    message,
  );
  mount(main, form);
  input.focus();
}

async function showBackend() {
  const out = document.getElementById("signout");
  out.hidden = !(config && config.auth && config.signed_in);
  try {
    if (config && !config.signed_in) return;
    const health = await api.health();
    document.getElementById("backend").textContent = `backend: ${health.backend}`;
  } catch {
    // the page says what is wrong once it loads
  }
}

document.getElementById("signout").addEventListener("click", async () => {
  await api.logout().catch(() => {});
  config = null;
  document.getElementById("backend").textContent = "";
  await route();
  showBackend();
});

window.addEventListener("hashchange", route);
route().then(showBackend);
