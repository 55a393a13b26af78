"""Shared helpers for the benchmarks: run a child and measure its process tree's memory,
drop the page cache, time `cat`, run a child under a cgroup memory cap.

Linux only (reads /proc, writes /sys/fs/cgroup).  Standard library only.
"""
from __future__ import annotations

import dataclasses
import os
import re
import resource
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------- sizes
def parse_mem(s) -> int:
    """Memory size, binary like docker/cgroups/`free`: '256M' = 256 MiB, '1G' = 1 GiB,
    '256MiB', '256MB' (also binary here), plain integer = bytes."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", str(s).upper())
    if not m:
        raise ValueError(f"bad memory size {s!r} (e.g. 256M, 1G)")
    return int(float(m.group(1)) * 1024 ** {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[m.group(2)])


_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_params(s: str) -> int:
    """'500M', '1B', '4.4B', '8B', '123456' -> int."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBGT]?)\s*", str(s).upper())
    if not m:
        raise ValueError(f"bad parameter count {s!r} (e.g. 500M, 1B, 8B)")
    return int(round(float(m.group(1)) * _SUFFIX[m.group(2)]))


def parse_size(s: str) -> int:
    """Hub-style size: '2GB' = 2e9, '2GiB' = 2*2**30, '500MB', '512MiB', plain int bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?)B?\s*", str(s).upper())
    if not m:
        raise ValueError(f"bad size {s!r} (e.g. 2GB, 500MB, 1GiB)")
    num, unit, binary = float(m.group(1)), m.group(2), bool(m.group(3))
    powers = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit]
    return int(num * (1024 if binary else 1000) ** powers)


def fmt_mib(n) -> str:
    return "-" if n is None else f"{n / MiB:.1f}"


# ----------------------------------------------------------------------------- /proc
def _children(pid: int) -> list[int]:
    """Direct children of pid (all its threads), via /proc/PID/task/TID/children."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


