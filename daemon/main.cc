#include "daemon/daemon.h"

int main(int argc, char** argv) { return kiln::RunDaemon(argc, argv); }
