// Rule 13's lookup table (CompTable in program_row.h): built on the host once per format and
// kept for the rest of the process, shared by every program_layer and compensate call.
#pragma once

#include <memory>
#include <vector>

#include "../program_row.h"

namespace crossbar_torch {

struct CompTableHolder {
  std::vector<int32_t> start;
  std::vector<uint32_t> cand;
  CompTable view;  // points into the vectors above
};

// The table of format f (f.L: the compensated slices), or null where the search must run
// directly: d(x) is not linear (two's complement with no high slice), the table would take
// more than a few milliseconds to build, or the environment variable
// CROSSBAR_TORCH_COMPENSATION_TABLE is "0" (read on every call; the tests use it to compare the
// two paths).
std::shared_ptr<const CompTableHolder> comp_table_for(const CompFormat& f);

}  // namespace crossbar_torch
