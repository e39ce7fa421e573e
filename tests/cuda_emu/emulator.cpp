// A small CUDA emulator for the tests: it runs CUDA kernels compiled as C++ (include/cuda_emu.h) on the CPU, a fiber
// per CUDA thread. Test infrastructure: never part of the package, never reported as a GPU result.
//
// Model. Blocks run one after another on the calling thread. The threads of a block are fibers with stacks of their
// own, run until they finish or wait at a barrier (__syncthreads*) or a warp collective (__shfl*_sync, __syncwarp,
// __ballot/any/all_sync); the last thread to arrive completes it and wakes the others (independent thread
// scheduling, as on Volta and later: nothing assumes warps run in lockstep). Warps are 32 consecutive linear thread
// ids of a block.
//
// What it refuses, each with a message naming the source line:
// - launches the CUDA runtime refuses (grid x in [1, 2^31-1], y and z in [1, 65535], block dims x, y <= 1024,
//   z <= 64, at most 1024 threads, dynamic shared memory <= 48 KiB): the kernel does not run and
//   C10_CUDA_KERNEL_LAUNCH_CHECK() throws "CUDA error: invalid configuration argument", as on a GPU;
// - what CUDA does silently or leaves undefined: a grid or block size that does not fit 32 bits (dim3 narrows it), a
//   launch with no CUDAGuard alive, on another stream than the current one, or not followed by the launch check
//   before the next launch or the end of the op; a __syncthreads reached by only part of the block (others exited or
//   wait at another __syncthreads); a warp collective whose mask leaves out the calling lane, names lanes that do
//   not exist or have exited, disagrees with the mask, op or width of lanes it would meet, or reads a lane outside
//   its mask; threads left waiting when nothing can run (deadlock).
// What it cannot show: speed, data races (threads interleave only at barriers and collectives), fast-math
// numerics (the host's exact sqrt and division run), memory errors outside what AddressSanitizer and
// UndefinedBehaviorSanitizer see in the sanitized build.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <deque>
#include <sstream>
#include <string>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/library.h>

#include "cuda_emu.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMU_ASAN 1
#endif

#if !defined(__x86_64__)
#define CUDA_EMU_UCONTEXT 1
#endif
#ifdef CUDA_EMU_UCONTEXT
#include <ucontext.h>
#endif

dim3 threadIdx, blockIdx, blockDim, gridDim;

struct CUstream_st {
  const char* name;
};

// ---- context switch: callee-saved registers and the stack pointer (x86-64 System V), else ucontext ----------
#ifndef CUDA_EMU_UCONTEXT
extern "C" void cuda_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl cuda_emu_switch
  .hidden cuda_emu_switch
  .type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch
)");
#endif

