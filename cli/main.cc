#include <iostream>

#include "cli/kilnctl.h"

int main(int argc, char** argv) { return kiln::RunKilnctl(argc, argv, std::cout, std::cerr); }
