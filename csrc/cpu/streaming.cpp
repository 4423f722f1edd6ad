// streaming.cpp — the last-level cache size that decides when streaming.h's stores are used.
#include "streaming.h"

#include <unistd.h>

#include <fstream>
#include <string>

namespace sam_fused::cpu {
namespace {

// "32768K" / "32M" -> bytes; 0 if unreadable.
int64_t parse_size(const std::string& text) {
  size_t end = 0;
  int64_t n = 0;
  try {
    n = std::stoll(text, &end);
  } catch (...) {
    return 0;
  }
  const char unit = end < text.size() ? text[end] : ' ';
  return unit == 'K' ? n << 10 : unit == 'M' ? n << 20 : unit == 'G' ? n << 30 : n;
}

// The highest-level cache of CPU 0 as Linux describes it. Preferred to sysconf: in a VM, glibc's sysconf can report
// the host's whole L3 (seen: 320 MB on an AMD EPYC guest whose core complex has 32 MB, the size sysfs gives).
int64_t sysfs_llc_bytes() {
  int best_level = 0;
  int64_t bytes = 0;
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream level_file(dir + "level"), size_file(dir + "size");
    int level = 0;
    std::string size;
    if (!(level_file >> level) || !(size_file >> size)) continue;
    const int64_t b = parse_size(size);
    if (level >= best_level && b > 0) {
      best_level = level;
      bytes = b;
    }
  }
  return bytes;
}

}  // namespace

int64_t llc_bytes() {
  static const int64_t bytes = [] {
    int64_t b = sysfs_llc_bytes();
#if defined(_SC_LEVEL3_CACHE_SIZE)
    if (b <= 0) b = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return b > 0 ? b : int64_t{32} << 20;  // 32 MiB when nothing says
  }();
  return bytes;
}

}  // namespace sam_fused::cpu
