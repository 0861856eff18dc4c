"""Profiles of one service process, for benchmarks (off unless IK_PROFILE_DIR is set).

With IK_PROFILE_DIR set, a service process can profile its event loop's
thread, where all of its Python work runs (gRPC servicers, consumers, the
outbox relay, SQLite statements: services/common/sqlite_driver.py). Two
profilers, both of the standard library, nothing to install:

- `sample` (the default): a CPU-time sampler. ITIMER_PROF sends SIGPROF every
  IK_PROFILE_INTERVAL_MS (1) milliseconds of the process's CPU; the handler
  (on the loop's thread) weighs the Python stack it interrupted with the CPU
  the loop's thread spent since the previous sample. Stacks are followed
  across SQLAlchemy's greenlets (a statement's frames continue into the
  coroutine that awaits it). Own time is per function and line (a C call such
  as sqlite3's execute or protobuf's SerializeToString counts on the line that
  made it); cumulative time per function. Costs a few percent. The kernel
  checks CPU timers at its tick (4 ms at HZ=250), so samples come at most
  that often; the weights keep the totals right. Each SIGPROF also wakes the
  idle loop through asyncio's wake-up pipe (`_read_from_self` in an idle
  profile is the sampler's own).
- `cprofile`: cProfile, deterministic: exact call counts (how often a
  statement is built, a message serialised, a token checked), and the SQL
  statements and commits the process sends, by kind and by text, counted by
  SQLAlchemy engine listeners. It slows Python code down 1.5-2.5x and its
  times are unreliable around greenlet switches (every SQLAlchemy async
  statement), so read its counts, and the sampler's times.

A window of profiling is written to IK_PROFILE_DIR as `<label>-<service>.*`:
`.txt` (what the window cost, the top functions by own and cumulative time,
the SQL statements by kind), `.json` (the same as data: wall time, the
process's CPU with the loop's thread apart from the others by name, the top
functions, SQL statements by kind and by text with counts and time),
`.collapsed` (sample: folded stacks weighted in microseconds, for
flamegraph.pl or speedscope) or `.prof` (cprofile: pstats data for `python -m
pstats` or snakeviz).

Windows: IK_PROFILE_FROM=start (the default) profiles from the moment the
service serves to its graceful stop (SIGTERM/SIGINT), label IK_PROFILE_LABEL
("run"), profiler IK_PROFILE_MODE ("sample"). IK_PROFILE_FROM=signal waits:
SIGUSR1 starts a window (dropping one still open), SIGUSR2 ends it and
writes it. A window's label and profiler are the words of the file
`IK_PROFILE_DIR/window` when it exists at SIGUSR1 (a benchmark writes e.g.
"chain21 cprofile" there before signalling), else "window<n>" and
IK_PROFILE_MODE. A window still open at a graceful stop is written then."""
from __future__ import annotations

import cProfile
import io
import json
import logging
import os
import pstats
import re
import signal
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

log = logging.getLogger(__name__)

ENV_DIR = "IK_PROFILE_DIR"
WINDOW_FILE = "window"
MODES = ("sample", "cprofile")
# The loop waiting for work, not working: left out of the tops.
IDLE_FUNCTIONS = ("<method 'poll' of 'select.epoll' objects>", "<method 'select' of 'select.epoll' objects>")
TOP = 40

_VERB_RE = re.compile(r"^\s*(\w+)", re.IGNORECASE)
_TABLE_RE = re.compile(r"\b(?:FROM|INTO)\s+\"?(\w+)\"?", re.IGNORECASE)


def statement_kind(sql: str) -> str:
    """'SELECT jobs', 'INSERT outbox', 'UPDATE steps', ... of one statement."""
    m = _VERB_RE.match(sql)
    if not m:
        return "?"
    verb = m.group(1).upper()
    if verb == "UPDATE":
        parts = sql.split(None, 2)
        return f"UPDATE {parts[1].strip(chr(34))}" if len(parts) > 1 else verb
    table = _TABLE_RE.search(sql)
    return f"{verb} {table.group(1)}" if table else verb


