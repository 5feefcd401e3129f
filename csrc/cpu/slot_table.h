// The packed storage of cells (crossbar_torch/packing.py) read back on the host: a byte's
// 8 / s slots, one a byte, by table. unpack_levels unpacks whole layers with it;
// feedback_quantize one filter's weights at a time, straight from a layer's packed buffers.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>

namespace crossbar_torch {

// byte -> its 8 / s slots, one a byte (little end first), for slot widths 1, 2, 4
struct SlotTable {
  std::array<std::array<uint8_t, 8>, 256> cells{};
  explicit SlotTable(int s) {
    const int per = 8 / s, top = (1 << s) - 1;
    for (int v = 0; v < 256; ++v) {
      for (int i = 0; i < per; ++i) cells[size_t(v)][size_t(i)] = uint8_t((v >> (i * s)) & top);
    }
  }
};

// The table of slot width s (1, 2 or 4).
inline const SlotTable& slot_table(int s) {
  static const SlotTable tables[3] = {SlotTable(1), SlotTable(2), SlotTable(4)};
  return tables[s == 1 ? 0 : s == 2 ? 1 : 2];
}

// One weight's `cells` levels from its packed bytes `src` (width ceil(cells / (8 / s))) into
// dst[0 .. cells); s == 8 copies the bytes.
inline void unpack_slots(const uint8_t* src, int64_t cells, int s, uint8_t* dst) {
  if (s == 8) {
    std::memcpy(dst, src, size_t(cells));
    return;
  }
  const SlotTable& t = slot_table(s);
  const int64_t per = 8 / s, full = cells / per, rest = cells % per;
  for (int64_t j = 0; j < full; ++j) std::memcpy(dst + j * per, t.cells[src[j]].data(), per);
  if (rest) std::memcpy(dst + full * per, t.cells[src[full]].data(), rest);
}

}  // namespace crossbar_torch
