#include "engine/backend/penalty_history.h"

#include <catch2/catch.hpp>

#include <map>
#include <random>
#include <tuple>
#include <vector>

#include "engine/common/error.h"

using namespace pmkv;

namespace {

// id -> (output count, in prompt): the plain definition the CSR must equal, row by row.
using Reference = std::map<int32_t, std::pair<int32_t, uint8_t>>;

Reference reference(const std::vector<int32_t>& output, const std::vector<int32_t>& prompt) {
  Reference r;
  for (int32_t id : output)
    ++r[id].first;
  for (int32_t id : prompt)
    r[id].second = 1;
  return r;
}

Reference row_of(const PenaltyHistory& h, size_t row) {
  Reference r;
  for (int32_t j = h.starts()[row]; j < h.starts()[row + 1]; ++j) {
    const bool fresh =
        r.emplace(h.ids()[j], std::pair{h.output_counts()[j], h.in_prompt()[j]}).second;
    CHECK(fresh);  // distinct ids within a row
  }
  return r;
}

}  // namespace

TEST_CASE("penalty history: distinct ids with output counts and prompt flags, row by row",
          "[backend][sampling]") {
  std::mt19937 rng(1234);
  PenaltyHistory h;
  for (const int32_t vocab : {1, 7, 50, 5000}) {
    h.reset(vocab);
    std::vector<Reference> want;
    for (int row = 0; row < 40; ++row) {
      std::vector<int32_t> output(rng() % 60), prompt(row % 3 == 0 ? 0 : rng() % 80);
      // Small id ranges repeat ids within and across output and prompt.
      const int32_t span = row % 2 ? vocab : std::min<int32_t>(vocab, 9);
      for (auto& t : output)
        t = static_cast<int32_t>(rng() % span);
      for (auto& t : prompt)
        t = static_cast<int32_t>(rng() % span);
      h.add_row(output, prompt);
      want.push_back(reference(output, prompt));
    }
    REQUIRE(h.starts().size() == want.size() + 1);
    for (size_t r = 0; r < want.size(); ++r) {
      INFO("vocab " << vocab << " row " << r);
      CHECK(row_of(h, r) == want[r]);
    }
  }
}

TEST_CASE("penalty history: an id outside the vocabulary is refused and leaves no trace",
          "[backend][sampling]") {
  PenaltyHistory h;
  h.reset(10);
  h.add_row(std::vector<int32_t>{1, 2, 2}, std::vector<int32_t>{3});
  CHECK_THROWS_AS(h.add_row(std::vector<int32_t>{4, 4, 10}, {}), InvalidArgument);
  CHECK_THROWS_AS(h.add_row(std::vector<int32_t>{5}, std::vector<int32_t>{6, -1}), InvalidArgument);
  CHECK(h.starts().size() == 2);  // the refused rows were not added
  // The scratch is clean: the ids the refused rows touched count from zero again.
  h.add_row(std::vector<int32_t>{4, 5}, std::vector<int32_t>{6});
  CHECK(row_of(h, 1) == Reference{{4, {1, 0}}, {5, {1, 0}}, {6, {0, 1}}});
  CHECK(row_of(h, 0) == Reference{{1, {1, 0}}, {2, {2, 0}}, {3, {0, 1}}});
}
