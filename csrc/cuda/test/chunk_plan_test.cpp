// Host test of the chunk planner and of the kernels' chunk walk (chunk_plan.h): every element of
// every non-empty tensor is visited exactly once, wherever empty tensors sit (apex's
// multi_tensor_apply drops the pending work when the last tensor is empty), partial-sum slots
// are unique and dense over a call, waves respect the table capacity and the byte budget, and
// sizes beyond 2^31 elements are handled. Build: c++ -std=c++17 -I csrc/cuda chunk_plan_test.cpp
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "chunk_plan.h"

using fastlars::cuda::advance_slot;
using fastlars::cuda::chunk_count;
using fastlars::cuda::Plan;
using fastlars::cuda::plan_waves;
using fastlars::cuda::slot_begin;
using fastlars::cuda::Wave;

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

// Replays what the kernels do with a plan: each wave becomes a table (prefix sums of chunk
// counts), `grid` blocks stride over its chunks, each locating its slot with advance_slot. Checks
// that the visited element ranges tile every tensor exactly once and that the call-wide chunk ids
// are 0..total-1, each once.
void check_plan(const std::vector<int64_t>& numel, int64_t capacity, int64_t chunk, int64_t bytes_per_elem,
                int64_t wave_bytes, int grid, const std::string& name) {
  const Plan plan = plan_waves(numel, capacity, chunk, bytes_per_elem, wave_bytes);
  std::vector<int64_t> covered(numel.size(), 0);     // elements visited per tensor
  std::vector<int> chunk_seen(static_cast<size_t>(plan.total_chunks), 0);
  int64_t expected_first = 0;
  int64_t expected_chunk = 0;
  for (const Wave& w : plan.waves) {
    expect(w.count >= 1 && w.count <= capacity, name + ": wave size within capacity");
    expect(w.first == expected_first, name + ": waves are consecutive");
    expect(w.first_chunk == expected_chunk, name + ": chunk ids continue across waves");
    std::vector<int64_t> chunk_end(static_cast<size_t>(w.count));
    int64_t end = 0;
    int64_t load = 0;
    for (int64_t s = 0; s < w.count; ++s) {
      const int64_t n = numel[plan.tensors[w.first + s]];
      end += chunk_count(n, chunk);
      chunk_end[s] = end;
      load += n * bytes_per_elem;
    }
    expect(end == w.chunks, name + ": wave chunk count is the sum over its tensors");
    if (wave_bytes > 0 && w.count > 1) {
      const int64_t last = numel[plan.tensors[w.first + w.count - 1]] * bytes_per_elem;
      expect(load - last < wave_bytes, name + ": a wave closes once it reaches the byte budget");
    }
    for (int b = 0; b < grid; ++b) {
      int slot = 0;
      for (int64_t c = b; c < w.chunks; c += grid) {
        slot = advance_slot(chunk_end.data(), static_cast<int>(w.count), slot, c);
        const int64_t t = plan.tensors[w.first + slot];
        const int64_t begin = (c - slot_begin(chunk_end.data(), slot)) * chunk;
        const int64_t n = numel[t] - begin < chunk ? numel[t] - begin : chunk;
        expect(begin >= 0 && n > 0 && begin + n <= numel[t], name + ": chunk inside its tensor");
        covered[t] += n;
        chunk_seen[w.first_chunk + c] += 1;
      }
    }
    expected_first += w.count;
    expected_chunk += w.chunks;
  }
  expect(expected_first == static_cast<int64_t>(plan.tensors.size()), name + ": every planned tensor is in a wave");
  for (size_t i = 0; i < numel.size(); ++i) {
    expect(covered[i] == (numel[i] > 0 ? numel[i] : 0), name + ": tensor " + std::to_string(i) + " visited exactly");
  }
  for (int seen : chunk_seen) expect(seen == 1, name + ": every chunk id used once");
}

}  // namespace