namespace cuda_emu {
namespace {

constexpr size_t kStackBytes = size_t(256) << 10;  // per CUDA thread; stacks are reused from block to block
constexpr unsigned kMaxThreads = 1024;

struct Context {
#ifdef CUDA_EMU_UCONTEXT
  ucontext_t uc;
#else
  void* sp = nullptr;
#endif
};

void switch_context(Context& from, Context& to) {
#ifdef CUDA_EMU_UCONTEXT
  swapcontext(&from.uc, &to.uc);
#else
  cuda_emu_switch(&from.sp, to.sp);
#endif
}

void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
#ifdef CUDA_EMU_UCONTEXT
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
#else
  // the first switch pops six zero registers and "returns" into entry with the stack aligned as after a call
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                            // entry's return address: entry never returns
  *--sp = reinterpret_cast<void*>(entry);     // where the switch's ret goes
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
  c.sp = sp;
#endif
}

enum class State : uint8_t { Ready, Waiting, Done };

struct Thread {
  Context ctx;
  dim3 idx;
  unsigned linear = 0;
  State state = State::Ready;
  uint64_t value = 0;  // operand of the collective it waits in, then the result
  int arg = 0;         // source lane, delta or lane mask of a shuffle; the predicate of a vote or counting barrier
#ifdef CUDA_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

struct Collective {  // a warp collective that some lanes of a warp wait in
  Op op;
  unsigned mask, width, arrived;
  const char* file;
  int line;
};

struct Warp {
  unsigned exists = 0, exited = 0;
  std::vector<Collective> pending;
};

struct Barrier {
  unsigned arrived = 0;
  Bar kind = Bar::Sync;
  const char* file = nullptr;
  int line = 0;
};

const char* op_name(Op op) {
  switch (op) {
    case Op::SyncWarp: return "__syncwarp";
    case Op::ShflIdx: return "__shfl_sync";
    case Op::ShflUp: return "__shfl_up_sync";
    case Op::ShflDown: return "__shfl_down_sync";
    case Op::ShflXor: return "__shfl_xor_sync";
    case Op::Ballot: return "__ballot_sync";
    case Op::Any: return "__any_sync";
    case Op::All: return "__all_sync";
  }
  return "?";
}

const char* bar_name(Bar b) {
  switch (b) {
    case Bar::Sync: return "__syncthreads";
    case Bar::Count: return "__syncthreads_count";
    case Bar::And: return "__syncthreads_and";
    case Bar::Or: return "__syncthreads_or";
  }
  return "?";
}

std::string base_name(const char* file) {
  const char* s = std::strrchr(file, '/');
  return s ? s + 1 : file;
}

std::string at(const char* file, int line) { return base_name(file) + ":" + std::to_string(line); }

std::string hex(unsigned v) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", v);
  return b;
}

std::string str(const dim3& d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

struct LaunchRecord {
  std::string file;
  int line;
  dim3 grid, block;
  std::string error;  // configuration error: the kernel did not run
  uint64_t threads = 0, switches = 0;
};

CUstream_st the_current_stream{"the current stream"};

struct Emulator {
  // fibers
  std::vector<char*> stacks;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  Barrier bar;
  std::deque<unsigned> ready;
  Context scheduler;
  unsigned nthreads = 0, live = 0, exited = 0;
  int current = -1;  // the running thread, -1 on the host
  void (*thread_main)(void*) = nullptr;
  void* ctx = nullptr;
  std::string fault;      // the first rule a thread of the running block broke
  const char* launch_file = nullptr;
  int launch_line = 0;
  bool stacks_dirty = false;
  uint64_t switches = 0;
#ifdef CUDA_EMU_ASAN
  void* sched_fake = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
#endif
  // runtime state across launches
  int guards = 0;
  const char* unchecked_file = nullptr;
  int unchecked_line = 0;
  std::string last_error;
  std::vector<LaunchRecord> log;
};

Emulator& emu() {
  static Emulator e;
  return e;
}

[[noreturn]] void host_fail(const std::string& msg) { TORCH_CHECK(false, "cuda_emu: ", msg); }

std::string where_launch(const Emulator& e) {
  return "kernel launched at " + at(e.launch_file, e.launch_line) + ", block " + str(blockIdx);
}

// ---- fibers --------------------------------------------------------------------------------------------------

// The running thread t leaves (it waits, exited or broke a rule) for the next ready thread of the block, directly,
// or for the scheduler when none is ready or a rule was broken. Returns when t is resumed (never when dying).
void leave(Emulator& e, Thread& t, bool dying) {
  ++e.switches;
  Context* to = &e.scheduler;
  const void* bottom = nullptr;
  size_t size = 0;
  if (e.fault.empty() && !e.ready.empty()) {
    const unsigned i = e.ready.front();
    e.ready.pop_front();
    e.current = static_cast<int>(i);
    threadIdx = e.threads[i].idx;
    to = &e.threads[i].ctx;
    bottom = e.stacks[i];
    size = kStackBytes;
  } else {
    e.current = -1;
#ifdef CUDA_EMU_ASAN
    bottom = e.sched_bottom;
    size = e.sched_size;
#endif
  }
#ifdef CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(dying ? nullptr : &t.fake_stack, bottom, size);
#else
  (void)bottom, (void)size, (void)dying;
#endif
  switch_context(t.ctx, *to);
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(t.fake_stack, nullptr, nullptr);
#endif
}

// A thread broke a rule: record it and leave for good; the scheduler abandons the block and throws.
[[noreturn]] void fault(const std::string& msg) {
  Emulator& e = emu();
  if (e.fault.empty()) e.fault = where_launch(e) + ": " + msg;
  Thread& t = e.threads[e.current];
  t.state = State::Done;
  for (;;) leave(e, t, false);
}

void thread_exit(Emulator& e, Thread& t) {
  t.state = State::Done;
  --e.live;
  ++e.exited;
  Warp& w = e.warps[t.linear / 32];
  const unsigned bit = 1u << (t.linear % 32);
  w.exited |= bit;
  if (e.bar.arrived > 0)
    fault("thread " + std::to_string(t.linear) + " exited while " + std::to_string(e.bar.arrived) + " of the block's " +
          std::to_string(e.nthreads) + " threads wait at " + bar_name(e.bar.kind) + " (" +
          at(e.bar.file, e.bar.line) + "): a barrier reached by only part of the block");
  for (const auto& c : w.pending)
    if (c.mask & bit)
      fault("lane " + std::to_string(t.linear % 32) + " of warp " + std::to_string(t.linear / 32) +
            " exited while lanes " + hex(c.arrived) + " wait for it in " + op_name(c.op) + "(mask " + hex(c.mask) +
            ") at " + at(c.file, c.line) + ": a warp collective reached by only part of its mask");
}

void fiber_entry() {
  Emulator& e = emu();
#ifdef CUDA_EMU_ASAN
  // the first thread ever is entered from the scheduler: ASan reports the scheduler's stack, kept for the way back
  if (e.sched_bottom == nullptr)
    __sanitizer_finish_switch_fiber(nullptr, &e.sched_bottom, &e.sched_size);
  else
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  Thread& t = e.threads[e.current];
  // the fault is raised outside the handler: a fiber must not leave while the OS thread's exception state holds
  // an exception it caught
  std::string thrown;
  try {
    e.thread_main(e.ctx);
  } catch (const std::exception& ex) {
    thrown = std::string("the kernel threw: ") + ex.what();
  } catch (...) {
    thrown = "the kernel threw";
  }
  if (!thrown.empty()) fault(thrown);
  thread_exit(e, t);
  leave(e, t, true);
  __builtin_unreachable();
}

char* new_stack() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) host_fail("cannot map a fiber stack");
  mprotect(p, page, PROT_NONE);  // a guard page below the stack: an overflow faults instead of corrupting
  return static_cast<char*>(p) + page;
}

