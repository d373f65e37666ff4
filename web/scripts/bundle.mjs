// Bundles for browsers (esbuild): build/keymgmt.js (the client, for a Service Provider's page)
// and demo/dist/demo.js (the demo page's script). tsc has type-checked everything before.
import { build } from "esbuild";

const common = { bundle: true, format: "esm", platform: "browser", target: "es2022", sourcemap: true, legalComments: "linked", logLevel: "warning" };
await build({ ...common, entryPoints: ["src/index.ts"], outfile: "build/keymgmt.js" });
await build({ ...common, entryPoints: ["demo/demo.ts"], outfile: "demo/dist/demo.js" });
