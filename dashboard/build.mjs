// Builds the dashboard into the Python package (src/flowloom/static/dashboard/):
// one minified ES module (app.js, with dagre inside), the stylesheet and the page.
// Run `npm ci && npm run build` here and commit the output: `pip install` needs no npm.
import { createHash } from "node:crypto";
import { copyFile, mkdir, readdir, readFile, writeFile } from "node:fs/promises";
import { join, relative } from "node:path";
import { build } from "esbuild";

const out = new URL("../src/flowloom/static/dashboard/", import.meta.url);
await mkdir(out, { recursive: true });
await build({
  entryPoints: ["src/main.js"],
  bundle: true,
  minify: true,
  format: "esm",
  target: ["chrome110", "firefox115", "safari16"],
  outfile: new URL("app.js", out).pathname,
  legalComments: "none", // the licenses go to THIRD-PARTY-LICENSES.txt, whole
  logLevel: "info",
});
for (const file of ["index.html", "app.css"]) {
  await copyFile(new URL(`src/${file}`, import.meta.url), new URL(file, out));
}
const bundled = ["@dagrejs/dagre", "@dagrejs/graphlib"];
const licenses = [];
for (const name of bundled) {
  const text = await readFile(new URL(`node_modules/${name}/LICENSE`, import.meta.url), "utf8");
  licenses.push(`${name}\n${"=".repeat(name.length)}\n\n${text.trim()}\n`);
}
await writeFile(new URL("THIRD-PARTY-LICENSES.txt", out), `${licenses.join("\n")}`);

// The digest of the sources the assets were built from: tests/test_dashboard.py checks
// that it matches dashboard/src and the lock file, so stale assets cannot be committed.
const src = new URL("src/", import.meta.url);
const files = (await readdir(src, { recursive: true, withFileTypes: true }))
  .filter((entry) => entry.isFile())
  .map((entry) => relative(src.pathname, join(entry.parentPath ?? entry.path, entry.name)))
  .sort();
const digest = createHash("sha256");
for (const name of [...files.map((f) => `src/${f}`), "package-lock.json"]) {
  digest.update(`${name}\n`);
  digest.update(await readFile(new URL(name, import.meta.url)));
}
await writeFile(new URL("SOURCES.sha256", out), `${digest.digest("hex")}\n`);