std::string deadlock_report(const Emulator& e) {
  std::ostringstream o;
  o << "deadlock: no thread can run, " << e.live << " of " << e.nthreads << " wait:";
  if (e.bar.arrived)
    o << " " << e.bar.arrived << " at " << bar_name(e.bar.kind) << " (" << at(e.bar.file, e.bar.line) << ")";
  for (size_t w = 0; w < e.warps.size(); ++w)
    for (const auto& c : e.warps[w].pending)
      o << "; warp " << w << " lanes " << hex(c.arrived) << " of mask " << hex(c.mask) << " in " << op_name(c.op)
        << " (" << at(c.file, c.line) << ")";
  return o.str();
}

void run_block(Emulator& e) {
  e.ready.clear();
  e.bar = Barrier{};
  for (unsigned w = 0; w < e.warps.size(); ++w) {
    const unsigned lanes = std::min(32u, e.nthreads - 32 * w);
    e.warps[w].exists = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
    e.warps[w].exited = 0;
    e.warps[w].pending.clear();
  }
  if (e.stacks_dirty) {  // frames of threads abandoned by an earlier fault were never unwound
#ifdef CUDA_EMU_ASAN
    for (char* s : e.stacks) ASAN_UNPOISON_MEMORY_REGION(s, kStackBytes);
#endif
    e.stacks_dirty = false;
  }
  for (unsigned i = 0; i < e.nthreads; ++i) {
    Thread& t = e.threads[i];
    t.linear = i;
    t.idx = dim3(i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y));
    t.state = State::Ready;
#ifdef CUDA_EMU_ASAN
    t.fake_stack = nullptr;
#endif
    make_context(t.ctx, e.stacks[i], kStackBytes, fiber_entry);
    e.ready.push_back(i);
  }
  e.live = e.nthreads;
  e.exited = 0;
  // threads hand over to each other (leave); the scheduler is back when none is ready or a rule was broken
  while (!e.ready.empty() && e.fault.empty()) {
    const unsigned i = e.ready.front();
    e.ready.pop_front();
    e.current = static_cast<int>(i);
    threadIdx = e.threads[i].idx;
    ++e.switches;
#ifdef CUDA_EMU_ASAN
    __sanitizer_start_switch_fiber(&e.sched_fake, e.stacks[i], kStackBytes);
#endif
    switch_context(e.scheduler, e.threads[i].ctx);
#ifdef CUDA_EMU_ASAN
    __sanitizer_finish_switch_fiber(e.sched_fake, nullptr, nullptr);
#endif
  }
  e.current = -1;
  if (e.fault.empty() && e.live > 0) e.fault = where_launch(e) + ": " + deadlock_report(e);
  if (!e.fault.empty()) {
    e.stacks_dirty = true;
    std::string msg;
    std::swap(msg, e.fault);
    host_fail(msg);
  }
}

