// tp.js: a browser as a TP client, over WebTransport (docs/webtransport.md).
//
//   import { mintToken, connect, TPError } from "/tp/tp.js";
//   const minted = await mintToken();                 // POST /tp/token: needs the client certificate (TLS)
//   const tp = await connect(minted.url, minted);     // one WebTransport session, one identity
//   const tunnel = await tp.openTCP({ host: "10.0.0.5", port: 22 });
//   tunnel.readable / tunnel.writable                 // WHATWG streams of Uint8Array
//   const flow = await tp.openUDP({ host: "10.0.0.53", port: 53 });
//   await flow.send(packet); for await (const p of flow.packets) ...
//
// Every failure is a TPError whose .code is a stable code: the wire
// protocol's (forbidden, connect_refused, limit_exceeded, ...; docs/protocol.md)
// or one of tp.js's own: session_refused, session_closed, protocol_error,
// token_refused.  No dependencies; an ES module.

const MAX_FRAME = 16 * 1024;
// Larger UDP packets go on the flow's stream, as TP's own client does.
const MAX_DATAGRAM_PAYLOAD = 1100;

export class TPError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.name = "TPError";
    this.code = code;
    this.detail = message;
  }
}

function frame(object) {
  const payload = new TextEncoder().encode(JSON.stringify(object));
  if (payload.length > MAX_FRAME) throw new TPError("bad_request", "hello too large");
  const out = new Uint8Array(4 + payload.length);
  new DataView(out.buffer).setUint32(0, payload.length);
  out.set(payload, 4);
  return out;
}

