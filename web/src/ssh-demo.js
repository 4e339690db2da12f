// SSH in the browser through a TP tunnel: the demo page's logic.
//
// ssh.html imports TP.js and this bundle and calls start(tp) with TP.js's
// module. The flow: mintToken() -> connect() -> openTCP({host, port}) -> an
// SSH client session (@microsoft/dev-tunnels-ssh on WebCrypto) over the
// tunnel's streams -> the server's host key shown for the user to accept ->
// password or key authentication -> a pty and a shell in an xterm.js terminal.
//
// For tests the form can be filled from the URL fragment
// (#host=...&port=...&user=...&password=...|key=...&hostkey=SHA256:...
// &run=...&autoconnect=1), and progress goes to the console as lines
// "TP-DEMO {json}" with an "event" field: hostkey, authenticated, shell,
// screen, error, closed.
import { Buffer } from "buffer";
import {
  ChannelRequestMessage,
  SshAlgorithms,
  SshAuthenticationType,
  SshClientSession,
  SshDisconnectReason,
  SshSessionConfiguration,
} from "@microsoft/dev-tunnels-ssh";
import { Terminal } from "@xterm/xterm";
import { importPrivateKey } from "./keys.js";
import { PtyRequestMessage, WindowChangeMessage } from "./ssh-messages.js";
import { TunnelStream } from "./tunnel-stream.js";

const FIELDS = ["url", "host", "port", "user", "password", "key", "passphrase", "hostkey", "run"];
const SCREEN_SETTLE_MS = 200;
const SCREEN_MAX_WAIT_MS = 1000;

function log(event, fields = {}) {
  console.log("TP-DEMO " + JSON.stringify({ event, ...fields }));
}

// An error to show the user, with a stable code for tests.
class DemoError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

// "SHA256:" and the unpadded base64 of the SHA-256 of the key's SSH wire
// encoding: what `ssh-keygen -lf` and ssh's host key prompt print.
export async function fingerprint(publicKeyBytes) {
  const digest = await crypto.subtle.digest("SHA-256", publicKeyBytes);
  return "SHA256:" + Buffer.from(digest).toString("base64").replace(/=+$/, "");
}

function screenText(terminal) {
  const buffer = terminal.buffer.active;
  const lines = [];
  for (let i = 0; i < buffer.length; i++) {
    lines.push(buffer.getLine(i).translateToString(true));
  }
  return lines.join("\n").trim();
}

// Logs the screen once output has been quiet for SCREEN_SETTLE_MS, or after
// SCREEN_MAX_WAIT_MS of continuous output; never twice with the same text.
class ScreenReporter {
  constructor(terminal) {
    this.terminal = terminal;
    this.timer = null;
    this.firstChange = 0;
    this.last = null;
  }

  changed() {
    const now = performance.now();
    if (this.timer === null) this.firstChange = now;
    else clearTimeout(this.timer);
    const wait = Math.min(SCREEN_SETTLE_MS, Math.max(0, this.firstChange + SCREEN_MAX_WAIT_MS - now));
    this.timer = setTimeout(() => this.report(), wait);
  }

  report() {
    this.timer = null;
    const text = screenText(this.terminal);
    if (text !== this.last) {
      this.last = text;
      log("screen", { lines: text.split("\n") });
    }
  }
}

function readFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const values = {};
  for (const [name, value] of params) values[name] = value;
  return values;
}

function sshConfiguration() {
  const config = new SshSessionConfiguration();
  // Not in the library's default lists, but WebCrypto has P-521 too.
  config.keyExchangeAlgorithms.push(SshAlgorithms.keyExchange.ecdhNistp521Sha512);
  config.publicKeyAlgorithms.push(SshAlgorithms.publicKey.ecdsaSha2Nistp521);
  return config;
}

function describe(error) {
  // TP.js's TPError keeps TP's own words in .detail (its .message starts
  // with the code).
  if (error && typeof error.code === "string") return { code: error.code, message: error.detail || error.message };
  return { code: "error", message: error && error.message ? error.message : String(error) };
}