std::string check_config(const Config& c) {
  const long long threads = static_cast<long long>(c.block.x) * c.block.y * c.block.z;
  if (c.grid.x < 1 || c.grid.x > 2147483647u) return "gridDim.x = " + std::to_string(c.grid.x) + " is not in [1, 2^31-1]";
  if (c.grid.y < 1 || c.grid.y > 65535) return "gridDim.y = " + std::to_string(c.grid.y) + " is not in [1, 65535]";
  if (c.grid.z < 1 || c.grid.z > 65535) return "gridDim.z = " + std::to_string(c.grid.z) + " is not in [1, 65535]";
  if (c.block.x < 1 || c.block.y < 1 || c.block.z < 1) return "blockDim " + str(c.block) + " has a zero dimension";
  if (c.block.x > 1024 || c.block.y > 1024 || c.block.z > 64) return "blockDim " + str(c.block) + " is above (1024, 1024, 64)";
  if (threads > kMaxThreads) return "blockDim " + str(c.block) + " has " + std::to_string(threads) + " threads, above 1024";
  if (c.shmem > 48 * 1024) return "dynamic shared memory " + std::to_string(c.shmem) + " bytes is above 48 KiB";
  return "";
}

// the thread running a device function, or an error when it is called from the host
Thread& device_thread(Emulator& e, const char* what, const char* file, int line) {
  if (e.current < 0) host_fail(std::string(what) + " called outside a kernel at " + at(file, line));
  return e.threads[e.current];
}

