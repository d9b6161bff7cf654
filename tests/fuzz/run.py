"""`make fuzz`: a longer fuzzing run of the first-bytes parsers
(native/tls_hello.c, native/proxy_recv.c); not part of `make test`.

With clang and libFuzzer installed, parsers_fuzz.c is built as a libFuzzer
target (ASan + UBSan) and run on a seed corpus from tests/parser_corpus.py.
Without clang, the same driver is built with gcc's sanitizers and mutates
that corpus itself (bit flips, cuts, splices, length bytes) for as long.
Either way any sanitizer report or contract violation fails the run, and the
input that caused it is kept (libFuzzer: crash-* files in the work
directory; gcc: the driver prints the input index and aborts).

    python3 tests/fuzz/run.py [--seconds 60] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
NATIVE = ROOT / "native"
sys.path.insert(0, str(HERE.parent))

import parser_corpus as pc  # noqa: E402

SOURCES = [str(HERE / "parsers_fuzz.c"), str(NATIVE / "tls_hello.c"),
           str(NATIVE / "proxy_recv.c")]
FLAGS = ["-std=gnu11", "-g", "-O1", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all",
         f"-I{NATIVE}"]


def have_libfuzzer(work: Path) -> bool:
    if not shutil.which("clang"):
        return False
    probe = work / "probe.c"
    probe.write_text("#include <stdint.h>\n#include <stddef.h>\n"
                     "int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n)"
                     " { (void)d; (void)n; return 0; }\n")
    r = subprocess.run(["clang", "-fsanitize=fuzzer", str(probe), "-o", str(work / "probe")],
                       capture_output=True)
    return r.returncode == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ringd-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = pc.tls_corpus(seed=101, count=3000) + pc.proxy_corpus(seed=102, count=3000)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1", UBSAN_OPTIONS="print_stacktrace=1")

    if have_libfuzzer(work):
        seeds = work / "corpus"
        seeds.mkdir(exist_ok=True)
        for i, data in enumerate(corpus):
            (seeds / f"seed-{i:05d}").write_bytes(data)
        exe = work / "parsers_libfuzzer"
        subprocess.run(["clang", "-DRINGD_LIBFUZZER", "-fsanitize=fuzzer,address,undefined",
                        *FLAGS, *SOURCES, "-o", str(exe)], check=True)
        print(f"libFuzzer for {args.seconds:.0f} s, work directory {work}", flush=True)
        r = subprocess.run([str(exe), f"-max_total_time={int(args.seconds)}",
                            f"-max_len={3 * pc.TLS_MAX_EXAMINED}", str(seeds)],
                           cwd=work, env=env)
        return r.returncode

    exe = work / "parsers_fuzz"
    subprocess.run(["gcc", "-fsanitize=address,undefined", *FLAGS, *SOURCES, "-o", str(exe)],
                   check=True)
    pack = work / "corpus.pack"
    with open(pack, "wb") as f:
        for data in corpus:
            f.write(struct.pack("<I", len(data)) + data)
    print(f"clang/libFuzzer not installed: gcc sanitizer build mutating {len(corpus)} inputs "
          f"for {args.seconds:.0f} s, work directory {work}", flush=True)
    r = subprocess.run([str(exe), "--mutate", str(args.seconds), str(pack)], env=env)
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
