// Builds TP's browser SSH demo from the pinned npm packages (run `npm ci`
// first): one ES module bundle and xterm.js's stylesheet, into
// tpproxy/web/static/, or into the directory given as the first argument
// (check.sh builds into a temporary one and compares).
//
// The bundle depends only on package-lock.json and src/: esbuild writes no
// dates or absolute paths, so two builds are byte-identical.
//
// What the browser lacks of Node.js, and how the bundle does without it:
// - Buffer: the "buffer" package, injected where code uses the free variable
//   Buffer (dev-tunnels-ssh's sshChannel and authenticationService,
//   diffie-hellman);
// - "global" (randombytes): defined as globalThis;
// - process: a small object (src/shims/process.js), injected likewise:
//   dev-tunnels-ssh-keys reads process.versions at load time;
// - "stream": a stub (src/shims/stream.js) whose classes throw if made: the
//   library subclasses Duplex at load time for SshStream/SecureStream, which
//   the demo does not use;
// - crypto, fs, net, os, path: an empty module; only Node.js code paths call
//   them;
// - the library's Node.js algorithm implementations (algorithms/node/*,
//   chosen only when WebCrypto is missing) are left out altogether.
import { copyFile, mkdir, readdir, readFile, writeFile } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const out = resolve(process.argv[2] || join(here, "..", "tpproxy", "web", "static"));
const shim = (name) => join(here, "src", "shims", name);

const browserOnly = {
  name: "browser-only",
  setup(build) {
    build.onResolve({ filter: /^\.\/node\/node[A-Za-z]+$/ }, (args) =>
      args.importer.includes("dev-tunnels-ssh") ? { path: shim("empty.js") } : undefined,
    );
  },
};

await mkdir(out, { recursive: true });
const result = await esbuild.build({
  absWorkingDir: here,
  entryPoints: ["src/ssh-demo.js"],
  outfile: join(out, "ssh-demo.js"),
  bundle: true,
  format: "esm",
  platform: "browser",
  target: ["chrome120", "firefox120", "safari17"],
  minify: process.env.TP_WEB_NOMINIFY ? false : true,
  legalComments: "eof",
  charset: "utf8",
  define: { global: "globalThis" },
  inject: [shim("buffer-global.js"), shim("process.js")],
  alias: {
    stream: shim("stream.js"),
    crypto: shim("empty.js"),
    fs: shim("empty.js"),
    net: shim("empty.js"),
    os: shim("empty.js"),
    path: shim("empty.js"),
  },
  plugins: [browserOnly],
  logLevel: "warning",
  metafile: true,
});
await copyFile(join(here, "node_modules", "@xterm", "xterm", "css", "xterm.css"), join(out, "xterm.css"));

// The licences of the npm packages in the bundle (their MIT and BSD terms
// ask for the notice to travel with copies), in a stable order.
const packages = new Set();
for (const input of Object.keys(result.metafile.inputs)) {
  const match = input.match(/node_modules\/((?:@[^/]+\/)?[^/]+)\//);
  if (match) packages.add(match[1]);
}
const notices = [
  "Third-party software in ssh-demo.js and xterm.css, built by web/build.sh",
  "from web/package-lock.json. Each package's licence follows.",
];
for (const name of [...packages].sort()) {
  const dir = join(here, "node_modules", name);
  const meta = JSON.parse(await readFile(join(dir, "package.json"), "utf8"));
  const file = (await readdir(dir)).sort().find((f) => /^(licen[cs]e|copying)/i.test(f));
  const text = file
    ? (await readFile(join(dir, file), "utf8")).trim()
    : `${meta.license} licence; the npm package has no licence file. Author: ${
        typeof meta.author === "object" ? meta.author.name : meta.author || "see " + (meta.repository?.url || meta.repository)
      }.`;
  notices.push("", "=".repeat(72), `${meta.name} ${meta.version} (${meta.license})`, "=".repeat(72), text);
}
await writeFile(join(out, "THIRD-PARTY-LICENSES.txt"), notices.join("\n") + "\n");