void complete_collective(Emulator& e, unsigned w, const Collective& c) {
  uint64_t in[32];
  int arg[32];
  unsigned votes = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (c.mask >> l & 1) {
      in[l] = e.threads[32 * w + l].value;
      arg[l] = e.threads[32 * w + l].arg;
      if (arg[l]) votes |= 1u << l;
    }
  const unsigned width = c.width, seg = ~(width - 1) & 31u;
  for (unsigned l = 0; l < 32; ++l) {
    if (!(c.mask >> l & 1)) continue;
    uint64_t out = 0;
    unsigned src = l;
    switch (c.op) {
      case Op::SyncWarp: break;
      case Op::Ballot: out = votes; break;
      case Op::Any: out = votes != 0; break;
      case Op::All: out = votes == c.mask; break;
      case Op::ShflIdx: src = (l & seg) + (static_cast<unsigned>(arg[l]) & (width - 1)); break;
      case Op::ShflUp: src = (l & (width - 1)) >= static_cast<unsigned>(arg[l]) ? l - arg[l] : l; break;
      case Op::ShflDown: src = (l & (width - 1)) + static_cast<unsigned>(arg[l]) < width ? l + arg[l] : l; break;
      case Op::ShflXor:
        src = l ^ static_cast<unsigned>(arg[l]);
        if (src > 31 || (src & seg) != (l & seg)) src = l;
        break;
    }
    if (c.op >= Op::ShflIdx && c.op <= Op::ShflXor) {
      if (!(c.mask >> src & 1))
        fault(std::string(op_name(c.op)) + " at " + at(c.file, c.line) + ": lane " + std::to_string(l) + " reads lane " +
              std::to_string(src) + ", which is not in the mask " + hex(c.mask) + " (an undefined value)");
      out = in[src];
    }
    e.threads[32 * w + l].value = out;
  }
  for (unsigned l = 0; l < 32; ++l) {
    const unsigned i = 32 * w + l;
    if ((c.mask >> l & 1) && static_cast<int>(i) != e.current) {
      e.threads[i].state = State::Ready;
      e.ready.push_back(i);
    }
  }
}

}  // namespace

// ---- the device side (include/cuda_emu.h) ----------------------------------------------------------------------

uint64_t warp_collective(Op op, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line) {
  Emulator& e = emu();
  Thread& t = device_thread(e, op_name(op), file, line);
  const unsigned w = t.linear / 32, lane = t.linear % 32, bit = 1u << lane;
  Warp& warp = e.warps[w];
  // messages are built only on a fault: this is the emulator's hot path
  const auto here = [&] {
    return std::string(op_name(op)) + "(mask " + hex(mask) + ") at " + at(file, line) + ": lane " +
           std::to_string(lane) + " of warp " + std::to_string(w);
  };
  if (width < 1 || width > 32 || (width & (width - 1)))
    fault(here() + " passes width " + std::to_string(width) + ", not a power of two in [1, 32]");
  if (!(mask & bit)) fault(here() + " is not in its own mask");
  if (mask & ~warp.exists)
    fault(here() + ": the mask names lanes " + hex(mask & ~warp.exists) + " that do not exist (the block has " +
          std::to_string(e.nthreads) + " threads)");
  if (mask & warp.exited)
    fault(here() + ": lanes " + hex(mask & warp.exited) + " named in the mask have exited: a warp collective " +
          "reached by only part of its mask");
  size_t k = 0;
  for (; k < warp.pending.size(); ++k)
    if (warp.pending[k].mask & mask) break;
  if (k < warp.pending.size()) {
    const Collective& c = warp.pending[k];
    if (c.mask != mask || c.op != op || c.width != static_cast<unsigned>(width))
      fault(here() + " (width " + std::to_string(width) + ") meets lanes " + hex(c.arrived) + " waiting in " +
            op_name(c.op) + "(mask " + hex(c.mask) + ", width " + std::to_string(c.width) + ") at " +
            at(c.file, c.line) + ": divergent warp collectives");
  } else {
    warp.pending.push_back({op, mask, static_cast<unsigned>(width), 0, file, line});
  }
  t.value = bits;
  t.arg = arg;
  warp.pending[k].arrived |= bit;
  if (warp.pending[k].arrived != mask) {
    t.state = State::Waiting;
    leave(e, t, false);  // until the last lane completes it; t.value then holds this lane's result
    return t.value;
  }
  const Collective c = warp.pending[k];
  warp.pending.erase(warp.pending.begin() + static_cast<long>(k));
  complete_collective(e, w, c);
  return t.value;
}

