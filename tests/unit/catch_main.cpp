// The one translation unit that compiles Catch2's main (Catch2 v2 is a single heavy header).
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
