// Injected by esbuild into every module that reads the free variable
// "Buffer": dev-tunnels-ssh (sshChannel, authenticationService) and
// diffie-hellman use Node.js's global Buffer without requiring it.
export { Buffer } from "buffer";
