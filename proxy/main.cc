#include "proxy/proxy_main.h"

int main(int argc, char** argv) { return kiln::RunKilnProxy(argc, argv); }