def _has_children_file() -> bool:
    return os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def _ppid_map() -> dict[int, list[int]]:
    """Fallback: parent -> children from every /proc/PID/stat."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        ppid = int(st[st.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_pids(root: int, use_children_file: bool | None = None) -> list[int]:
    """root and all its descendants that exist right now."""
    if use_children_file is None:
        use_children_file = _has_children_file()
    pids, todo = [], [root]
    kids = None if use_children_file else _ppid_map()
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(_children(p) if kids is None else kids.get(p, []))
    return pids


def proc_mem(pid: int) -> dict | None:
    """VmRSS / RssAnon / RssFile / RssShmem / VmHWM of one process in bytes (None if gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            txt = f.read()
    except OSError:
        return None
    out = {}
    for line in txt.splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    if "VmRSS" not in out:      # zombie / kernel thread
        return None
    return out


# ----------------------------------------------------------------------------- measured run
@dataclasses.dataclass
class RunResult:
    cmd: list
    returncode: int
    wall: float                       # seconds, spawn to reap
    peak_tree_rss: int                # bytes: max over samples of sum(VmRSS) over the tree
    peak_tree_anon: int               # RssAnon sum at that same sample
    peak_tree_file: int               # RssFile (+RssShmem) sum at that same sample
    max_tree_anon: int                # max over samples of sum(RssAnon)
    max_tree_file: int                # max over samples of sum(RssFile + RssShmem)
    max_procs: int                    # largest tree seen
    samples: int
    ru_maxrss_child: int              # bytes, wait4() rusage of this child: max over single
                                      # processes (child and its reaped descendants), not a sum
    ru_maxrss_children: int           # bytes, getrusage(RUSAGE_CHILDREN) after the run:
                                      # cumulative max over every child this process reaped
    max_vmhwm: int                    # bytes, largest VmHWM seen in /proc of any process of
                                      # the tree (a single process's own peak since its exec)
    parent_hwm: int                   # bytes, VmHWM of *this* process when it spawned the child.
                                      # Linux folds the pre-exec mm's high-water mark into the
                                      # child's ru_maxrss (vfork/fork+exec), so ru_maxrss is
                                      # never below about this value: a floor, not the child's.
    stdout: str | None = None
    stderr: str | None = None

    @property
    def ru_maxrss_polluted(self) -> bool:
        """ru_maxrss is (probably) the parent's high-water mark, not the child's own."""
        return self.ru_maxrss_child <= self.parent_hwm + 4 * MiB and \
            self.ru_maxrss_child > self.max_vmhwm + 4 * MiB

    def ru_maxrss_str(self) -> str:
        s = fmt_mib(self.ru_maxrss_child)
        return s + "*" if self.ru_maxrss_polluted else s

    def summary(self) -> str:
        return (f"rc={self.returncode} wall={self.wall:.2f}s "
                f"peak_tree_rss={fmt_mib(self.peak_tree_rss)}MiB "
                f"(anon {fmt_mib(self.peak_tree_anon)} / file {fmt_mib(self.peak_tree_file)}) "
                f"ru_maxrss={self.ru_maxrss_str()}MiB max_VmHWM={fmt_mib(self.max_vmhwm)}MiB "
                f"procs={self.max_procs} samples={self.samples}")


def run_measured(cmd, *, interval: float = 0.02, capture: bool = True, env=None, cwd=None,
                 preexec_fn=None, timeout: float | None = None,
                 discard_stdout: bool = False) -> RunResult:
    """Run cmd as a child; every `interval` s sum the RSS of the child and all its
    descendants from /proc.  With capture=True stdout/stderr are collected (through temp
    files, so a chatty child cannot block on a full pipe); otherwise they pass through.
    discard_stdout=True sends stdout to /dev/null (e.g. for `cat`)."""
    use_cf = _has_children_file()
    me = proc_mem(os.getpid()) or {}
    parent_hwm = me.get("VmHWM", 0)
    outf = tempfile.TemporaryFile() if capture else None
    errf = tempfile.TemporaryFile() if capture else None
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL if discard_stdout else outf,
                         stderr=errf, env=env, cwd=cwd, preexec_fn=preexec_fn)
    try:
        pidfd = os.pidfd_open(p.pid)
    except (AttributeError, OSError):  # Python < 3.9 or Linux < 5.3
        pidfd = None
    peak = peak_anon = peak_file = max_anon = max_file = 0
    max_procs = samples = max_hwm = 0
    status = ru = None
    try:
        while True:
            tot = anon = fil = 0
            pids = tree_pids(p.pid, use_cf)
            for pid in pids:
                m = proc_mem(pid)
                if m is None:
                    continue
                tot += m["VmRSS"]
                max_hwm = max(max_hwm, m.get("VmHWM", 0))
                anon += m.get("RssAnon", 0)
                fil += m.get("RssFile", 0) + m.get("RssShmem", 0)
            samples += 1
            max_procs = max(max_procs, len(pids))
            if tot > peak:
                peak, peak_anon, peak_file = tot, anon, fil
            max_anon = max(max_anon, anon)
            max_file = max(max_file, fil)
            wpid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if wpid == p.pid:
                break
            if timeout is not None and time.perf_counter() - t0 > timeout:
                p.kill()
            if pidfd is None:
                time.sleep(interval)
            else:  # wakes as soon as the child ends: its wall time is not rounded up to a sample
                select.select([pidfd], [], [], interval)
    except BaseException:
        if p.poll() is None:
            p.kill()
            p.wait()
        raise
    finally:
        if pidfd is not None:
            os.close(pidfd)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)   # reaped by wait4; tell Popen
    out = err = None
    if capture:
        outf.seek(0)
        errf.seek(0)
        out = outf.read().decode(errors="replace")
        err = errf.read().decode(errors="replace")
        outf.close()
        errf.close()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return RunResult(cmd=list(cmd), returncode=p.returncode, wall=wall,
                     peak_tree_rss=peak, peak_tree_anon=peak_anon, peak_tree_file=peak_file,
                     max_tree_anon=max_anon, max_tree_file=max_file, max_procs=max_procs,
                     samples=samples, ru_maxrss_child=ru.ru_maxrss * 1024,
                     ru_maxrss_children=children.ru_maxrss * 1024, max_vmhwm=max_hwm,
                     parent_hwm=parent_hwm, stdout=out, stderr=err)


