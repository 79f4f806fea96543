#pragma once

#include <iosfwd>

namespace kiln {

// kilnctl's whole main, writing to the given streams. Exit codes: 0 success, 1 the operation
// failed (invalid manifests, daemon error), 2 bad usage.
int RunKilnctl(int argc, char** argv, std::ostream& out, std::ostream& err);

}  // namespace kiln