class SqlCounter:
    """The statements (executions, by kind and by text, with their time) and
    the commits and rollbacks of every SQLAlchemy engine of the process."""

    def __init__(self) -> None:
        self.by_kind: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        self.by_text: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        self._started: dict[int, float] = {}
        self.listening = False

    def _before(self, conn, cursor, statement, parameters, context, executemany):
        self._started[id(cursor)] = time.perf_counter()

    def _after(self, conn, cursor, statement, parameters, context, executemany):
        spent = time.perf_counter() - self._started.pop(id(cursor), time.perf_counter())
        text = " ".join(statement.split())
        for table, key in ((self.by_kind, statement_kind(text)), (self.by_text, text[:300])):
            entry = table[key]
            entry[0] += 1
            entry[1] += spent

    def _commit(self, conn):
        self.by_kind["COMMIT"][0] += 1

    def _rollback(self, conn):
        self.by_kind["ROLLBACK"][0] += 1

    def _events(self):
        return (("before_cursor_execute", self._before), ("after_cursor_execute", self._after),
                ("commit", self._commit), ("rollback", self._rollback))

    def listen(self) -> None:
        import sqlalchemy as sa
        if not self.listening:
            for name, fn in self._events():
                sa.event.listen(sa.engine.Engine, name, fn)
            self.listening = True

    def remove(self) -> None:
        import sqlalchemy as sa
        if self.listening:
            for name, fn in self._events():
                sa.event.remove(sa.engine.Engine, name, fn)
            self.listening = False

    def reset(self) -> None:
        self.by_kind.clear()
        self.by_text.clear()
        self._started.clear()

    def summary(self) -> dict:
        def rows(table):
            return [{"statement": k, "count": int(v[0]), "ms": round(v[1] * 1000, 2)}
                    for k, v in sorted(table.items(), key=lambda kv: -kv[1][0])]
        executed = {k: v for k, v in self.by_kind.items() if k not in ("COMMIT", "ROLLBACK")}
        return {"statements": int(sum(v[0] for v in executed.values())),
                "ms": round(sum(v[1] for v in executed.values()) * 1000, 2),
                "commits": int(self.by_kind.get("COMMIT", [0])[0]),
                "rollbacks": int(self.by_kind.get("ROLLBACK", [0])[0]),
                "by_kind": rows(self.by_kind), "by_text": rows(self.by_text)}


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of each thread of this process so far, by
    thread name ("main" for the event loop's); threads of one name add up."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = defaultdict(float)
    main = os.getpid()
    for task in Path("/proc/self/task").iterdir():
        try:
            raw = (task / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        name = "main" if int(task.name) == main else raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw.rsplit(")", 1)[1].split()
        out[name] += (int(fields[11]) + int(fields[12])) / tick
    return dict(out)


def _where(code) -> str:
    return f"{code.co_filename}:{code.co_firstlineno}({code.co_name})"


class Sampler:
    """CPU-time sampling of the main thread's Python stacks (see the module's doc)."""

    def __init__(self, interval: float):
        self.interval = interval
        self.own: dict[tuple, float] = defaultdict(float)   # (code, line) -> CPU seconds
        self.cum: dict[object, float] = defaultdict(float)  # code -> CPU seconds
        self.stacks: dict[tuple, float] = defaultdict(float)
        self.samples = 0
        self.overhead = 0.0
        self._last = 0.0
        self._previous = None
        # SQLAlchemy's asyncio runs statements in greenlets (loaded with it, not by this module).
        loaded = sys.modules.get("greenlet")
        self._getcurrent = loaded.getcurrent if loaded is not None else None

    def _handler(self, signum, frame) -> None:
        now = time.thread_time()
        weight = now - self._last
        if frame is not None and weight > 0:
            codes = []
            line = frame.f_lineno
            g = self._getcurrent() if self._getcurrent is not None else None
            while True:
                while frame is not None:
                    codes.append(frame.f_code)
                    frame = frame.f_back
                if g is None:
                    break
                g = g.parent  # a greenlet's first frame continues where its parent switched to it
                if g is None or g.gr_frame is None:
                    break
                frame = g.gr_frame
            self.samples += 1
            self.own[(codes[0], line)] += weight
            for code in set(codes):
                self.cum[code] += weight
            self.stacks[tuple(codes)] += weight
        self._last = time.thread_time()
        self.overhead += self._last - now

    def start(self) -> None:
        self._previous = signal.signal(signal.SIGPROF, self._handler)
        self._last = time.thread_time()
        signal.setitimer(signal.ITIMER_PROF, self.interval, self.interval)

    def stop(self) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, self._previous or signal.SIG_DFL)

    def functions(self, top: int = TOP) -> dict:
        own_fn: dict[object, float] = defaultdict(float)
        lines: dict[object, list] = defaultdict(list)
        for (code, line), seconds in self.own.items():
            own_fn[code] += seconds
            lines[code].append((seconds, line))

        def row(code):
            return {"function": _where(code), "own_s": round(own_fn.get(code, 0.0), 6),
                    "cum_s": round(self.cum.get(code, 0.0), 6),
                    "lines": [[line, round(s, 6)] for s, line in sorted(lines.get(code, []), key=lambda sl: -sl[0])[:3]]}
        by_own = sorted(own_fn, key=lambda c: -own_fn[c])[:top]
        by_cum = sorted(self.cum, key=lambda c: -self.cum[c])[:top * 3]
        return {"by_own": [row(c) for c in by_own], "by_cum": [row(c) for c in by_cum],
                "sampled_s": round(sum(self.own.values()), 6)}

    def collapsed(self) -> str:
        out = []
        for codes, seconds in sorted(self.stacks.items(), key=lambda kv: -kv[1]):
            names = ";".join(f"{c.co_name} ({Path(c.co_filename).name}:{c.co_firstlineno})" for c in reversed(codes))
            out.append(f"{names} {int(seconds * 1e6)}")
        return "\n".join(out) + "\n"


class ServiceProfiler:
    def __init__(self, service: str, directory: Path, from_start: bool, label: str, mode: str, interval: float):
        self.service = service
        self.directory = directory
        self.from_start = from_start
        self.first_label = label
        self.default_mode = mode
        self.interval = interval
        self.sql = SqlCounter()
        self.label = label
        self.mode = mode
        self.windows = 0
        self.profile: cProfile.Profile | None = None
        self.sampler: Sampler | None = None
        self._mark = None

    @classmethod
    def from_env(cls, service: str, env) -> "ServiceProfiler | None":
        directory = env.get(ENV_DIR, "")
        if not directory:
            return None
        start = env.get("IK_PROFILE_FROM", "start")
        mode = env.get("IK_PROFILE_MODE", "sample")
        if start not in ("start", "signal") or mode not in MODES:
            raise ValueError("IK_PROFILE_FROM is start or signal, IK_PROFILE_MODE sample or cprofile")
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        return cls(service, path, start == "start", env.get("IK_PROFILE_LABEL", "run"), mode,
                   float(env.get("IK_PROFILE_INTERVAL_MS", "1")) / 1000)

    @property
    def running(self) -> bool:
        return self._mark is not None

    def install(self, loop) -> None:
        """SIGUSR1 starts a window, SIGUSR2 ends and writes it (both on the loop's thread)."""
        loop.add_signal_handler(signal.SIGUSR1, self.start)
        loop.add_signal_handler(signal.SIGUSR2, self.stop)

    def serving(self) -> None:
        """The service serves: with IK_PROFILE_FROM=start, the window opens now."""
        if self.from_start:
            self.start(self.first_label, self.default_mode)

    def _disable(self) -> None:
        if self.profile is not None:
            self.profile.disable()
        if self.sampler is not None:
            self.sampler.stop()
        self.sql.remove()

    def start(self, label: str | None = None, mode: str | None = None) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("profiling runs on the event loop's (main) thread")
        self._disable()
        self.windows += 1
        if label is None:
            window = self.directory / WINDOW_FILE
            words = window.read_text().split() if window.exists() else []
            label = words[0] if words else f"window{self.windows}"
            mode = words[1] if len(words) > 1 else None
        self.label = re.sub(r"[^A-Za-z0-9_.-]", "_", label)
        self.mode = mode if mode in MODES else self.default_mode
        self.sql.reset()
        if self.mode == "cprofile":  # the sampler's windows stay as the service runs: no SQLAlchemy listeners
            self.sql.listen()
        self.profile = self.sampler = None
        self._mark = (time.perf_counter(), os.times(), thread_cpu())
        if self.mode == "cprofile":
            self.profile = cProfile.Profile()
            self.profile.enable()
        else:
            self.sampler = Sampler(self.interval)
            self.sampler.start()
        log.warning("profiling %s: window %r (%s) started", self.service, self.label, self.mode)

    def stop(self) -> None:
        """Ends the open window (if any) and writes its files."""
        if self._mark is None:
            return
        self._disable()
        wall0, times0, threads0 = self._mark
        self._mark = None
        wall, times, threads = time.perf_counter() - wall0, os.times(), thread_cpu()
        base = self.directory / f"{self.label}-{self.service}"
        meta = {
            "service": self.service, "label": self.label, "mode": self.mode, "wall_s": round(wall, 3),
            "cpu_user_s": round(times.user - times0.user, 3), "cpu_system_s": round(times.system - times0.system, 3),
            "thread_cpu_s": {k: round(v - threads0.get(k, 0.0), 3) for k, v in sorted(threads.items())
                             if v - threads0.get(k, 0.0) > 0},
            "sql": self.sql.summary(),
        }
        if self.profile is not None:
            profile, self.profile = self.profile, None
            profile.dump_stats(f"{base}.prof")
            meta.update(_cprofile_tops(profile))
            text = _cprofile_text(profile, meta)
        else:
            sampler, self.sampler = self.sampler, None
            meta.update(samples=sampler.samples, sampler_overhead_s=round(sampler.overhead, 4),
                        interval_ms=self.interval * 1000, **sampler.functions())
            Path(f"{base}.collapsed").write_text(sampler.collapsed())
            text = _sample_text(meta)
        Path(f"{base}.json").write_text(json.dumps(meta, indent=1))
        Path(f"{base}.txt").write_text(text + (_sql_text(meta) if self.mode == "cprofile" else ""))
        log.warning("profiling %s: window %r written to %s.*", self.service, self.label, base)

    def close(self) -> None:
        """At a graceful stop: the open window is written."""
        self.stop()


def _head(meta: dict) -> str:
    cpu = meta["cpu_user_s"] + meta["cpu_system_s"]
    sql = meta["sql"]
    counted = (f"; {sql['statements']} SQL statements ({sql['ms']:.1f} ms), {sql['commits']} commits, "
               f"{sql['rollbacks']} rollbacks") if meta["mode"] == "cprofile" else ""
    return (f"{meta['service']} / {meta['label']} ({meta['mode']}): wall {meta['wall_s']:.3f} s, process CPU "
            f"{cpu:.3f} s (by thread: {meta['thread_cpu_s']}){counted}\n")


def _sample_text(meta: dict) -> str:
    out = io.StringIO()
    out.write(_head(meta))
    out.write(f"{meta['samples']} samples every {meta['interval_ms']:g} ms of CPU, {meta['sampled_s']:.3f} s of the "
              f"loop thread's CPU attributed (sampler's own cost {meta['sampler_overhead_s']:.3f} s, left out)\n\n")
    for key, title in (("by_own", "own CPU (the function's lines, C calls they make included)"),
                       ("by_cum", "cumulative CPU")):
        out.write(f"=== top by {title} ===\n{'own ms':>9} {'cum ms':>9}  function  [hottest lines: ms]\n")
        for row in meta[key][:TOP]:
            lines = ", ".join(f"{line}: {s * 1000:.1f}" for line, s in row["lines"])
            out.write(f"{row['own_s'] * 1000:9.1f} {row['cum_s'] * 1000:9.1f}  {row['function']}  [{lines}]\n")
        out.write("\n")
    return out.getvalue()


def _cprofile_tops(profile: cProfile.Profile) -> dict:
    stats = pstats.Stats(profile).stats

    def row(key, value):
        cc, nc, tt, ct, _ = value
        return {"function": f"{key[0]}:{key[1]}({key[2]})", "calls": nc, "primitive_calls": cc,
                "own_s": round(tt, 6), "cum_s": round(ct, 6)}
    work = {k: v for k, v in stats.items() if k[2] not in IDLE_FUNCTIONS}
    return {"calls": sum(v[1] for v in stats.values()),
            "by_calls": [row(k, v) for k, v in sorted(work.items(), key=lambda kv: -kv[1][1])[:TOP * 3]],
            "by_own": [row(k, v) for k, v in sorted(work.items(), key=lambda kv: -kv[1][2])[:TOP * 3]]}


def _cprofile_text(profile: cProfile.Profile, meta: dict) -> str:
    out = io.StringIO()
    out.write(_head(meta))
    out.write(f"{meta['calls']} calls profiled (cProfile: trust the counts; its times are inflated and skewed "
              f"around greenlet switches)\n\n")
    for order, title in (("calls", "calls"), ("tottime", "own time")):
        out.write(f"=== top {TOP} by {title} (epoll waits left out) ===\n")
        buf = io.StringIO()
        s = pstats.Stats(profile, stream=buf)
        for key in [k for k in s.stats if k[2] in IDLE_FUNCTIONS]:
            del s.stats[key]
        s.sort_stats(order).print_stats(TOP)
        text = buf.getvalue()
        out.write(text[text.find("   ncalls"):] if "   ncalls" in text else text)
        out.write("\n")
    return out.getvalue()


def _sql_text(meta: dict) -> str:
    out = io.StringIO()
    out.write("=== SQL statements by kind (count, time) ===\n")
    for row in meta["sql"]["by_kind"]:
        out.write(f"{row['count']:8d} {row['ms']:9.1f} ms  {row['statement']}\n")
    out.write("\n=== SQL statements by text (top 30) ===\n")
    for row in meta["sql"]["by_text"][:30]:
        out.write(f"{row['count']:8d} {row['ms']:9.1f} ms  {row['statement'][:200]}\n")
    return out.getvalue()