# ----------------------------------------------------------------------------- page cache
def is_root() -> bool:
    return os.geteuid() == 0


def drop_caches(verbose: bool = True) -> bool:
    """sync; echo 3 > /proc/sys/vm/drop_caches.  Only as root; returns True if done."""
    if not is_root():
        if verbose:
            print("  (not root: page cache not dropped)")
        return False
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        if verbose:
            print(f"  (could not drop caches: {e})")
        return False
    return True


def cat_time(files, repeat: int = 3, warm: bool = True) -> dict:
    """Time `cat FILES > /dev/null`; best of `repeat` (after one untimed warm-up pass if
    warm=True, so the figure is the warm-cache read ceiling)."""
    files = [str(f) for f in files]
    nbytes = sum(os.path.getsize(f) for f in files)
    cmd = ["cat", *files]
    if warm:
        subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
    times = []
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t)
    best = min(times)
    return {"bytes": nbytes, "best": best, "times": times, "gb_per_s": nbytes / best / 1e9}


# ----------------------------------------------------------------------------- cgroups
class CgroupError(RuntimeError):
    pass


def _self_cgroup_paths() -> dict:
    v1 = v2 = None
    with open("/proc/self/cgroup") as f:
        for line in f:
            hid, ctrls, path = line.rstrip("\n").split(":", 2)
            if hid == "0" and ctrls == "":
                v2 = path
            elif "memory" in ctrls.split(","):
                v1 = path
    return {"v1": v1, "v2": v2}