int main() {
  const int64_t chunk = 16;
  // Empty tensors first, in the middle, last, and after a full table.
  check_plan({0, 0, 5, 40}, 4, chunk, 4, 0, 3, "leading empties");
  check_plan({5, 0, 0, 40, 0, 17}, 4, chunk, 4, 0, 2, "middle empties");
  check_plan({5, 40, 0}, 4, chunk, 4, 0, 3, "last empty");
  check_plan({5, 40, 3, 0}, 3, chunk, 4, 0, 1, "last empty after a full table");
  check_plan({5, 40, 3, 1, 0, 0, 0}, 2, chunk, 4, 0, 5, "trailing empties after full tables");
  check_plan({0, 0, 0}, 4, chunk, 4, 0, 3, "all empty");
  check_plan({}, 4, chunk, 4, 0, 3, "no tensors");
  {
    const Plan p = plan_waves({0, 0, 0}, 4, chunk, 4, 0);
    expect(p.waves.empty() && p.total_chunks == 0, "all empty: no launch");
    const Plan q = plan_waves({5, 40, 3, 0}, 3, chunk, 4, 0);
    expect(q.waves.size() == 1 && q.waves[0].count == 3, "last empty after a full table: one wave");
  }
  // More tensors than one table holds.
  std::vector<int64_t> many(1000, 33);
  check_plan(many, 545, chunk, 4, 0, 7, "more tensors than one table");
  expect(plan_waves(many, 545, chunk, 4, 0).waves.size() == 2, "1000 tensors in tables of 545: two launches");
  // Byte budget: a tensor larger than the budget forms its own wave.
  check_plan({10, 10, 100, 10, 10, 10}, 100, chunk, 4, 80, 4, "budget");
  {
    const Plan p = plan_waves({10, 10, 100, 10, 10, 10}, 100, chunk, 4, 80);
    expect(p.waves.size() == 4 && p.waves[1].count == 1,
           "budget: waves {10,10} {100} {10,10} {10}: a wave closes when its load reaches 80 B");
  }
  // Beyond 2^31 elements (replayed over chunk ranges, not element by element).
  {
    const int64_t big = (int64_t{1} << 31) + 12345;
    const int64_t big_chunk = 16384;
    const Plan p = plan_waves({7, big, 0, 3}, 545, big_chunk, 4, 0);
    expect(p.total_chunks == 1 + chunk_count(big, big_chunk) + 1, "2^31+: chunk count is 64-bit");
    const Wave& w = p.waves.at(0);
    std::vector<int64_t> chunk_end = {1, 1 + chunk_count(big, big_chunk), 2 + chunk_count(big, big_chunk)};
    int slot = advance_slot(chunk_end.data(), 3, 0, chunk_end[1] - 1);
    const int64_t begin = (chunk_end[1] - 1 - slot_begin(chunk_end.data(), slot)) * big_chunk;
    expect(slot == 1 && begin == (int64_t{1} << 31) && big - begin == 12345,
           "2^31+: the big tensor's last chunk starts at element 2^31 and holds the 12345 left over");
    expect(w.count == 3, "2^31+: the empty tensor is skipped");
  }
  // Randomised lists.
  std::mt19937_64 rng(1234);
  for (int trial = 0; trial < 300; ++trial) {
    const int n = static_cast<int>(rng() % 40);
    std::vector<int64_t> sizes;
    for (int i = 0; i < n; ++i) sizes.push_back(rng() % 3 == 0 ? 0 : static_cast<int64_t>(rng() % 200));
    const int64_t capacity = 1 + static_cast<int64_t>(rng() % 8);
    const int64_t budget = rng() % 2 == 0 ? 0 : static_cast<int64_t>(rng() % 2000);
    check_plan(sizes, capacity, chunk, 4, budget, 1 + static_cast<int>(rng() % 9), "random " + std::to_string(trial));
  }
  if (failures != 0) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("chunk plan: all checks passed\n");
  return 0;
}
