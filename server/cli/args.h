#pragma once
// A small command-line parser for the subcommands: `--name value`, `--name=value`, boolean
// `--flag`, repeatable options. Unknown or malformed options are InvalidArgument errors naming
// the option.
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace pmkv::cli {

class Args {
 public:
  struct Spec {
    std::set<std::string> flags;       // options without a value
    std::set<std::string> values;      // options with one value
    std::set<std::string> repeatable;  // options with a value, given any number of times
  };
  Args(const std::vector<std::string>& argv, const Spec& spec);

  bool flag(const std::string& name) const { return flags_.contains(name); }
  std::optional<std::string> get(const std::string& name) const;
  std::vector<std::string> all(const std::string& name) const;
  std::string require(const std::string& name) const;
  std::optional<int64_t> get_int(const std::string& name) const;
  std::optional<double> get_double(const std::string& name) const;

 private:
  std::set<std::string> flags_;
  std::map<std::string, std::vector<std::string>> values_;
};

// "1,2,3" -> {1, 2, 3}; InvalidArgument naming `what` on anything else.
std::vector<int32_t> parse_id_list(const std::string& s, const std::string& what);

}  // namespace pmkv::cli
