#pragma once

namespace kiln {

// kilnd's whole main: parses flags, runs until SIGTERM/SIGINT, returns the exit code
// (0 on a clean stop, 1 on a start-up error, 2 on bad usage).
int RunDaemon(int argc, char** argv);

}  // namespace kiln