int block_barrier(Bar kind, int pred, const char* file, int line) {
  Emulator& e = emu();
  Thread& t = device_thread(e, bar_name(kind), file, line);
  const auto here = [&] { return std::string(bar_name(kind)) + " at " + at(file, line) + ": thread " + std::to_string(t.linear); };
  if (e.exited > 0)
    fault(here() + " arrives after " + std::to_string(e.exited) + " of the block's " + std::to_string(e.nthreads) +
          " threads exited: a barrier reached by only part of the block");
  Barrier& b = e.bar;
  if (b.arrived > 0 && (b.kind != kind || b.line != line || std::strcmp(b.file, file) != 0))
    fault(here() + " while " + std::to_string(b.arrived) + " threads wait at " + bar_name(b.kind) + " at " +
          at(b.file, b.line) + ": threads of one block at different barriers (a barrier in divergent code)");
  if (b.arrived == 0) b = Barrier{0, kind, file, line};
  t.arg = pred != 0;
  if (++b.arrived < e.nthreads) {
    t.state = State::Waiting;
    leave(e, t, false);
    return static_cast<int>(t.value);
  }
  unsigned count = 0;
  for (unsigned i = 0; i < e.nthreads; ++i) count += e.threads[i].arg;
  const int result = kind == Bar::Count ? static_cast<int>(count)
                     : kind == Bar::And ? count == e.nthreads
                     : kind == Bar::Or  ? count > 0
                                        : 0;
  b.arrived = 0;
  for (unsigned i = 0; i < e.nthreads; ++i) {
    e.threads[i].value = static_cast<uint64_t>(result);
    if (static_cast<int>(i) != e.current) {
      e.threads[i].state = State::Ready;
      e.ready.push_back(i);
    }
  }
  return result;
}

// ---- the host side -----------------------------------------------------------------------------------------

[[noreturn]] void narrowed(const char* axis, long long value) {
  host_fail("a grid or block dimension ." + std::string(axis) + " = " + std::to_string(value) +
            " does not fit dim3's 32-bit unsigned field: CUDA would narrow it silently");
}

cudaStream_t current_stream() { return &the_current_stream; }

void guard_enter() { ++emu().guards; }
void guard_exit() { --emu().guards; }

void run(const Config& cfg, void (*thread_main)(void*), void* ctx) {
  Emulator& e = emu();
  const std::string site = "launch at " + at(cfg.file, cfg.line);
  if (e.current >= 0) host_fail(site + " from inside a kernel (dynamic parallelism is not emulated)");
  if (e.guards <= 0) host_fail(site + " with no CUDAGuard alive: the kernel would run on whatever device is current");
  if (cfg.stream != current_stream())
    host_fail(site + " on " + (cfg.stream ? cfg.stream->name : "the legacy default stream") +
              ", not on the current stream (c10::cuda::getCurrentCUDAStream())");
  if (e.unchecked_file)
    host_fail(site + ": the launch at " + at(e.unchecked_file, e.unchecked_line) +
              " was not followed by C10_CUDA_KERNEL_LAUNCH_CHECK()");
  e.unchecked_file = cfg.file;
  e.unchecked_line = cfg.line;
  LaunchRecord rec{base_name(cfg.file), cfg.line, cfg.grid, cfg.block};
  rec.error = check_config(cfg);
  if (!rec.error.empty()) {
    if (e.last_error.empty()) e.last_error = "invalid configuration argument (cuda_emu: " + site + ": " + rec.error + ")";
    e.log.push_back(rec);
    return;
  }
  e.nthreads = cfg.block.x * cfg.block.y * cfg.block.z;
  while (e.stacks.size() < e.nthreads) e.stacks.push_back(new_stack());
  if (e.threads.size() < e.nthreads) e.threads.resize(e.nthreads);
  e.warps.assign((e.nthreads + 31) / 32, Warp{});
  e.thread_main = thread_main;
  e.ctx = ctx;
  e.launch_file = cfg.file;
  e.launch_line = cfg.line;
  const uint64_t switches0 = e.switches;
  gridDim = cfg.grid;
  blockDim = cfg.block;
  struct Reset {  // leave the built-in variables of no block behind, whatever happens
    ~Reset() { threadIdx = blockIdx = blockDim = gridDim = dim3(0u, 0u, 0u); }
  } reset;
  for (unsigned z = 0; z < cfg.grid.z; ++z)
    for (unsigned y = 0; y < cfg.grid.y; ++y)
      for (unsigned x = 0; x < cfg.grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        run_block(e);
        rec.threads += e.nthreads;
      }
  rec.switches = e.switches - switches0;
  e.log.push_back(rec);
}

