// Runtime of the torch_tq MSL simulator: fibers, scheduler, collectives, barriers, memory checks.
// Compiled WITHOUT instrumentation and linked with the instrumented kernel glue into one .so.
// The kernel code calls the __asan_* hooks below for every load and store it performs.
#include "tqsim_abi.h"

#include <cmath>
#include <csignal>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fstream>
#include <iterator>
#include <link.h>
#include <string>
#include <ctime>
#include <sys/mman.h>
#include <unistd.h>
#include <vector>

#if defined(TQSIM_FORCE_UCONTEXT) || (!defined(__x86_64__) && !defined(__aarch64__))
#include <ucontext.h>
#define TQSIM_UCONTEXT 1
#endif

extern "C" char __start_tqsim_tg[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_tqsim_tg[] __attribute__((weak, visibility("hidden")));
extern "C" const tqsim_kspec* tqsim_glue_specs(int* n) __attribute__((weak));

// ---- context switch ---------------------------------------------------------------------------
// tqsim_swap(save, to): saves callee-saved registers on the current stack, stores the stack
// pointer in *save, switches to `to` and restores the registers saved there.
#if defined(TQSIM_UCONTEXT)
#elif defined(__x86_64__)
asm(R"(
  .text
  .p2align 4
  .type tqsim_swap,@function
tqsim_swap:
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
  .size tqsim_swap, .-tqsim_swap
  .p2align 4
  .type tqsim_trampoline,@function
tqsim_trampoline:
  movq %r12, %rdi
  xorl %ebp, %ebp
  callq *%r13
  ud2
  .size tqsim_trampoline, .-tqsim_trampoline
)");
#elif defined(__aarch64__)
asm(R"(
  .text
  .p2align 4
  .type tqsim_swap,%function
tqsim_swap:
  sub sp, sp, #160
  stp x19, x20, [sp, #0]
  stp x21, x22, [sp, #16]
  stp x23, x24, [sp, #32]
  stp x25, x26, [sp, #48]
  stp x27, x28, [sp, #64]
  stp x29, x30, [sp, #80]
  stp d8, d9, [sp, #96]
  stp d10, d11, [sp, #112]
  stp d12, d13, [sp, #128]
  stp d14, d15, [sp, #144]
  mov x2, sp
  str x2, [x0]
  mov sp, x1
  ldp x19, x20, [sp, #0]
  ldp x21, x22, [sp, #16]
  ldp x23, x24, [sp, #32]
  ldp x25, x26, [sp, #48]
  ldp x27, x28, [sp, #64]
  ldp x29, x30, [sp, #80]
  ldp d8, d9, [sp, #96]
  ldp d10, d11, [sp, #112]
  ldp d12, d13, [sp, #128]
  ldp d14, d15, [sp, #144]
  add sp, sp, #160
  ret
  .size tqsim_swap, .-tqsim_swap
  .p2align 4
  .type tqsim_trampoline,%function
tqsim_trampoline:
  mov x0, x19
  mov x29, #0
  mov x30, #0
  blr x20
  brk #0
  .size tqsim_trampoline, .-tqsim_trampoline
)");
#endif
#ifndef TQSIM_UCONTEXT
extern "C" void tqsim_swap(void** save, void* to);
extern "C" void tqsim_trampoline();
#endif

namespace {

enum State : uint8_t { RUNNABLE, AT_COLL, AT_SGBAR, AT_TGBAR, DONE, FAILED };
const char* const kCollNames[] = {
    "?", "simd_sum", "simd_product", "simd_min", "simd_max", "simd_and", "simd_or", "simd_xor",
    "simd_prefix_exclusive_sum", "simd_prefix_inclusive_sum", "simd_prefix_exclusive_product",
    "simd_prefix_inclusive_product", "simd_shuffle", "simd_shuffle_xor", "simd_shuffle_down",
    "simd_shuffle_up", "simd_shuffle_rotate_down", "simd_shuffle_rotate_up", "simd_broadcast",
    "simd_broadcast_first", "simd_all", "simd_any", "simd_ballot", "simdgroup_matrix exchange"};

struct Fiber {
  void* sp;
#ifdef TQSIM_UCONTEXT
  ucontext_t uc;
#endif
  uint8_t* stack_lo;
  uint8_t* stack_hi;
  State state;
  uint32_t kind, size, flags;
  uint64_t sig;
  uintptr_t pc;
  uint32_t tid, sg, lane;
  tqsim_thread info;
  tqsim_coll_view view;
  // Device ranges this thread loaded since its last synchronisation point or device store: a
  // reload of the same bytes is not counted again (see README, "byte counts").
  uintptr_t rlo[16], rhi[16];
  uint32_t rn;
};

struct SimdGroup {
  uint32_t first, n, gen, epoch;
  uint32_t done[2];
  uint32_t args[2][TQSIM_SIMD_WIDTH];
  alignas(64) unsigned char slots[2][TQSIM_SIMD_WIDTH * TQSIM_SLOT];
  alignas(64) unsigned char result[2][TQSIM_SIMD_WIDTH * TQSIM_SLOT];
};

struct Buffer {
  int index;
  bool writable;
  void* host;
  uint8_t* alloc;
  uintptr_t lo, hi;
  uint64_t size, rd, wr;
};

// Threadgroup-memory shadow, one record per byte.
struct Shadow {
  uint32_t wep, wsg, rep, rsg;
  uint16_t wtid, rtid, rsgid, pad;
};
constexpr uint16_t kMulti = 0xfffe, kAtomicTid = 0xfffd;
constexpr size_t kRedZone = 4096;
constexpr uint32_t kMaxThreads = 1024;

struct Registration {
  std::string host, fname;
  tqsim_thunk thunk;
  void* fn;
  int nparams;
};
std::vector<Registration>& registry() {
  static std::vector<Registration> r;
  return r;
}

// Arena (fiber records, simdgroups and stacks) — kernel code may touch all of it.
uint8_t* g_arena = nullptr;
size_t g_arena_size = 0, g_stack_size = 0, g_hdr_size = 0;
Fiber* g_fibers = nullptr;
SimdGroup* g_sgs = nullptr;

bool g_active = false;
bool g_trace = false;  // TQ_SIM_TRACE=1: print every device access to stderr
Fiber* g_cur = nullptr;
void* g_sched_sp = nullptr;
#ifdef TQSIM_UCONTEXT
ucontext_t g_sched_uc;
#endif
uintptr_t g_tg_lo = 0, g_tg_size = 0, g_img_lo = 0, g_img_size = 0;
std::vector<Shadow> g_shadow;
uint32_t g_ep = 0, g_tg_base = 0;
std::vector<Buffer> g_bufs;
void* g_buf_table[64];
std::string g_error;
std::string g_kernel;
uint32_t g_tgid[3];
uint32_t g_nthreads = 0, g_nsg = 0;
tqsim_thunk g_thunk;
void* g_fn;
const int32_t* g_spec;

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

std::string symbolize(uintptr_t pc) {
  Dl_info info;
  if (pc && dladdr((void*)pc, &info) && info.dli_sname) {
    int st = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &st);
    std::string name = st == 0 && d ? d : info.dli_sname;
    free(d);
    return fmt("%s+0x%lx", name.c_str(), (unsigned long)(pc - (uintptr_t)info.dli_saddr));
  }
  return fmt("0x%lx", (unsigned long)pc);
}

std::string where(const Fiber* f) {
  std::string s = fmt("kernel '%s', threadgroup (%u,%u,%u)", g_kernel.c_str(), g_tgid[0], g_tgid[1], g_tgid[2]);
  if (f)
    s += fmt(", thread (%u,%u,%u) [index %u, simdgroup %u, lane %u]", f->info.thread_position_in_threadgroup[0],
             f->info.thread_position_in_threadgroup[1], f->info.thread_position_in_threadgroup[2], f->tid, f->sg,
             f->lane);
  return s;
}

// A read of threadgroup memory nobody has written yet is not reported at once: lanes run one
// after another, so the writer may simply not have run yet (a missing barrier, i.e. a race).
// The read is remembered; a later write by another thread in the same barrier interval turns
// it into a race report, otherwise it is reported as uninitialised at the next barrier, at the
// end of the threadgroup, or in place of any later error (it is the likely root cause).
struct PendingUninit {
  bool active;
  size_t off, n;
  uint32_t tid, ep;
  std::string where;
} g_pending;
std::string tg_symbol(size_t off);

void set_error(const Fiber* f, const std::string& what) {
  if (!g_error.empty()) return;
  if (g_pending.active) {
    g_pending.active = false;
    g_error = g_pending.where + fmt(": read of uninitialised threadgroup memory (%zu bytes at %s): no thread "
                                    "wrote it in this threadgroup before the next barrier",
                                    g_pending.n, tg_symbol(g_pending.off).c_str());
    return;
  }
  g_error = where(f) + ": " + what;
}

void switch_to_scheduler(Fiber* f) {
#ifdef TQSIM_UCONTEXT
  swapcontext(&f->uc, &g_sched_uc);
#else
  tqsim_swap(&f->sp, g_sched_sp);
#endif
}

// Aborts the running fiber with an error; never returns.
[[noreturn]] void fail_here(const std::string& what) {
  Fiber* f = g_cur;
  set_error(f, what);
  f->state = FAILED;
  switch_to_scheduler(f);
  __builtin_trap();
}

// Identity of a synchronisation point: the chain of return addresses from the runtime entry up
// to the fiber's base (frame pointers are kept in kernel and runtime code).
// Always inlined into the tqsim_* entry point, so frame 0 is that entry point's frame and its
// return address is the call site in kernel code.
__attribute__((always_inline)) inline uint64_t call_signature(Fiber* f, uintptr_t* first_pc) {
  uint64_t h = 1469598103934665603ull;
  uintptr_t* fp = (uintptr_t*)__builtin_frame_address(0);
  *first_pc = 0;
  for (int depth = 0; depth < 32; ++depth) {
    if ((uint8_t*)fp < f->stack_lo || (uint8_t*)(fp + 2) > f->stack_hi) break;
    uintptr_t ret = fp[1];
    if (!ret) break;
    if (!*first_pc) *first_pc = ret;
    h = (h ^ ret) * 1099511628211ull;
    uintptr_t* next = (uintptr_t*)fp[0];
    if (next <= fp) break;
    fp = next;
  }
  return h;
}

// Names of threadgroup variables, from the library's own ELF symbol table (for messages).
struct TgSym {
  size_t off, size;
  std::string name;
};
std::vector<TgSym> g_tgsyms;
bool g_tgsyms_loaded = false;

void load_tg_symbols() {
  g_tgsyms_loaded = true;
  Dl_info info;
  if (!dladdr((void*)&g_active, &info) || !info.dli_fname) return;
  std::ifstream in(info.dli_fname, std::ios::binary);
  std::vector<char> img((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (img.size() < sizeof(Elf64_Ehdr) || memcmp(img.data(), ELFMAG, SELFMAG) != 0 || img[EI_CLASS] != ELFCLASS64)
    return;
  const Elf64_Ehdr* eh = (const Elf64_Ehdr*)img.data();
  if (eh->e_shoff + (size_t)eh->e_shnum * sizeof(Elf64_Shdr) > img.size() || eh->e_shstrndx >= eh->e_shnum) return;
  const Elf64_Shdr* sh = (const Elf64_Shdr*)(img.data() + eh->e_shoff);
  const char* shstr = img.data() + sh[eh->e_shstrndx].sh_offset;
  int tg_index = -1;
  for (int i = 0; i < eh->e_shnum; ++i)
    if (strcmp(shstr + sh[i].sh_name, "tqsim_tg") == 0) tg_index = i;
  for (int i = 0; i < eh->e_shnum && tg_index >= 0; ++i) {
    if (sh[i].sh_type != SHT_SYMTAB || sh[i].sh_link >= eh->e_shnum) continue;
    const Elf64_Sym* sym = (const Elf64_Sym*)(img.data() + sh[i].sh_offset);
    const char* str = img.data() + sh[sh[i].sh_link].sh_offset;
    for (size_t k = 0; k < sh[i].sh_size / sizeof(Elf64_Sym); ++k) {
      if (sym[k].st_shndx != tg_index || sym[k].st_size == 0) continue;
      uintptr_t addr = (uintptr_t)info.dli_fbase + sym[k].st_value;
      if (addr < g_tg_lo || addr >= g_tg_lo + g_tg_size) continue;
      int st = 0;
      char* d = abi::__cxa_demangle(str + sym[k].st_name, nullptr, nullptr, &st);
      std::string name = st == 0 && d ? d : str + sym[k].st_name;
      free(d);
      size_t paren = name.find('('), tail = name.rfind(")::");
      if (paren != std::string::npos && tail != std::string::npos && tail > paren)
        name = name.substr(0, paren) + name.substr(tail + 1);
      g_tgsyms.push_back(TgSym{addr - g_tg_lo, sym[k].st_size, name});
    }
  }
}

std::string tg_symbol(size_t off) {
  if (!g_tgsyms_loaded) load_tg_symbols();
  for (const TgSym& t : g_tgsyms)
    if (off >= t.off && off < t.off + t.size) return fmt("%s + %zu bytes", t.name.c_str(), off - t.off);
  return fmt("threadgroup-memory offset %zu", off);
}

// ---- memory checks --------------------------------------------------------------------------------
const Buffer* nearest_buffer(uintptr_t a, long* off) {
  const Buffer* best = nullptr;
  uintptr_t bd = ~(uintptr_t)0;
  for (const Buffer& b : g_bufs) {
    uintptr_t d = a < b.lo ? b.lo - a : a >= b.hi ? a - b.hi + 1 : 0;
    if (d < bd) { bd = d; best = &b; }
  }
  if (best) *off = (long)(a - best->lo);
  return best;
}

// amode: 0 plain access, 1 atomic load, 2 atomic store, 3 atomic read-modify-write.
void tg_access(uintptr_t a, size_t n, bool w, int amode) {
  const bool atomic = amode != 0;
  Fiber* f = g_cur;
  uint32_t sgep = g_sgs[f->sg].epoch;
  uint16_t tid = (uint16_t)f->tid, sg = (uint16_t)f->sg;
  size_t off0 = a - g_tg_lo;
  for (size_t i = 0; i < n && off0 + i < g_tg_size; ++i) {
    Shadow& s = g_shadow[off0 + i];
    size_t off = off0 + i;
    bool written_now = s.wep == g_ep && s.wep >= g_tg_base;
    bool w_ordered = s.wtid != kAtomicTid && s.wtid / TQSIM_SIMD_WIDTH == sg && s.wsg < sgep;
    bool uninit = s.wep < g_tg_base || s.wep == 0;
    if (uninit && (amode == 1 || amode == 3))
      fail_here(fmt("atomic operation reads uninitialised threadgroup memory (%s): initialise it with "
                    "atomic_store_explicit before a threadgroup_barrier", tg_symbol(off).c_str()));
    if (uninit && !w && !atomic && !g_pending.active)
      g_pending = PendingUninit{true, off, n - i, f->tid, g_ep, where(f)};
    if (atomic) {
      if (w) { s.wep = g_ep; s.wtid = kAtomicTid; s.wsg = sgep; s.rep = 0; }
      continue;
    }
    if (!w) {
      if (!uninit && written_now && s.wtid != tid && !w_ordered)
        fail_here(fmt("data race on threadgroup memory: read of %zu bytes at %s written by %s "
                      "without a threadgroup_barrier(mem_flags::mem_threadgroup) in between",
                      n, tg_symbol(off).c_str(), s.wtid == kAtomicTid ? "an atomic operation" : fmt("thread index %u", s.wtid).c_str()));
      if (s.rep != g_ep) {
        s.rep = g_ep; s.rtid = tid; s.rsgid = sg; s.rsg = sgep;
      } else {
        if (s.rtid != tid) s.rtid = kMulti;
        if (s.rsgid != sg) s.rsgid = kMulti;
        s.rsg = sgep;
      }
    } else {
      if (g_pending.active && g_pending.ep == g_ep && g_pending.tid != tid && off >= g_pending.off &&
          off < g_pending.off + g_pending.n) {
        g_pending.active = false;
        fail_here(fmt("data race on threadgroup memory: write of %zu bytes at %s, which thread index %u read earlier "
                      "without a threadgroup_barrier(mem_flags::mem_threadgroup) in between",
                      n, tg_symbol(off).c_str(), g_pending.tid));
      }
      if (written_now && s.wtid != tid && !w_ordered)
        fail_here(fmt("data race on threadgroup memory: write of %zu bytes at %s also written by %s "
                      "without a threadgroup_barrier(mem_flags::mem_threadgroup) in between",
                      n, tg_symbol(off).c_str(), s.wtid == kAtomicTid ? "an atomic operation" : fmt("thread index %u", s.wtid).c_str()));
      if (s.rep == g_ep && s.rep >= g_tg_base && s.rtid != tid && !(s.rsgid == sg && s.rsg < sgep))
        fail_here(fmt("data race on threadgroup memory: write of %zu bytes at %s read by %s without a "
                      "threadgroup_barrier(mem_flags::mem_threadgroup) in between",
                      n, tg_symbol(off).c_str(), s.rtid == kMulti ? "several other threads" : fmt("thread index %u", s.rtid).c_str()));
      s.wep = g_ep; s.wtid = tid; s.wsg = sgep; s.rep = 0;
    }
  }
}

inline void check(uintptr_t a, size_t n, bool w, int amode = 0) {
  const bool atomic = amode != 0;
  if (!g_active || !g_cur) return;
  if (a - g_tg_lo < g_tg_size) { tg_access(a, n, w, amode); return; }
  if (a - (uintptr_t)g_arena < g_arena_size) {
    Fiber* f = g_cur;
    if (a - (uintptr_t)f->stack_lo < (uintptr_t)(f->stack_hi - f->stack_lo) || a < (uintptr_t)g_arena + g_hdr_size)
      return;
    if (a < (uintptr_t)f->stack_lo && a + (64u << 20) >= (uintptr_t)f->stack_lo)
      fail_here(fmt("fiber stack overflow: the thread needs more than %zu KiB of stack (raise TQ_SIM_STACK_KB)",
                    g_stack_size / 1024));
    fail_here(fmt("%s of %zu bytes at %p in another thread's private (thread) memory", w ? "write" : "read", n,
                  (void*)a));
  }
  for (Buffer& b : g_bufs) {
    if (a - b.lo < b.size + (b.size == 0)) {
      if (a + n > b.hi)
        fail_here(fmt("out-of-bounds device %s of %zu bytes at byte offset %ld of buffer(%d) (%llu bytes)",
                      w ? "write" : "read", n, (long)(a - b.lo), b.index, (unsigned long long)b.size));
      if (g_trace)
        fprintf(stderr, "tqsim: tg (%u,%u,%u) thread %u %s%s buffer(%d) offset %ld size %zu\n", g_tgid[0], g_tgid[1],
                g_tgid[2], g_cur->tid, atomic ? "atomic " : "", w ? "write" : "read", b.index, (long)(a - b.lo), n);
      Fiber* f = g_cur;
      if (atomic) {
        f->rn = 0;
        if (amode != 2) b.rd += n;
        if (amode != 1) b.wr += n;
      } else if (w) {
        f->rn = 0;
        b.wr += n;
      } else {
        uint32_t k = f->rn < 16 ? f->rn : 16;
        for (uint32_t i = 0; i < k; ++i)
          if (a >= f->rlo[i] && a + n <= f->rhi[i]) return;
        f->rlo[f->rn % 16] = a;
        f->rhi[f->rn % 16] = a + n;
        f->rn++;
        b.rd += n;
      }
      return;
    }
  }
  if (a - g_img_lo < g_img_size) return;
  long off = 0;
  const Buffer* nb = nearest_buffer(a, &off);
  if (nb)
    fail_here(fmt("out-of-bounds device %s of %zu bytes at byte offset %ld of buffer(%d) (%llu bytes)",
                  w ? "write" : "read", n, off, nb->index, (unsigned long long)nb->size));
  fail_here(fmt("%s of %zu bytes at address %p, outside every device buffer, threadgroup memory and thread stack",
                w ? "write" : "read", n, (void*)a));
}

// ---- fibers and scheduling -------------------------------------------------------------------------
void fiber_main(void* arg) {
  Fiber* f = (Fiber*)arg;
  g_thunk(g_fn, &f->info, g_spec);
  f->state = DONE;
  switch_to_scheduler(f);
  __builtin_trap();
}

bool ensure_arena() {
  if (g_arena) return true;
  size_t page = (size_t)sysconf(_SC_PAGESIZE);
  size_t kb = 128;
  if (const char* e = getenv("TQ_SIM_STACK_KB")) kb = (size_t)atol(e) > 16 ? (size_t)atol(e) : 16;
  g_stack_size = (kb * 1024 + page - 1) / page * page;
  size_t hdr = sizeof(Fiber) * kMaxThreads + sizeof(SimdGroup) * (kMaxThreads / TQSIM_SIMD_WIDTH);
  hdr = (hdr + page - 1) / page * page;
  g_hdr_size = hdr;
  g_arena_size = hdr + (g_stack_size + page) * kMaxThreads;
  void* p = mmap(nullptr, g_arena_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return false;
  g_arena = (uint8_t*)p;
  g_fibers = (Fiber*)g_arena;
  g_sgs = (SimdGroup*)(g_arena + sizeof(Fiber) * kMaxThreads);
  for (uint32_t i = 0; i < kMaxThreads; ++i) {
    uint8_t* guard = g_arena + hdr + (g_stack_size + page) * i;
    mprotect(guard, page, PROT_NONE);  // stack overflow faults instead of corrupting a neighbour
    g_fibers[i].stack_lo = guard + page;
    g_fibers[i].stack_hi = guard + page + g_stack_size;
  }
  return true;
}

void start_fiber(Fiber* f) {
#ifdef TQSIM_UCONTEXT
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack_lo;
  f->uc.uc_stack.ss_size = f->stack_hi - f->stack_lo;
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, (void (*)())fiber_main, 1, f);  // pointer through int: glibc passes 64-bit
#else
  uintptr_t top = ((uintptr_t)f->stack_hi) & ~(uintptr_t)15;
  uintptr_t* s = (uintptr_t*)top;
#if defined(__x86_64__)
  *--s = (uintptr_t)tqsim_trampoline;  // ret target
  *--s = 0;                            // rbp
  *--s = 0;                            // rbx
  *--s = (uintptr_t)f;                 // r12
  *--s = (uintptr_t)fiber_main;        // r13
  *--s = 0;                            // r14
  *--s = 0;                            // r15
#else
  s -= 20;
  memset(s, 0, 160);
  s[0] = (uintptr_t)f;           // x19
  s[1] = (uintptr_t)fiber_main;  // x20
  s[11] = (uintptr_t)tqsim_trampoline;  // x30
#endif
  f->sp = s;
#endif
}

void resume(Fiber* f) {
  g_cur = f;
#ifdef TQSIM_UCONTEXT
  swapcontext(&g_sched_uc, &f->uc);
#else
  tqsim_swap(&g_sched_sp, f->sp);
#endif
  g_cur = nullptr;
}

std::string lanes_desc(const SimdGroup& s, State st, uint32_t kind = 0, uint64_t sig = 0, bool match = false) {
  std::string out;
  int cnt = 0;
  for (uint32_t l = 0; l < s.n; ++l) {
    const Fiber& f = g_fibers[s.first + l];
    if (f.state != st) continue;
    if (match && (f.kind != kind || f.sig != sig)) continue;
    if (cnt++ < 8) out += (out.empty() ? "" : ",") + std::to_string(l);
  }
  if (cnt > 8) out += ",...";
  return out;
}

std::string sync_desc(const Fiber& f) {
  if (f.state == AT_TGBAR) return "threadgroup_barrier at " + symbolize(f.pc);
  if (f.state == AT_SGBAR) return "simdgroup_barrier at " + symbolize(f.pc);
  if (f.state == AT_COLL) return std::string(kCollNames[f.kind < TQSIM_C_KIND_COUNT ? f.kind : 0]) + " at " + symbolize(f.pc);
  return "exit";
}

// Releases a simdgroup whose lanes are all blocked. Returns false on error, sets *parked when the
// simdgroup waits at a threadgroup barrier or has finished.
bool settle_simdgroup(SimdGroup& s, bool* parked) {
  uint32_t ndone = 0, ntg = 0, nwait = 0;
  const Fiber* first = nullptr;
  for (uint32_t l = 0; l < s.n; ++l) {
    const Fiber& f = g_fibers[s.first + l];
    if (f.state == DONE) ++ndone;
    else if (f.state == AT_TGBAR) ++ntg;
    else { ++nwait; if (!first) first = &f; }
  }
  if (nwait == 0) { *parked = true; return true; }
  *parked = false;
  std::string sgname = fmt("simdgroup %u", s.first / TQSIM_SIMD_WIDTH);
  if (ndone) {
    set_error(nullptr, fmt("%s: lanes %s exited while lanes %s wait in %s (divergent collective: every lane of "
                           "the simdgroup must reach it)", sgname.c_str(), lanes_desc(s, DONE).c_str(),
                           lanes_desc(s, first->state, first->kind, first->sig, true).c_str(), sync_desc(*first).c_str()));
    return false;
  }
  for (uint32_t l = 0; l < s.n; ++l) {
    const Fiber& f = g_fibers[s.first + l];
    if (f.state != first->state || f.kind != first->kind || f.sig != first->sig ||
        (f.state == AT_COLL && f.size != first->size)) {
      set_error(nullptr, fmt("%s: divergent collective: lane %u is at %s while lane %u is at %s%s", sgname.c_str(),
                             first->lane, sync_desc(*first).c_str(), f.lane, sync_desc(f).c_str(),
                             f.pc == first->pc ? " (the same call reached through different call sites)" : ""));
      return false;
    }
  }
  if (first->state == AT_SGBAR) {
    if (first->flags & 2u) s.epoch++;
  } else {
    uint32_t par = s.gen & 1;
    s.done[par] = 0;
    s.gen++;
  }
  for (uint32_t l = 0; l < s.n; ++l) g_fibers[s.first + l].state = RUNNABLE;
  return true;
}

bool run_threadgroup() {
  const uint32_t n = g_nthreads;
  for (uint32_t i = 0; i < n; ++i) {
    Fiber* f = &g_fibers[i];
    f->state = RUNNABLE;
    f->tid = i;
    f->sg = i / TQSIM_SIMD_WIDTH;
    f->lane = i % TQSIM_SIMD_WIDTH;
    f->kind = 0;
    f->sig = 0;
    f->rn = 0;
    tqsim_thread& t = f->info;
    const uint32_t* ts = t.threads_per_threadgroup;
    t.thread_position_in_threadgroup[0] = i % ts[0];
    t.thread_position_in_threadgroup[1] = (i / ts[0]) % ts[1];
    t.thread_position_in_threadgroup[2] = i / (ts[0] * ts[1]);
    for (int d = 0; d < 3; ++d) {
      t.threadgroup_position_in_grid[d] = g_tgid[d];
      t.thread_position_in_grid[d] = g_tgid[d] * ts[d] + t.thread_position_in_threadgroup[d];
    }
    t.thread_index_in_threadgroup = i;
    t.thread_index_in_simdgroup = f->lane;
    t.simdgroup_index_in_threadgroup = f->sg;
    start_fiber(f);
  }
  for (uint32_t s = 0; s < g_nsg; ++s) {
    SimdGroup& sg = g_sgs[s];
    sg.first = s * TQSIM_SIMD_WIDTH;
    sg.n = n - sg.first < TQSIM_SIMD_WIDTH ? n - sg.first : TQSIM_SIMD_WIDTH;
    sg.gen = 0;
    sg.epoch = 0;
  }
  g_tg_base = ++g_ep;
  for (;;) {
    for (uint32_t s = 0; s < g_nsg; ++s) {
      SimdGroup& sg = g_sgs[s];
      for (;;) {
        for (uint32_t l = 0; l < sg.n; ++l) {
          Fiber* f = &g_fibers[sg.first + l];
          if (f->state == RUNNABLE) resume(f);
          if (!g_error.empty()) return false;
        }
        bool parked = false;
        if (!settle_simdgroup(sg, &parked)) return false;
        if (parked) break;
      }
    }
    uint32_t ndone = 0;
    const Fiber* waiting = nullptr;
    const Fiber* exited = nullptr;
    uint32_t flags = 0;
    for (uint32_t i = 0; i < n; ++i) {
      const Fiber& f = g_fibers[i];
      if (f.state == DONE) { ++ndone; if (!exited) exited = &f; }
      else { if (!waiting) waiting = &f; flags |= f.flags; }
    }
    if (g_pending.active) {
      set_error(nullptr, "");
      return false;
    }
    if (ndone == n) return true;
    if (ndone) {
      set_error(nullptr, fmt("threadgroup_barrier not reached by every thread: %u of %u threads wait at %s while "
                             "thread index %u (and %u others) exited", n - ndone, n, sync_desc(*waiting).c_str(),
                             exited->tid, ndone - 1));
      return false;
    }
    for (uint32_t i = 0; i < n; ++i) {
      const Fiber& f = g_fibers[i];
      if (f.sig != waiting->sig) {
        set_error(nullptr, fmt("threads reach different threadgroup_barrier calls: thread index %u at %s, thread "
                               "index %u at %s", waiting->tid, sync_desc(*waiting).c_str(), f.tid,
                               sync_desc(f).c_str()));
        return false;
      }
    }
    if (flags & 2u) ++g_ep;
    for (uint32_t i = 0; i < n; ++i) g_fibers[i].state = RUNNABLE;
  }
}

// Faults inside kernel code (stack overflow, wild pointers the hooks did not see, integer
// division by zero) abort the launch instead of the process.
struct sigaction g_old_act[3];
const int kSignals[3] = {SIGSEGV, SIGBUS, SIGFPE};
stack_t g_old_altstack;
alignas(16) char g_altstack[64 * 1024];

pid_t g_launch_tid = 0;
timer_t g_timer;
bool g_timer_ok = false;
struct sigaction g_old_timer_act;
const int kTimerSignal = SIGRTMIN + 3;

void on_fault(int sig, siginfo_t* si, void*) {
  Fiber* f = g_cur;
  if (!g_active || !f || gettid() != g_launch_tid) {
    for (int i = 0; i < 3; ++i)
      if (kSignals[i] == sig) sigaction(sig, &g_old_act[i], nullptr);
    raise(sig);
    return;
  }
  bool overflow = (uint8_t*)si->si_addr < f->stack_lo && (uint8_t*)si->si_addr + (64u << 20) >= f->stack_lo;
  set_error(f, fmt("the kernel crashed with signal %d (%s) at address %p%s", sig, strsignal(sig), si->si_addr,
                   overflow ? ": fiber stack overflow (raise TQ_SIM_STACK_KB)" : ""));
  f->state = FAILED;
  switch_to_scheduler(f);
}

// Watchdog: CPU time of the launching thread; a kernel stuck in a loop becomes an error.
void on_timer(int, siginfo_t*, void*) {
  Fiber* f = g_cur;
  if (!g_active || !f || gettid() != g_launch_tid) return;
  set_error(f, "the launch exceeded TQ_SIM_TIMEOUT seconds of CPU time (infinite loop?)");
  f->state = FAILED;
  switch_to_scheduler(f);
}

void install_handlers() {
  g_launch_tid = gettid();
  double limit = 300;
  if (const char* e = getenv("TQ_SIM_TIMEOUT")) limit = atof(e);
  g_timer_ok = false;
  if (limit > 0) {
    struct sigaction ta{};
    ta.sa_sigaction = on_timer;
    ta.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&ta.sa_mask);
    sigaction(kTimerSignal, &ta, &g_old_timer_act);
    struct sigevent ev{};
    ev.sigev_notify = SIGEV_THREAD_ID;
    ev.sigev_signo = kTimerSignal;
#ifdef sigev_notify_thread_id
    ev.sigev_notify_thread_id = g_launch_tid;
#else
    ev._sigev_un._tid = g_launch_tid;
#endif
    if (timer_create(CLOCK_THREAD_CPUTIME_ID, &ev, &g_timer) == 0) {
      struct itimerspec its{};
      its.it_value.tv_sec = (time_t)limit;
      its.it_value.tv_nsec = (long)((limit - (double)(time_t)limit) * 1e9);
      if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) its.it_value.tv_nsec = 1;
      timer_settime(g_timer, 0, &its, nullptr);
      g_timer_ok = true;
    }
  }
  stack_t ss{};
  ss.ss_sp = g_altstack;
  ss.ss_size = sizeof g_altstack;
  sigaltstack(&ss, &g_old_altstack);
  struct sigaction act{};
  act.sa_sigaction = on_fault;
  act.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&act.sa_mask);
  for (int i = 0; i < 3; ++i) sigaction(kSignals[i], &act, &g_old_act[i]);
}

void remove_handlers() {
  if (g_timer_ok) {
    timer_delete(g_timer);
    g_timer_ok = false;
    sigaction(kTimerSignal, &g_old_timer_act, nullptr);
  }
  for (int i = 0; i < 3; ++i) sigaction(kSignals[i], &g_old_act[i], nullptr);
  sigaltstack(&g_old_altstack, nullptr);
  sigset_t set;
  sigemptyset(&set);
  for (int s : kSignals) sigaddset(&set, s);
  sigaddset(&set, kTimerSignal);
  pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
}

int find_image(struct dl_phdr_info* info, size_t, void* data) {
  uintptr_t probe = (uintptr_t)&g_active;
  uintptr_t lo = ~(uintptr_t)0, hi = 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    uintptr_t a = info->dlpi_addr + ph.p_vaddr;
    if (a < lo) lo = a;
    if (a + ph.p_memsz > hi) hi = a + ph.p_memsz;
  }
  if (probe >= lo && probe < hi) {
    ((uintptr_t*)data)[0] = lo;
    ((uintptr_t*)data)[1] = hi;
    return 1;
  }
  return 0;
}

const char* kParamNames[] = {"buffer", "thread_position_in_grid", "threadgroup_position_in_grid",
                             "thread_position_in_threadgroup", "thread_index_in_threadgroup",
                             "thread_index_in_simdgroup", "simdgroup_index_in_threadgroup",
                             "threads_per_threadgroup", "threadgroups_per_grid", "threads_per_simdgroup",
                             "simdgroups_per_threadgroup", "threads_per_grid"};

}  // namespace

// ---- C ABI -----------------------------------------------------------------------------------------
extern "C" {

void tqsim_register(const char* host, const char* fname, tqsim_thunk thunk, void* fn, int nparams) {
  registry().push_back(Registration{host, fname, thunk, fn, nparams});
}

int tqsim_kernel_names(char* out, int len) {
  std::string s;
  for (const auto& r : registry()) s += r.host + "\n";
  snprintf(out, (size_t)len, "%s", s.c_str());
  return (int)s.size();
}

const tqsim_coll_view* tqsim_collective(uint32_t kind, const void* value, uint32_t size, uint32_t arg) {
  Fiber* f = g_cur;
  if (!f) { fprintf(stderr, "tqsim: collective outside a launch\n"); abort(); }
  SimdGroup& s = g_sgs[f->sg];
  uint32_t par = s.gen & 1;
  memcpy(s.slots[par] + (size_t)f->lane * TQSIM_SLOT, value, size);
  s.args[par][f->lane] = arg;
  f->state = AT_COLL;
  f->rn = 0;
  f->kind = kind;
  f->size = size;
  f->sig = call_signature(f, &f->pc) ^ kind;
  switch_to_scheduler(f);
  f->view.slots = s.slots[par];
  f->view.args = s.args[par];
  f->view.result = s.result[par];
  f->view.done = &s.done[par];
  f->view.nlanes = s.n;
  f->view.lane = f->lane;
  return &f->view;
}

void tqsim_threadgroup_barrier(uint32_t flags) {
  Fiber* f = g_cur;
  f->state = AT_TGBAR;
  f->rn = 0;
  f->flags = flags;
  f->kind = 0;
  f->sig = call_signature(f, &f->pc);
  switch_to_scheduler(f);
}

void tqsim_simdgroup_barrier(uint32_t flags) {
  Fiber* f = g_cur;
  f->state = AT_SGBAR;
  f->rn = 0;
  f->flags = flags;
  f->kind = 0;
  f->sig = call_signature(f, &f->pc);
  switch_to_scheduler(f);
}

uint32_t tqsim_lane(void) { return g_cur ? g_cur->lane : 0; }

uint32_t tqsim_simd_is_first(void) {
  Fiber* f = g_cur;
  const SimdGroup& s = g_sgs[f->sg];
  for (uint32_t l = 0; l < f->lane; ++l)
    if (g_fibers[s.first + l].state != DONE) return 0;
  return 1;
}

void tqsim_fail(const char* message) { fail_here(message); }

int tqsim_atomic(uint32_t op, uint32_t type, void* obj, const void* value, void* old) {
  uintptr_t a = (uintptr_t)obj;
  if (a & 3) fail_here("misaligned atomic access");
  check(a, 4, op != TQSIM_A_LOAD, op == TQSIM_A_LOAD ? 1 : op == TQSIM_A_STORE ? 2 : 3);
  uint32_t cur, v;
  memcpy(&cur, obj, 4);
  memcpy(&v, value, 4);
  uint32_t nv = cur;
  int ok = 1;
  auto asf = [](uint32_t x) { float f; memcpy(&f, &x, 4); return f; };
  auto fas = [](float x) { uint32_t u; memcpy(&u, &x, 4); return u; };
  switch (op) {
    case TQSIM_A_LOAD: break;
    case TQSIM_A_STORE: case TQSIM_A_XCHG: nv = v; break;
    case TQSIM_A_ADD: nv = type == TQSIM_T_F32 ? fas(asf(cur) + asf(v)) : cur + v; break;
    case TQSIM_A_SUB: nv = type == TQSIM_T_F32 ? fas(asf(cur) - asf(v)) : cur - v; break;
    case TQSIM_A_MIN:
      nv = type == TQSIM_T_I32 ? ((int32_t)v < (int32_t)cur ? v : cur) : type == TQSIM_T_U32 ? (v < cur ? v : cur)
                                                                                              : fas(std::fmin(asf(v), asf(cur)));
      break;
    case TQSIM_A_MAX:
      nv = type == TQSIM_T_I32 ? ((int32_t)v > (int32_t)cur ? v : cur) : type == TQSIM_T_U32 ? (v > cur ? v : cur)
                                                                                              : fas(std::fmax(asf(v), asf(cur)));
      break;
    case TQSIM_A_AND: nv = cur & v; break;
    case TQSIM_A_OR: nv = cur | v; break;
    case TQSIM_A_XOR: nv = cur ^ v; break;
    case TQSIM_A_CMPXCHG: {
      uint32_t e;
      memcpy(&e, old, 4);
      ok = e == cur;
      if (ok) nv = v;
      break;
    }
  }
  memcpy(old, &cur, 4);
  memcpy(obj, &nv, 4);
  return ok;
}

int tqsim_launch(const char* host, const uint32_t grid[3], const uint32_t tg[3], int nbufs, const tqsim_buffer* bufs,
                 tqsim_buffer_stats* stats, char* err, int errlen) {
  g_error.clear();
  g_pending.active = false;
  g_kernel = host;
  g_tgid[0] = g_tgid[1] = g_tgid[2] = 0;
  auto finish = [&](int rc) {
    if (rc && err && errlen > 0) snprintf(err, (size_t)errlen, "%s", g_error.c_str());
    for (Buffer& b : g_bufs) free(b.alloc);
    g_bufs.clear();
    return rc;
  };
  const Registration* reg = nullptr;
  for (const auto& r : registry()) {
    if (r.host != host) continue;
    if (reg) {
      g_error = fmt("host name '%s' is instantiated twice (functions '%s' and '%s')", host, reg->fname.c_str(),
                    r.fname.c_str());
      return finish(2);
    }
    reg = &r;
  }
  if (!reg) {
    std::string names;
    for (const auto& r : registry()) names += (names.empty() ? "" : ", ") + r.host;
    g_error = fmt("no kernel with host name '%s' in this library (available: %s)", host, names.c_str());
    return finish(2);
  }
  int nspec = 0;
  const tqsim_kspec* specs = tqsim_glue_specs ? tqsim_glue_specs(&nspec) : nullptr;
  const tqsim_kspec* spec = nullptr;
  for (int i = 0; i < nspec; ++i)
    if (reg->fname == specs[i].function_name) spec = &specs[i];
  if (!spec || spec->nparams != reg->nparams) {
    g_error = fmt("kernel '%s': parameter table for function '%s' missing or wrong (%d parameters parsed, %d in the "
                  "C++ signature)", host, reg->fname.c_str(), spec ? spec->nparams : -1, reg->nparams);
    return finish(2);
  }
  uint64_t nth = (uint64_t)tg[0] * tg[1] * tg[2];
  if (nth == 0 || nth > kMaxThreads) {
    g_error = fmt("kernel '%s': threadgroup size %ux%ux%u must have between 1 and %u threads", host, tg[0], tg[1], tg[2],
                  kMaxThreads);
    return finish(2);
  }
  if (!ensure_arena()) { g_error = "could not map fiber stacks"; return finish(2); }
  // Guarded copies of the buffers. Buffers whose host memory overlaps (views of one tensor)
  // share one simulated allocation, so a write through one is visible through the other.
  memset(g_buf_table, 0, sizeof g_buf_table);
  std::vector<int> root(nbufs);
  for (int i = 0; i < nbufs; ++i) root[i] = i;
  auto find = [&](int i) { while (root[i] != i) i = root[i]; return i; };
  for (int i = 0; i < nbufs; ++i) {
    const tqsim_buffer& hb = bufs[i];
    if (hb.index < 0 || hb.index >= 64) { g_error = fmt("buffer index %d out of range 0..63", hb.index); return finish(2); }
    for (int j = 0; j < i; ++j) {
      if (bufs[j].index == hb.index) { g_error = fmt("buffer(%d) bound twice", hb.index); return finish(2); }
      uintptr_t a0 = (uintptr_t)hb.data, a1 = a0 + hb.size, b0 = (uintptr_t)bufs[j].data, b1 = b0 + bufs[j].size;
      if (hb.size && bufs[j].size && a0 < b1 && b0 < a1) root[find(i)] = find(j);
    }
  }
  std::vector<uintptr_t> ulo(nbufs, ~(uintptr_t)0), uhi(nbufs, 0), base(nbufs, 0);
  for (int i = 0; i < nbufs; ++i) {
    int r = find(i);
    uintptr_t a = (uintptr_t)bufs[i].data;
    if (a < ulo[r]) ulo[r] = a;
    if (a + bufs[i].size > uhi[r]) uhi[r] = a + bufs[i].size;
  }
  for (int i = 0; i < nbufs; ++i) {
    const tqsim_buffer& hb = bufs[i];
    int r = find(i);
    Buffer b{};
    b.index = hb.index;
    b.writable = hb.writable != 0;
    b.host = hb.data;
    b.size = hb.size;
    if (r == i) {
      size_t usize = uhi[r] - ulo[r];
      b.alloc = (uint8_t*)aligned_alloc(64, (usize + 2 * kRedZone + 63) / 64 * 64);
      base[r] = (uintptr_t)b.alloc + kRedZone;
      if (usize) memcpy((void*)base[r], (const void*)ulo[r], usize);
    }
    b.lo = base[r] + ((uintptr_t)hb.data - ulo[r]);
    b.hi = b.lo + hb.size;
    g_buf_table[hb.index] = (void*)b.lo;
    g_bufs.push_back(b);
  }
  for (int p = 0; p < spec->nparams; ++p) {
    int kind = spec->params[3 * p], idx = spec->params[3 * p + 1];
    if (kind == TQSIM_P_BUFFER && (idx < 0 || idx >= 64 || !g_buf_table[idx])) {
      g_error = fmt("kernel '%s': buffer(%d) is not bound", host, idx);
      return finish(2);
    }
  }
  // Threadgroup memory and image ranges.
  g_tg_lo = (uintptr_t)__start_tqsim_tg;
  g_tg_size = __start_tqsim_tg ? (uintptr_t)(__stop_tqsim_tg - __start_tqsim_tg) : 0;
  if (g_shadow.size() < g_tg_size) g_shadow.assign(g_tg_size, Shadow{});
  if (!g_img_size) {
    uintptr_t r[2] = {0, 0};
    dl_iterate_phdr(find_image, r);
    g_img_lo = r[0];
    g_img_size = r[1] - r[0];
  }
  g_thunk = reg->thunk;
  g_fn = reg->fn;
  g_spec = spec->params;
  g_nthreads = (uint32_t)nth;
  g_nsg = (g_nthreads + TQSIM_SIMD_WIDTH - 1) / TQSIM_SIMD_WIDTH;
  for (uint32_t i = 0; i < g_nthreads; ++i) {
    tqsim_thread& t = g_fibers[i].info;
    for (int d = 0; d < 3; ++d) {
      t.threads_per_threadgroup[d] = tg[d];
      t.threadgroups_per_grid[d] = grid[d];
      t.threads_per_grid[d] = tg[d] * grid[d];
    }
    t.simdgroups_per_threadgroup = g_nsg;
    t.threads_per_simdgroup = TQSIM_SIMD_WIDTH;
    t.buffers = g_buf_table;
  }
  bool ok = true;
  g_trace = getenv("TQ_SIM_TRACE") && *getenv("TQ_SIM_TRACE") == '1';
  install_handlers();
  g_active = true;
  for (uint32_t z = 0; z < grid[2] && ok; ++z)
    for (uint32_t y = 0; y < grid[1] && ok; ++y)
      for (uint32_t x = 0; x < grid[0] && ok; ++x) {
        g_tgid[0] = x; g_tgid[1] = y; g_tgid[2] = z;
        ok = run_threadgroup();
      }
  g_active = false;
  g_cur = nullptr;
  remove_handlers();
  for (size_t i = 0; i < g_bufs.size(); ++i) {
    Buffer& b = g_bufs[i];
    if (stats) {
      stats[i].index = b.index;
      stats[i].flags = 0;
      for (int p = 0; p < spec->nparams; ++p)
        if (spec->params[3 * p] == TQSIM_P_BUFFER && spec->params[3 * p + 1] == b.index)
          stats[i].flags |= (uint32_t)spec->params[3 * p + 2];
      stats[i].bytes_read = b.rd;
      stats[i].bytes_written = b.wr;
    }
    if (ok && b.writable && b.wr && b.size) memcpy(b.host, (void*)b.lo, b.size);
  }
  return finish(ok ? 0 : 1);
}

// ---- AddressSanitizer outline callbacks (the instrumented kernel code calls these) ----------
#define TQSIM_HOOK(n)                                                         \
  void __asan_load##n(uintptr_t a) { check(a, n, false); }                    \
  void __asan_store##n(uintptr_t a) { check(a, n, true); }                    \
  void __asan_load##n##_noabort(uintptr_t a) { check(a, n, false); }          \
  void __asan_store##n##_noabort(uintptr_t a) { check(a, n, true); }
TQSIM_HOOK(1)
TQSIM_HOOK(2)
TQSIM_HOOK(4)
TQSIM_HOOK(8)
TQSIM_HOOK(16)
#undef TQSIM_HOOK
void __asan_loadN(uintptr_t a, size_t n) { check(a, n, false); }
void __asan_storeN(uintptr_t a, size_t n) { check(a, n, true); }
void __asan_loadN_noabort(uintptr_t a, size_t n) { check(a, n, false); }
void __asan_storeN_noabort(uintptr_t a, size_t n) { check(a, n, true); }
void* __asan_memcpy(void* d, const void* s, size_t n) {
  if (n) { check((uintptr_t)s, n, false); check((uintptr_t)d, n, true); }
  return memcpy(d, s, n);
}
void* __asan_memmove(void* d, const void* s, size_t n) {
  if (n) { check((uintptr_t)s, n, false); check((uintptr_t)d, n, true); }
  return memmove(d, s, n);
}
void* __asan_memset(void* d, int c, size_t n) {
  if (n) check((uintptr_t)d, n, true);
  return memset(d, c, n);
}
void __asan_init(void) {}
void __asan_version_mismatch_check_v8(void) {}
void __asan_version_mismatch_check_v9(void) {}
void __asan_handle_no_return(void) {}
void __asan_register_globals(void*, size_t) {}
void __asan_unregister_globals(void*, size_t) {}
void __asan_register_elf_globals(void*, void*, void*) {}
void __asan_unregister_elf_globals(void*, void*, void*) {}
void __asan_before_dynamic_init(const char*) {}
void __asan_after_dynamic_init(void) {}

}  // extern "C"
