// Builds the dashboard into the Python package (src/flowloom/static/dashboard/):
// one minified ES module (app.js, with dagre inside), the stylesheet and the page.
// Run `npm ci && npm run build` here and commit the output: `pip install` needs no npm.
import { build } from "esbuild";
import { copyFile, mkdir } from "node:fs/promises";

const out = new URL("../src/flowloom/static/dashboard/", import.meta.url);
await mkdir(out, { recursive: true });
await build({
  entryPoints: ["src/main.js"],
  bundle: true,
  minify: true,
  format: "esm",
  target: ["chrome110", "firefox115", "safari16"],
  outfile: new URL("app.js", out).pathname,
  legalComments: "linked",
  logLevel: "info",
});
for (const file of ["index.html", "app.css"]) {
  await copyFile(new URL(`src/${file}`, import.meta.url), new URL(file, out));
}