export function start(tp, root = document) {
  const $ = (id) => root.getElementById(id);
  const form = $("ssh-form");
  const status = $("status");
  const hostKeyBox = $("hostkey-box");
  const terminal = new Terminal({ cols: 100, rows: 30, convertEol: false, scrollback: 1000 });
  terminal.open($("terminal"));
  const screen = new ScreenReporter(terminal);
  window.tpDemo = { terminal, screenText: () => screenText(terminal) };

  const fragment = readFragment();
  for (const name of FIELDS) {
    if (fragment[name] !== undefined && form.elements[name]) form.elements[name].value = fragment[name];
  }

  let active = null; // { tpSession, ssh } of the connection in progress

  function say(text, isError = false) {
    status.textContent = text;
    status.className = isError ? "error" : "";
  }

  function fail(error) {
    const { code, message } = describe(error);
    log("error", { code, message });
    say(`Error (${code}): ${message}`, true);
  }

  // Resolves to a principal object (accepted) or null (refused).
  async function checkHostKey(keyPair, expected) {
    const fp = await fingerprint(await keyPair.getPublicKeyBytes());
    const algorithm = keyPair.keyAlgorithmName;
    log("hostkey", { fingerprint: fp, algorithm });
    if (expected) {
      if (expected === fp) return { hostKey: fp };
      throw new DemoError(
        "hostkey_mismatch",
        `The server's ${algorithm} host key is ${fp}, not the expected ${expected}: refused.`,
      );
    }
    $("hostkey-text").textContent = `${algorithm} ${fp}`;
    hostKeyBox.hidden = false;
    say("Check the server's host key fingerprint, then accept or refuse it.");
    const accepted = await new Promise((resolve) => {
      $("hostkey-accept").onclick = () => resolve(true);
      $("hostkey-refuse").onclick = () => resolve(false);
    });
    hostKeyBox.hidden = true;
    if (!accepted) throw new DemoError("hostkey_refused", `Host key ${fp} refused.`);
    return { hostKey: fp };
  }

  async function run(values) {
    const port = Number(values.port || 22);
    // The key first: a key that cannot be used needs no tunnel.
    const credentials = { username: values.user };
    if (values.key && values.key.trim()) {
      try {
        credentials.publicKeys = [await importPrivateKey(values.key, values.passphrase)];
      } catch (e) {
        throw new DemoError("bad_key", `The private key could not be read: ${e.message}`);
      }
    } else {
      credentials.password = values.password || "";
    }
    say("Getting a token from TP...");
    const minted = await tp.mintToken();
    // The URL field, else the one TP sends with the token, else this site's.
    const url = values.url || minted.url || `${location.origin}/tp`;
    say(`Connecting to ${url}...`);
    // The whole answer: with it TP.js also passes the hashes of the
    // certificate TP serves on WebTransport, when TP sends them.
    const tpSession = await tp.connect(url, minted);
    active = { tpSession, ssh: null };
    say(`Opening a tunnel to ${values.host}:${port}...`);
    const tunnel = await tpSession.openTCP({ host: values.host, port });

    const ssh = new SshClientSession(sshConfiguration());
    active.ssh = ssh;
    let hostKeyError = null;
    ssh.onAuthenticating((e) => {
      if (e.authenticationType === SshAuthenticationType.serverPublicKey) {
        e.authenticationPromise = checkHostKey(e.publicKey, values.hostkey).catch((error) => {
          hostKeyError = error;
          return null;
        });
      }
    });
    ssh.onClosed((e) => {
      // reason 0 (none): closed here, e.g. disposed after an error.
      log("closed", { reason: e.reason, message: e.reason ? e.message || "" : "" });
      if (active && active.ssh === ssh) {
        say(`SSH session closed${e.message ? ": " + e.message : ""}.`, Boolean(e.error));
      }
    });
    say(`SSH to ${tunnel.address || values.host}...`);
    try {
      await ssh.connect(new TunnelStream(tunnel));
    } catch (e) {
      const hint = /ed25519/i.test(e.message)
        ? " (this browser SSH client has no Ed25519: the server needs an ECDSA or RSA host key)"
        : "";
      throw new DemoError("ssh_failed", `SSH with ${values.host}:${port} failed: ${e.message}${hint}`);
    }
    if (!(await ssh.authenticateServer())) {
      throw hostKeyError || new DemoError("hostkey_refused", "The server's host key was refused.");
    }

    say(`Authenticating as ${values.user}...`);
    if (!(await ssh.authenticateClient(credentials))) {
      throw new DemoError("auth_failed", `The server refused the ${credentials.publicKeys ? "key" : "password"} for ${values.user}.`);
    }
    log("authenticated", { user: values.user });

    const channel = await ssh.openChannel("session");
    channel.onDataReceived((data) => {
      terminal.write(new Uint8Array(data), () => {
        channel.adjustWindow(data.length);
        screen.changed();
      });
    });
    channel.onExtendedDataReceived((e) => {
      terminal.write(new Uint8Array(e.data), () => {
        channel.adjustWindow(e.data.length);
        screen.changed();
      });
    });
    channel.onClosed(() => {
      say("The shell ended.");
      ssh.close(SshDisconnectReason.byApplication, "The shell ended.").catch(() => {});
    });
    if (!(await channel.request(new PtyRequestMessage("xterm-256color", terminal.cols, terminal.rows)))) {
      throw new DemoError("pty_refused", "The server refused a terminal (pty-req).");
    }
    if (!(await channel.request(new ChannelRequestMessage("shell", true)))) {
      throw new DemoError("shell_refused", "The server refused a shell.");
    }
    terminal.onData((text) => channel.send(Buffer.from(text, "utf8")).catch(fail));
    terminal.onBinary((text) => channel.send(Buffer.from(text, "latin1")).catch(fail));
    terminal.onResize(({ cols, rows }) => channel.request(new WindowChangeMessage(cols, rows)).catch(() => {}));
    log("shell", { cols: terminal.cols, rows: terminal.rows });
    say(`Connected to ${values.host}:${port} as ${values.user}.`);
    terminal.focus();
    if (values.run) await channel.send(Buffer.from(values.run + "\r", "utf8"));
  }

  async function connect() {
    const values = {};
    for (const name of FIELDS) values[name] = form.elements[name].value;
    form.elements.connect.disabled = true;
    try {
      await run(values);
    } catch (error) {
      fail(error);
      if (active) {
        if (active.ssh) active.ssh.dispose();
        active.tpSession.close();
        active = null;
      }
      form.elements.connect.disabled = false;
    }
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    connect();
  });
  if (fragment.autoconnect === "1") connect();
}