class MemoryCap:
    """A fresh child cgroup of this process's own memory cgroup, with a hard limit.

        with MemoryCap(256 << 20) as cap:
            run_measured(cmd, preexec_fn=cap.preexec_fn)
            cap.stats()

    cgroup v1 (memory controller mounted at /sys/fs/cgroup/memory) is preferred, then
    cgroup v2 (memory.max).  Raises CgroupError with a readable reason if neither works.
    The cgroup is removed on exit.  Swap is also capped where the knob exists, so the cap
    cannot be dodged by swapping.
    """

    def __init__(self, limit: int, name: str | None = None):
        self.limit = int(limit)
        self.name = name or f"layerdiff-bench-{os.getpid()}"
        self.path = None
        self.version = None

    # -- setup
    def __enter__(self):
        if not is_root():
            raise CgroupError("needs root to create a cgroup")
        paths = _self_cgroup_paths()
        errors = []
        if paths["v1"] is not None and os.path.isdir("/sys/fs/cgroup/memory"):
            try:
                self._setup_v1(paths["v1"])
                return self
            except OSError as e:
                errors.append(f"cgroup v1: {e}")
        v2root = None
        for cand in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
            if os.path.exists(os.path.join(cand, "cgroup.controllers")):
                v2root = cand
                break
        if paths["v2"] is not None and v2root is not None:
            try:
                self._setup_v2(v2root, paths["v2"])
                return self
            except OSError as e:
                errors.append(f"cgroup v2: {e}")
        if not errors:
            errors.append("no cgroup v1 memory controller and no cgroup v2 hierarchy found")
        self._cleanup()
        raise CgroupError("; ".join(errors))

    def _setup_v1(self, rel):
        parent = "/sys/fs/cgroup/memory" + rel.rstrip("/")
        path = os.path.join(parent, self.name)
        os.mkdir(path)
        self.path, self.version = path, 1
        self._write("memory.limit_in_bytes", self.limit)
        if os.path.exists(os.path.join(path, "memory.memsw.limit_in_bytes")):
            try:
                self._write("memory.memsw.limit_in_bytes", self.limit)
            except OSError:
                pass

    def _setup_v2(self, root, rel):
        parent = root + rel.rstrip("/")
        with open(os.path.join(parent, "cgroup.controllers")) as f:
            avail = f.read().split()
        if "memory" not in avail:
            raise OSError(f"memory controller not available in {parent}")
        with open(os.path.join(parent, "cgroup.subtree_control")) as f:
            enabled = f.read().split()
        if "memory" not in enabled:
            # Fails with EBUSY if the parent holds processes (no-internal-process rule);
            # we do not move anybody else's processes around.
            with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                f.write("+memory")
        path = os.path.join(parent, self.name)
        os.mkdir(path)
        self.path, self.version = path, 2
        self._write("memory.max", self.limit)
        if os.path.exists(os.path.join(path, "memory.swap.max")):
            try:
                self._write("memory.swap.max", 0)
            except OSError:
                pass

    def _write(self, fn, value):
        with open(os.path.join(self.path, fn), "w") as f:
            f.write(f"{value}\n")

    def _read(self, fn):
        try:
            with open(os.path.join(self.path, fn)) as f:
                return f.read()
        except OSError:
            return None

    # -- use
    def preexec_fn(self):
        """For subprocess.Popen(preexec_fn=...): runs in the child before exec and moves
        it into the cgroup (like `sh -c 'echo $$ > cgroup.procs && exec CMD'`)."""
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(f"{os.getpid()}\n")

    def stats(self) -> dict:
        """Counters of the cgroup (bytes).  'peak_incl_cache' includes the page cache
        charged to the cgroup; it is not the processes' own RSS."""
        out = {"version": self.version, "limit": self.limit, "path": self.path}
        if self.version == 1:
            for k, fn in (("peak_incl_cache", "memory.max_usage_in_bytes"),
                          ("failcnt", "memory.failcnt")):
                v = self._read(fn)
                out[k] = int(v) if v else None
            oc = self._read("memory.oom_control") or ""
            m = re.search(r"oom_kill (\d+)", oc)
            out["oom_kills"] = int(m.group(1)) if m else None
        else:
            v = self._read("memory.peak")
            out["peak_incl_cache"] = int(v) if v else None
            ev = self._read("memory.events") or ""
            m = re.search(r"oom_kill (\d+)", ev)
            out["oom_kills"] = int(m.group(1)) if m else None
            m = re.search(r"^max (\d+)", ev, re.M)
            out["failcnt"] = int(m.group(1)) if m else None
        return out

    # -- teardown
    def _cleanup(self):
        if not self.path:
            return
        for _ in range(50):
            try:
                os.rmdir(self.path)
                self.path = None
                return
            except FileNotFoundError:
                self.path = None
                return
            except OSError:
                time.sleep(0.1)     # processes still exiting
        print(f"warning: could not remove cgroup {self.path}", file=sys.stderr)

    def __exit__(self, *exc):
        self._cleanup()
        return False


# ----------------------------------------------------------------------------- layerdiff
def layerdiff_cmd() -> list[str]:
    """How to start the CLI: $LAYERDIFF (shell-split) if set, else the `layerdiff` script
    next to this interpreter, else on PATH, else `python -m layerdiff`."""
    if os.environ.get("LAYERDIFF"):
        return shlex.split(os.environ["LAYERDIFF"])
    cand = os.path.join(os.path.dirname(sys.executable), "layerdiff")
    if os.access(cand, os.X_OK):
        return [cand]
    w = shutil.which("layerdiff")
    if w:
        return [w]
    return [sys.executable, "-m", "layerdiff"]


