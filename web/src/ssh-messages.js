// The two channel requests of an interactive terminal (RFC 4254 6.2, 6.7),
// which @microsoft/dev-tunnels-ssh does not define itself.
import { Buffer } from "buffer";
import { ChannelRequestMessage } from "@microsoft/dev-tunnels-ssh";

// TTY_OP_END alone: no terminal modes, the server keeps its defaults.
const NO_MODES = Buffer.from([0]);

export class PtyRequestMessage extends ChannelRequestMessage {
  constructor(term, cols, rows) {
    super("pty-req", true);
    this.term = term;
    this.cols = cols;
    this.rows = rows;
  }

  onWrite(writer) {
    super.onWrite(writer);
    writer.writeString(this.term, "ascii");
    writer.writeUInt32(this.cols);
    writer.writeUInt32(this.rows);
    writer.writeUInt32(0); // width in pixels: unknown
    writer.writeUInt32(0); // height in pixels: unknown
    writer.writeBinary(NO_MODES);
  }
}

export class WindowChangeMessage extends ChannelRequestMessage {
  constructor(cols, rows) {
    super("window-change", false);
    this.cols = cols;
    this.rows = rows;
  }

  onWrite(writer) {
    super.onWrite(writer);
    writer.writeUInt32(this.cols);
    writer.writeUInt32(this.rows);
    writer.writeUInt32(0);
    writer.writeUInt32(0);
  }
}
