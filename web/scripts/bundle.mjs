// Bundles (esbuild): build/keymgmt.js (the client, for a Service Provider's page),
// demo/dist/demo.js (the demo page's script) and, for node, build/conformance-client.mjs (the
// TypeScript client as a command line for keymgmt's client conformance mode: scripts/
// conformance-client.ts). tsc has type-checked everything before. `--only NAME` builds one of
// them (keymgmt, demo or conformance-client); paths are relative to the working directory.
import { build } from "esbuild";

const common = { bundle: true, format: "esm", target: "es2022", sourcemap: true, legalComments: "linked", logLevel: "warning" };
const browser = { ...common, platform: "browser" };
const bundles = {
  keymgmt: { ...browser, entryPoints: ["src/index.ts"], outfile: "build/keymgmt.js" },
  demo: { ...browser, entryPoints: ["demo/demo.ts"], outfile: "demo/dist/demo.js" },
  "conformance-client": { ...common, platform: "node", entryPoints: ["scripts/conformance-client.ts"], outfile: "build/conformance-client.mjs" },
};
const only = process.argv.indexOf("--only");
const names = only === -1 ? Object.keys(bundles) : [process.argv[only + 1]];
for (const name of names) {
  if (!(name in bundles)) throw new Error(`no bundle ${name}: ${Object.keys(bundles).join(", ")}`);
  await build(bundles[name]);
}
