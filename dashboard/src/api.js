// The HTTP API, as the dashboard uses it. Every call is same-origin; with a token set,
// the session cookie from the login form authenticates it (never the token in a URL).

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

const HEADERS = { "X-Flowloom-Dashboard": "1" };

async function call(method, path, { body, headers, raw } = {}) {
  const response = await fetch(path, {
    method,
    body,
    headers: { ...HEADERS, ...headers },
    credentials: "same-origin",
    cache: "no-store",
  });
  if (raw && response.ok) return response;
  const type = response.headers.get("content-type") || "";
  const data = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) {
    const message = typeof data === "object" && data && data.error ? data.error : String(data);
    throw new ApiError(response.status, message || response.statusText);
  }
  return data;
}

const q = (params) => {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(key, value);
  }
  const text = search.toString();
  return text ? `?${text}` : "";
};
const seg = encodeURIComponent;

export const api = {
  flows: () => call("GET", "/flows"),
  definition: (flow) => call("GET", `/flow/${seg(flow)}/definition`),
  requests: (flow, params) =>
    call("GET", flow ? `/flow/${seg(flow)}/requests${q(params)}` : `/requests${q(params)}`),
  steps: (flow, id) => call("GET", `/flow/${seg(flow)}/requests/${seg(id)}/steps`),
  instances: (flow, id, params) =>
    call("GET", `/flow/${seg(flow)}/requests/${seg(id)}/instances${q(params)}`),
  output: (flow, id, vertex) =>
    call("GET", `/flow/${seg(flow)}/requests/${seg(id)}/output${q({ vertex })}`, { raw: true }),
  result: (flow, id) => call("GET", `/flow/${seg(flow)}/requests/${seg(id)}/result`, { raw: true }),
  control: (flow, id, action) =>
    call("POST", `/flow/${seg(flow)}/requests/${seg(id)}/${action}`),
  execute: (flow, body, query, requestId) =>
    call("POST", `/flow/${seg(flow)}${query ? `?${query}` : ""}`, {
      body,
      headers: { "X-Async": "true", ...(requestId ? { "X-Request-Id": requestId } : {}) },
    }),
  workers: () => call("GET", "/workers"),
  queue: () => call("GET", "/queue"),
  health: () => call("GET", "/health"),
  spec: () => call("GET", "/openapi.json"),
  config: () => call("GET", "/dashboard/config"),
  login: (token) =>
    call("POST", "/dashboard/login", {
      body: new URLSearchParams({ token }),
    }),
  logout: () => call("POST", "/dashboard/logout"),
};
