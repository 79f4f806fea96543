#pragma once

namespace kiln {

// kiln-proxy: serves the stable addresses of the services with `expose:` (the data plane, a
// Proxy on one io thread), fed by kilnd's WatchEndpoints stream (--kilnd), by the last snapshot
// it kept (--endpoints-file), or both. Returns the process exit code: 0 after SIGTERM or SIGINT,
// 1 when it cannot start, 2 for bad flags.
int RunKilnProxy(int argc, char** argv);

}  // namespace kiln
