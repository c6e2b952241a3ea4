#pragma once
// Errors that cross a boundary (file loading, configuration, user input) are exceptions of these
// types; their message names the file, key or tensor involved so the user can act on it.
#include <stdexcept>
#include <string>

namespace pmkv {

// Base of every pmkv error.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A model directory, weight file or tokenizer that cannot be used as is.
class LoadError : public Error {
 public:
  using Error::Error;
};

// Bad user input: a request parameter, a CLI flag, a config value.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

}  // namespace pmkv
