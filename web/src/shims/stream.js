// Stands in for Node.js's "stream" module. @microsoft/dev-tunnels-ssh's
// SshStream and SecureStream subclass Duplex at load time; the demo uses
// neither (it reads and writes SshChannel directly and adapts WHATWG streams
// itself in tunnel-stream.js), so constructing one is an error rather than a
// half-working polyfill.
class NotInThisBundle {
  constructor() {
    throw new Error("Node.js streams are not included in this bundle");
  }
}
export class Stream extends NotInThisBundle {}
export class Readable extends NotInThisBundle {}
export class Writable extends NotInThisBundle {}
export class Duplex extends NotInThisBundle {}
export class Transform extends NotInThisBundle {}
export default { Stream, Readable, Writable, Duplex, Transform };
