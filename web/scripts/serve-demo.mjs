// Serve web/demo/ on loopback for a browser (run `npm run build` first):
//   node scripts/serve-demo.mjs --wss wss://localhost:7444/keymgmt [--port 8080]
// The page's Content-Security-Policy (connect-src) and its default key server are rewritten to
// the given wss URL; its origin (http://127.0.0.1:PORT) must be in the key server's
// websocket.allowed_origins. Only files under demo/ are served.
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { extname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";

const args = process.argv.slice(2);
const option = (name, fallback) => (args.includes(name) ? args[args.indexOf(name) + 1] : fallback);
const wss = new URL(option("--wss", "wss://localhost:7444/keymgmt"));
if (wss.protocol !== "wss:") throw new Error("--wss takes a wss:// URL");
const port = Number(option("--port", "8080"));
const root = fileURLToPath(new URL("../demo/", import.meta.url));
const types = { ".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css", ".map": "application/json" };

createServer(async (req, res) => {
  const path = normalize(decodeURIComponent(new URL(req.url ?? "/", "http://x").pathname)).replace(/^\/+/, "") || "index.html";
  if (path.startsWith("..") || !(extname(path) in types)) {
    res.writeHead(404).end();
    return;
  }
  try {
    let body = await readFile(join(root, path));
    if (path === "index.html") {
      body = Buffer.from(
        body
          .toString("utf-8")
          .replace(/connect-src [^;"]+/, `connect-src ${wss.origin}`)
          .replace(/(<meta name="keymgmt-server" content=")[^"]*"/, `$1${wss.href}"`),
      );
    }
    // frame-ancestors: what the page's <meta> CSP cannot say (no other site may frame it).
    const headers = { "Content-Type": types[extname(path)], "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store" };
    res.writeHead(200, { ...headers, "Content-Security-Policy": "frame-ancestors 'none'" });
    res.end(body);
  } catch {
    res.writeHead(404).end();
  }
}).listen(port, "127.0.0.1", () => console.log(`demo on http://127.0.0.1:${port}/ (key server ${wss.href}; allow origin http://127.0.0.1:${port})`));