def layerdiff_available() -> tuple[bool, str]:
    cmd = layerdiff_cmd() + ["--help"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    if r.returncode != 0:
        return False, (r.stderr.strip().splitlines() or ["?"])[-1]
    return True, ""


def compile_layerdiff() -> str:
    """Byte-compile the installed layerdiff, as `pip install` does: in a source checkout
    run with PYTHONDONTWRITEBYTECODE=1, every edited module is otherwise compiled again
    at each start (~30-50 ms of a 0.5 s scan), which no installed copy pays."""
    import compileall
    import importlib.util
    spec = importlib.util.find_spec("layerdiff")
    if spec is None or not spec.submodule_search_locations:
        return "layerdiff not importable here: not byte-compiled"
    where = list(spec.submodule_search_locations)[0]
    ok = compileall.compile_dir(where, quiet=1)
    return f"byte-compiled {where}" + ("" if ok else " (some files failed)")


def run_scan(model_dir, out_json, *, max_memory=None, jobs=None, extra=(), preexec_fn=None,
             interval: float = 0.02):
    """`layerdiff scan MODEL --out OUT --quiet [--max-memory M] [--jobs N]` as a measured
    child.  Returns (RunResult, parsed result.json or None)."""
    import json
    if os.path.exists(out_json):
        os.remove(out_json)
    cmd = layerdiff_cmd() + ["scan", str(model_dir), "--out", str(out_json), "--quiet"]
    if max_memory is not None:
        cmd += ["--max-memory", str(max_memory)]
    if jobs is not None:
        cmd += ["--jobs", str(jobs)]
    cmd += list(extra)
    r = run_measured(cmd, preexec_fn=preexec_fn, interval=interval)
    doc = None
    if r.returncode == 0 and os.path.exists(out_json):
        with open(out_json) as f:
            doc = json.load(f)
    return r, doc


def checkpoint_dir(workdir, params: int, seed: int = 0) -> str:
    """Shared naming, so memory_budget / throughput / capped_run reuse each other's files."""
    return os.path.join(str(workdir), f"ck-{params / 1e9:g}B-seed{seed}")


def ensure_checkpoint(out_dir, params: int, seed: int = 0, shard_size: int = 2 * 10**9,
                      layers: int | None = None, quiet: bool = False) -> tuple[dict, bool]:
    """Generate (or reuse) a synthetic checkpoint by running make_checkpoint.py as a child,
    so that this process stays small (see RunResult.parent_hwm).  Returns (info, created),
    info being synthetic_checkpoint.json."""
    import json
    marker = os.path.join(out_dir, "synthetic_checkpoint.json")

    def snap():
        try:
            with open(marker) as f:
                return f.read()
        except OSError:
            return None

    before = snap()
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                        "make_checkpoint.py"),
           "--out", str(out_dir), "--params", str(params), "--seed", str(seed),
           "--shard-size", str(shard_size), "--reuse"]
    if layers is not None:
        cmd += ["--layers", str(layers)]
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else None)
    if r.returncode != 0:
        raise RuntimeError(f"make_checkpoint.py failed (exit {r.returncode})")
    after = snap()
    return json.loads(after), not (before is not None and before == after)


def fail_line(r: RunResult) -> str:
    """Last non-empty stderr (or stdout) line of a failed run."""
    for text in (r.stderr, r.stdout):
        lines = [ln for ln in (text or "").splitlines() if ln.strip()]
        if lines:
            return lines[-1].strip()
    return f"exit status {r.returncode}"


def shard_files(model_dir) -> list[str]:
    """The safetensors files of a checkpoint dir (index-listed shards or model.safetensors)."""
    import json
    idx = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, n) for n in names]
    return [os.path.join(model_dir, "model.safetensors")]


def machine_info() -> dict:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "ram_gib": round(mem / 2**30, 1), "cpu": cpu,
            "kernel": os.uname().release, "python": sys.version.split()[0]}


if __name__ == "__main__":   # tiny self-demo: python _proc.py CMD...
    cmd = sys.argv[1:] or [sys.executable, "-c", "import time; b=bytearray(200<<20); time.sleep(0.3)"]
    r = run_measured(cmd, capture=False)
    print(r.summary())
