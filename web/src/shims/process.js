// Injected by esbuild where code reads the free variable "process":
// dev-tunnels-ssh-keys tests process?.versions?.node at load time (a
// ReferenceError in a browser without this), debug reads process.env,
// randombytes calls process.nextTick. Enough of Node.js's process for those,
// and it says "not Node.js".
export const process = {
  env: {},
  versions: {},
  platform: "browser",
  nextTick(callback, ...args) {
    queueMicrotask(() => callback(...args));
  },
};
