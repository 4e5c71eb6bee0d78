"""Run one harness: `python -m fuzz.run NAME [--seconds S | --runs N] [--replay]`.

Default (atheris, coverage-guided): the committed corpus fuzz/corpus/NAME/ seeds it (read
only); new interesting inputs go to cache/fuzz/corpus/NAME/; a crash is saved to
fuzz/findings/NAME-<sha1>.bin and the run fails. `--replay` runs without atheris: every
corpus file, then N deterministic mutations of them (the mutation check uses this).
Either way, executions and crashes go to cache/fuzz/NAME.json (`make security-report`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import random
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
FINDINGS = ROOT / "fuzz" / "findings"
CACHE = ROOT / "cache" / "fuzz"
STATS_EVERY = 0.5  # seconds between stats writes while fuzzing


class Stats:
    def __init__(self, name: str, mode: str) -> None:
        self.path = CACHE / f"{name}.json"
        self.doc: dict[str, object] = {"harness": name, "mode": mode, "executions": 0,
                                       "crashes": 0, "seconds": 0.0,
                                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                time.gmtime())}
        self.t0 = time.monotonic()
        self.last = 0.0
        self.executions = 0
        # libFuzzer ends the process without running Python's exit handlers: near the end
        # of a bounded run, write after every execution.
        self.runs: int | None = None
        self.seconds: float | None = None

    def _ending(self, now: float) -> bool:
        if self.runs is not None and self.executions >= self.runs - 2:
            return True
        return self.seconds is not None and now - self.t0 >= self.seconds - 2 * STATS_EVERY

    def tick(self, force: bool = False) -> None:
        self.executions += 1
        now = time.monotonic()
        if force or now - self.last >= STATS_EVERY or self._ending(now):
            self.write()
            self.last = now

    def write(self, **extra: object) -> None:
        self.doc.update(executions=self.executions,
                        seconds=round(time.monotonic() - self.t0, 2), **extra)
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path)


def save_finding(name: str, data: bytes) -> Path:
    FINDINGS.mkdir(parents=True, exist_ok=True)
    path = FINDINGS / f"{name}-{hashlib.sha1(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    return path


def corpus_files(name: str) -> list[Path]:
    d = CORPUS / name
    return sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []


def load(name: str, instrument: bool) -> ModuleType:
    if not instrument:
        return importlib.import_module(f"fuzz.harnesses.{name}")
    import atheris

    with atheris.instrument_imports(include=["isovisor", "fuzz"]):
        return importlib.import_module(f"fuzz.harnesses.{name}")


def wrap(name: str, fn: Callable[[bytes], None], stats: Stats) -> Callable[[bytes], None]:
    def one(data: bytes) -> None:
        try:
            fn(data)
        except BaseException:
            path = save_finding(name, bytes(data))
            stats.doc["crashes"] = int(stats.doc["crashes"]) + 1  # type: ignore[call-overload]
            stats.doc["finding"] = str(path.relative_to(ROOT))
            stats.doc["result"] = "crash"
            stats.tick(force=True)
            sys.stderr.write(f"fuzz {name}: finding saved to {path}\n")
            raise
        stats.tick()

    return one


def mutate(rng: random.Random, seed: bytes, others: list[bytes]) -> bytes:
    b = bytearray(seed)
    for _ in range(1 + rng.randrange(4)):
        op = rng.randrange(6)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[rng.randrange(len(b))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:
            at = rng.randrange(len(b) + 1)
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif op == 3 and len(b) > 1:
            i = rng.randrange(len(b))
            del b[i:i + rng.randrange(1, 9)]
        elif op == 4 and others:
            o = rng.choice(others)
            i = rng.randrange(len(b) + 1)
            b[i:] = o[rng.randrange(len(o) + 1):]
        elif b:
            i = rng.randrange(len(b))
            width = rng.choice((2, 4, 8))
            value = rng.choice((0, 1, 0xFF, 0x7FFF, 0xFFFF, 0xFFFF_FFFF, 1 << 31))
            b[i:i + width] = value.to_bytes(8, "little")[:width]
    return bytes(b)


def replay(name: str, runs: int, seed: int) -> int:
    module = load(name, instrument=False)
    stats = Stats(name, "replay")
    one = wrap(name, module.one_input, stats)
    if hasattr(module, "setup"):
        module.setup()
    seeds = [p.read_bytes() for p in corpus_files(name)] or [b""]
    rng = random.Random(seed)
    try:
        for data in seeds:
            one(data)
        for _ in range(runs):
            one(mutate(rng, rng.choice(seeds), seeds))
    except BaseException:
        traceback.print_exc()
        stats.write(result="crash")
        return 1
    stats.write(result="ok")
    return 0


def fuzz(name: str, runs: int | None, seconds: float | None, mode: str) -> int:
    import atheris

    module = load(name, instrument=True)
    stats = Stats(name, mode)
    stats.runs, stats.seconds = runs, seconds
    if hasattr(module, "setup"):
        module.setup()
    # CI starts from the committed corpus alone (a slice must not depend on what earlier
    # local runs found); `make fuzz` keeps growing its own corpus across runs.
    scratch = CACHE / ("ci-corpus" if mode == "ci" else "corpus") / name
    if mode == "ci":
        shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True, exist_ok=True)
    artifacts = CACHE / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    args = [sys.argv[0], str(scratch), str(CORPUS / name), f"-artifact_prefix={artifacts}/",
            "-rss_limit_mb=4096", "-timeout=30", "-print_final_stats=1"]
    if mode == "ci":
        args.append("-seed=1")  # CI is reproducible; `make fuzz` explores
    if runs is not None:
        args.append(f"-runs={runs}")
    if seconds is not None:
        args.append(f"-max_total_time={max(1, int(seconds))}")
    atheris.Setup(args, wrap(name, module.one_input, stats))
    stats.write(result="ok")  # a crash rewrites it; atheris.Fuzz() never returns
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n\n")[0])
    p.add_argument("name")
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--replay", action="store_true", help="no atheris: corpus + mutations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default="fuzz", help="recorded in the stats (fuzz, ci)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.replay:
        return replay(args.name, args.runs if args.runs is not None else 300, args.seed)
    return fuzz(args.name, args.runs, args.seconds, args.mode)


if __name__ == "__main__":
    sys.exit(main())
