// Private keys for user authentication, pasted into the page. PEM formats
// (PKCS#1 "RSA PRIVATE KEY", SEC1 "EC PRIVATE KEY", PKCS#8 "PRIVATE KEY" and
// "ENCRYPTED PRIVATE KEY") go to @microsoft/dev-tunnels-ssh-keys; OpenSSH's
// own format ("OPENSSH PRIVATE KEY", ssh-keygen's default), which that
// library does not read, is parsed here when it is not passphrase-protected.
import { Buffer } from "buffer";
import { BigInt as SshBigInt, SshAlgorithms, SshDataReader } from "@microsoft/dev-tunnels-ssh";
import { importKey } from "@microsoft/dev-tunnels-ssh-keys";

const OPENSSH_BEGIN = "-----BEGIN OPENSSH PRIVATE KEY-----";
const OPENSSH_END = "-----END OPENSSH PRIVATE KEY-----";
const MAGIC = Buffer.from("openssh-key-v1\0", "latin1");

const EC_ALGORITHMS = {
  "ecdsa-sha2-nistp256": SshAlgorithms.publicKey.ecdsaSha2Nistp256,
  "ecdsa-sha2-nistp384": SshAlgorithms.publicKey.ecdsaSha2Nistp384,
  "ecdsa-sha2-nistp521": SshAlgorithms.publicKey.ecdsaSha2Nistp521,
};

export async function importPrivateKey(text, passphrase) {
  const trimmed = text.trim();
  if (trimmed.startsWith(OPENSSH_BEGIN)) {
    return importOpenSSHKey(trimmed);
  }
  return importKey(trimmed, passphrase || null);
}

function unsigned(bytes) {
  return SshBigInt.fromBytes(bytes, { unsigned: true });
}

function toNative(bytes) {
  return bytes.length ? globalThis.BigInt("0x" + bytes.toString("hex")) : 0n;
}

function fromNative(n) {
  let hex = n.toString(16);
  if (hex.length % 2) hex = "0" + hex;
  return unsigned(Buffer.from(hex, "hex"));
}

async function importOpenSSHKey(text) {
  const end = text.indexOf(OPENSSH_END);
  if (end < 0) throw new Error("The OpenSSH private key has no END line.");
  const body = Buffer.from(text.slice(OPENSSH_BEGIN.length, end).replace(/\s+/g, ""), "base64");
  if (!body.subarray(0, MAGIC.length).equals(MAGIC)) {
    throw new Error("Not an OpenSSH private key (bad magic).");
  }
  const reader = new SshDataReader(body.subarray(MAGIC.length));
  const cipher = reader.readString("ascii");
  reader.readString("ascii"); // kdf name
  reader.readBinary(); // kdf options
  if (cipher !== "none") {
    throw new Error(
      "Passphrase-protected OpenSSH keys are not supported here: " +
        "convert with ssh-keygen -p -m PKCS8 -f KEYFILE (PKCS#8 keeps the passphrase).",
    );
  }
  if (reader.readUInt32() !== 1) throw new Error("An OpenSSH key file with more than one key.");
  reader.readBinary(); // public key, repeated in the private section
  const priv = new SshDataReader(reader.readBinary());
  if (priv.readUInt32() !== priv.readUInt32()) throw new Error("The OpenSSH private key is corrupt.");
  const type = priv.readString("ascii");
  let keyPair;
  if (EC_ALGORITHMS[type]) {
    const curveName = priv.readString("ascii");
    const point = priv.readBinary();
    const d = priv.readBinary();
    if (point[0] !== 4) throw new Error("Compressed EC points are not supported.");
    const size = (point.length - 1) / 2;
    keyPair = EC_ALGORITHMS[type].createKeyPair();
    await keyPair.importParameters({
      curve: { name: curveName },
      x: unsigned(point.subarray(1, 1 + size)),
      y: unsigned(point.subarray(1 + size)),
      d: unsigned(d),
    });
  } else if (type === "ssh-rsa") {
    const n = priv.readBinary();
    const e = priv.readBinary();
    const d = priv.readBinary();
    const iqmp = priv.readBinary();
    const p = priv.readBinary();
    const q = priv.readBinary();
    const dn = toNative(d);
    keyPair = SshAlgorithms.publicKey.rsaWithSha512.createKeyPair();
    await keyPair.importParameters({
      modulus: unsigned(n),
      exponent: unsigned(e),
      d: unsigned(d),
      p: unsigned(p),
      q: unsigned(q),
      dp: fromNative(dn % (toNative(p) - 1n)),
      dq: fromNative(dn % (toNative(q) - 1n)),
      qi: unsigned(iqmp),
    });
  } else {
    throw new Error(
      `OpenSSH key type ${type} is not supported in the browser (use ECDSA or RSA keys).`,
    );
  }
  keyPair.comment = priv.readString("utf8") || null;
  return keyPair;
}
