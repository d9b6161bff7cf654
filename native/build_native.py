"""cffi builder for ringd._native (API mode, compiled at install time).

The cdef is ringd_api.h itself, the header the C files include, so Python and
C can never disagree about a struct.
"""
import os
import subprocess

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["ring.c", "listener.c", "conn.c", "forward.c", "idle.c", "writable.c", "pipes.c", "bufring.c",
           "balance.c", "control.c", "handover.c", "events.c", "worker.c", "tls_hello.c",
           "proxy_recv.c", "proxy_send.c", "srclimit.c", "policy.c", "preconnect.c"]


def _liburing_version():
    """(major, minor) of the liburing we build against, from pkg-config."""
    try:
        out = subprocess.run(
            ["pkg-config", "--modversion", "liburing"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        major, minor = out.split(".")[:2]
        return int(major), int(minor)
    except (OSError, subprocess.CalledProcessError, ValueError):
        return 2, 3


def _make():
    ffi = FFI()
    with open(os.path.join(HERE, "ringd_api.h")) as f:
        ffi.cdef(f.read())
    major, minor = _liburing_version()
    # relative paths: setuptools insists on them for sources
    rel = os.path.relpath(HERE)
    ffi.set_source(
        "ringd._native",
        '#include "ringd.h"\n',
        sources=[os.path.join(rel, s) for s in SOURCES],
        include_dirs=[rel],
        libraries=["uring", "m"],
        define_macros=[
            ("RINGD_LIBURING_MAJOR", str(major)),
            ("RINGD_LIBURING_MINOR", str(minor)),
        ],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                            "-fno-strict-aliasing"],
    )
    return ffi


ffibuilder = _make()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
