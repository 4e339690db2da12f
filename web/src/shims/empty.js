// Stands in for Node.js built-ins (crypto, fs, net, os, path) that the SSH
// library and vscode-jsonrpc require at load time but only call on Node.js:
// in a browser the library takes its WebCrypto branch, and the demo uses no
// pipes, sockets or key files.
export default {};