void launch_check(const char* file, int line) {
  Emulator& e = emu();
  if (e.current >= 0) host_fail("C10_CUDA_KERNEL_LAUNCH_CHECK() inside a kernel at " + at(file, line));
  e.unchecked_file = nullptr;
  e.unchecked_line = 0;
  if (!e.last_error.empty()) {
    std::string err;
    std::swap(err, e.last_error);  // cudaGetLastError() resets the error it returns
    TORCH_CHECK(false, "CUDA error: ", err);
  }
}

}  // namespace cuda_emu

// ---- control ops for the test worker (tests/cuda_emu/worker.py) ------------------------------------------------
//
// How the emulated kernels are reached: this library carries fa_kernels' schemas (cuda_kernels/csrc/fa_ops.cpp)
// and ops_cuda.cu's own TORCH_LIBRARY_IMPL(fa_kernels, CUDA, ...) registrations, and no CPU kernels. It is loaded in
// a process of its own (the real library registers the same schemas), where the worker calls each op on CPU tensors
// through the dispatcher with an explicit CUDA dispatch key set (OpOverload.redispatch): the CUDA kernels run as
// registered, the tensors they allocate are CPU tensors, and AddressSanitizer sees every buffer.

namespace {

std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      o += ' ';
      continue;
    }
    o += c;
  }
  return o;
}

void begin_op() {
  auto& e = cuda_emu::emu();
  e.log.clear();
  e.unchecked_file = nullptr;
  e.unchecked_line = 0;
  e.last_error.clear();
  e.switches = 0;
}

// the launches since begin_op as JSON; an error when the last launch went unchecked
std::string end_op() {
  auto& e = cuda_emu::emu();
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < e.log.size(); ++i) {
    const auto& r = e.log[i];
    o << (i ? ", " : "") << "{\"file\": \"" << json_escape(r.file) << "\", \"line\": " << r.line << ", \"grid\": ["
      << r.grid.x << ", " << r.grid.y << ", " << r.grid.z << "], \"block\": [" << r.block.x << ", " << r.block.y
      << ", " << r.block.z << "], \"error\": \"" << json_escape(r.error) << "\", \"threads\": " << r.threads
      << ", \"switches\": " << r.switches << "}";
  }
  o << "]";
  const char* unchecked = e.unchecked_file;
  const int line = e.unchecked_line;
  const int guards = e.guards;
  begin_op();
  if (unchecked)
    cuda_emu::host_fail("the launch at " + cuda_emu::at(unchecked, line) +
                        " was not followed by C10_CUDA_KERNEL_LAUNCH_CHECK() before the op returned");
  if (guards != 0) cuda_emu::host_fail(std::to_string(guards) + " CUDAGuard(s) still alive after the op");
  return o.str();
}

}  // namespace

void cuda_emu_selftest(const std::string& name);  // selftest.cu

TORCH_LIBRARY(cuda_emu, m) {
  m.def("begin_op() -> ()", &begin_op);
  m.def("end_op() -> str", &end_op);
  m.def("selftest(str name) -> ()", [](const std::string& name) { cuda_emu_selftest(name); });
}