function concat(a, b) {
  if (a.length === 0) return b;
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

// QUIC variable-length integers (RFC 9000 section 16): flow ids in datagrams.
export function encodeVarint(n) {
  if (n < 0x40) return Uint8Array.of(n);
  if (n < 0x4000) return Uint8Array.of(0x40 | (n >> 8), n & 0xff);
  if (n < 0x40000000) {
    const out = new Uint8Array(4);
    new DataView(out.buffer).setUint32(0, (0x80000000 | n) >>> 0);
    return out;
  }
  throw new RangeError("flow id too large");
}

export function decodeVarint(bytes) {
  if (bytes.length === 0) return null;
  const length = 1 << (bytes[0] >> 6);
  if (bytes.length < length) return null;
  let value = bytes[0] & 0x3f;
  for (let i = 1; i < length; i++) value = value * 256 + bytes[i];
  return { value, length };
}

// Read one frame (the ServerHello) from a stream reader; returns the
// parsed object and the bytes that came after it.
async function readFrame(reader) {
  let buffer = new Uint8Array(0);
  for (;;) {
    if (buffer.length >= 4) {
      const size = new DataView(buffer.buffer, buffer.byteOffset).getUint32(0);
      if (size < 1 || size > MAX_FRAME) throw new TPError("protocol_error", `frame of ${size} bytes`);
      if (buffer.length >= 4 + size) {
        const text = new TextDecoder().decode(buffer.subarray(4, 4 + size));
        let object;
        try {
          object = JSON.parse(text);
        } catch (e) {
          throw new TPError("protocol_error", "the ServerHello is not JSON");
        }
        return { object, rest: buffer.subarray(4 + size) };
      }
    }
    const { value, done } = await reader.read();
    if (done) throw new TPError("protocol_error", "TP closed the stream before its ServerHello");
    buffer = concat(buffer, value);
  }
}

// A ReadableStream of what follows the hello: first `rest`, then the reader.
function after(rest, reader) {
  return new ReadableStream({
    start(controller) {
      if (rest.length) controller.enqueue(rest);
    },
    async pull(controller) {
      const { value, done } = await reader.read();
      if (done) controller.close();
      else controller.enqueue(value);
    },
    cancel(reason) {
      return reader.cancel(reason);
    },
  });
}

async function hello(stream, request) {
  const writer = stream.writable.getWriter();
  await writer.write(frame({ v: 1, ...request }));
  writer.releaseLock();
  const reader = stream.readable.getReader();
  let answer;
  try {
    answer = await readFrame(reader);
  } catch (e) {
    throw e instanceof TPError ? e : new TPError("session_closed", String(e && e.message || e));
  }
  const serverHello = answer.object;
  if (!serverHello.ok) throw new TPError(serverHello.error || "protocol_error", serverHello.message || "refused");
  return { serverHello, reader, rest: answer.rest };
}

export class TPSession {
  constructor(transport) {
    this.transport = transport;
    this.flows = new Map();
    this.closed = transport.closed.then(
      (info) => info,
      (e) => ({ closeCode: 0, reason: String(e && e.message || e) }),
    );
    this._datagrams = null;
  }

  // A TCP tunnel to host:port: { readable, writable, address, close() }.
  async openTCP({ host, port }) {
    const stream = await this._stream();
    const { serverHello, reader, rest } = await hello(stream, { op: "connect", host, port, transport: "tcp" });
    const readable = after(rest, reader);
    return {
      readable,
      writable: stream.writable,
      address: serverHello.address,
      close: async () => {
        try { await stream.writable.close(); } catch (e) {}
        try { await readable.cancel(); } catch (e) {}
      },
    };
  }

  // A UDP flow to host:port: { send(packet), packets (ReadableStream of
  // Uint8Array), address, close() }.
  async openUDP({ host, port }) {
    const stream = await this._stream();
    const { serverHello, reader, rest } = await hello(stream, { op: "udp", host, port });
    const flowId = serverHello.flow;
    let push;
    const packets = new ReadableStream({ start(controller) { push = controller; } });
    const deliver = (p) => { try { push.enqueue(p); } catch (e) {} };
    // Packets too large for a datagram come on the stream, each after its
    // length (2 bytes, big-endian).
    (async () => {
      let buffer = rest;
      for (;;) {
        while (buffer.length >= 2) {
          const size = (buffer[0] << 8) | buffer[1];
          if (buffer.length < 2 + size) break;
          deliver(buffer.slice(2, 2 + size));
          buffer = buffer.subarray(2 + size);
        }
        let chunk;
        try { chunk = await reader.read(); } catch (e) { break; }
        if (chunk.done) break;
        buffer = concat(buffer, chunk.value);
      }
      this.flows.delete(flowId);
      try { push.close(); } catch (e) {}
    })();
    const prefix = flowId === null || flowId === undefined ? null : encodeVarint(flowId);
    if (prefix !== null) {
      this.flows.set(flowId, deliver);
      this._readDatagrams();
    }
    const writer = stream.writable.getWriter();
    const limit = Math.min(MAX_DATAGRAM_PAYLOAD, (this.transport.datagrams.maxDatagramSize || 1200) - 8);
    return {
      address: serverHello.address,
      flow: flowId,
      packets,
      send: async (packet) => {
        packet = packet instanceof Uint8Array ? packet : new Uint8Array(packet);
        if (prefix !== null && packet.length <= limit) {
          await this._datagramWriter().write(concat(prefix, packet));
        } else {
          const framed = new Uint8Array(2 + packet.length);
          framed[0] = packet.length >> 8;
          framed[1] = packet.length & 0xff;
          framed.set(packet, 2);
          await writer.write(framed);
        }
      },
      close: async () => {
        this.flows.delete(flowId);
        try { await writer.close(); } catch (e) {}
      },
    };
  }

  close() {
    this.transport.close();
  }

  async _stream() {
    try {
      return await this.transport.createBidirectionalStream();
    } catch (e) {
      throw new TPError("session_closed", String(e && e.message || e));
    }
  }

  _datagramWriter() {
    if (!this._writer) this._writer = this.transport.datagrams.writable.getWriter();
    return this._writer;
  }

  _readDatagrams() {
    if (this._datagrams) return;
    this._datagrams = (async () => {
      const reader = this.transport.datagrams.readable.getReader();
      for (;;) {
        let chunk;
        try { chunk = await reader.read(); } catch (e) { return; }
        if (chunk.done) return;
        const id = decodeVarint(chunk.value);
        if (id === null) continue;
        const deliver = this.flows.get(id.value);
        if (deliver) deliver(chunk.value.slice(id.length));
      }
    })();
  }
}

// A token for a WebTransport session: POST to TP's token endpoint, which
// the browser reaches with its client certificate (TLS).  `endpoint`
// defaults to this page's TP (a page served by TP itself).
export async function mintToken(endpoint = new URL("token", import.meta.url).href) {
  let response;
  try {
    response = await fetch(endpoint, { method: "POST", credentials: "include", cache: "no-store" });
  } catch (e) {
    throw new TPError("token_refused", `no answer from ${endpoint}: ${e && e.message || e} (is the client certificate installed?)`);
  }
  let body = {};
  try { body = await response.json(); } catch (e) {}
  if (!response.ok) throw new TPError(body.error || "token_refused", body.message || `HTTP ${response.status}`);
  return body;
}

function bytesOf(value) {
  if (typeof value !== "string") return value;
  return Uint8Array.from(atob(value), (c) => c.charCodeAt(0));
}

// One WebTransport session to TP at `url` (https://HOST:PORT/tp) with
// `token`: the string, or what mintToken() returned (then the hashes of the
// certificate TP serves on WebTransport come with it, so the browser needs
// no trust in TP's CA on QUIC).  `options` go to the WebTransport
// constructor; serverCertificateHashes values may be base64 strings.
export async function connect(url, token, options = {}) {
  options = { ...options };
  if (token && typeof token === "object") {
    if (token.serverCertificateHashes && token.serverCertificateHashes.length && !options.serverCertificateHashes) {
      options.serverCertificateHashes = token.serverCertificateHashes;
    }
    token = token.token;
  }
  if (options.serverCertificateHashes) {
    options.serverCertificateHashes = options.serverCertificateHashes.map((h) => ({ algorithm: h.algorithm, value: bytesOf(h.value) }));
  }
  const target = new URL(url);
  target.searchParams.set("token", token);
  let transport;
  try {
    transport = new WebTransport(target.href, options);
    await transport.ready;
  } catch (e) {
    // The browser does not say why (the status of a refused CONNECT is not
    // exposed to pages): TP's log does.
    throw new TPError("session_refused", `TP refused the WebTransport session or could not be reached: ${e && e.message || e}`);
  }
  return new TPSession(transport);
}
