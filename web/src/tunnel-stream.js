// The SSH library's Stream (read/write/close, a "closed" event) on top of a
// TP.js tunnel's WHATWG streams. Reads pull from the ReadableStream only when
// the SSH session asks, so the tunnel's flow control reaches the server.
import { Buffer } from "buffer";
import { BaseStream } from "@microsoft/dev-tunnels-ssh";

export class TunnelStream extends BaseStream {
  constructor(tunnel) {
    super();
    this.tunnel = tunnel;
    this.reader = tunnel.readable.getReader();
    this.writer = tunnel.writable.getWriter();
    this.pending = null; // bytes read from the tunnel but not yet asked for
    this.ended = false;
  }

  async read(count) {
    if (this.disposed) throw new Error("The tunnel stream is closed.");
    if (!this.pending) {
      if (this.ended) return null;
      let result;
      try {
        result = await this.reader.read();
      } catch (e) {
        this.ended = true;
        this.fireOnClose(e instanceof Error ? e : new Error(String(e)));
        throw e;
      }
      if (result.done) {
        this.ended = true;
        this.fireOnClose();
        return null;
      }
      this.pending = Buffer.from(result.value.buffer, result.value.byteOffset, result.value.byteLength);
    }
    const chunk = this.pending;
    if (chunk.length <= count) {
      this.pending = null;
      return chunk;
    }
    this.pending = chunk.subarray(count);
    return chunk.subarray(0, count);
  }

  async write(data) {
    if (this.disposed) throw new Error("The tunnel stream is closed.");
    // Copy: the SSH library reuses its buffers once write() resolves, and a
    // WHATWG writer may still hold the chunk then.
    await this.writer.write(new Uint8Array(data));
  }

  async close(error) {
    if (this.disposed) return;
    this.disposed = true;
    try {
      if (error) {
        await this.writer.abort(error);
        await this.reader.cancel(error);
      } else {
        await this.writer.close();
        await this.reader.cancel();
      }
    } catch (e) {
      // Already closed or errored by the peer: nothing more to release.
    }
    this.tunnel.close();
    this.fireOnClose(error);
  }

  fireOnClose(error) {
    if (this.closeFired) return;
    this.closeFired = true;
    super.fireOnClose(error);
  }

  dispose() {
    if (!this.disposed) {
      this.close().catch(() => {});
    }
    super.dispose();
  }
}
