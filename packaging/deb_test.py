#!/usr/bin/python3
# Over 450 lines: one self-contained script for Debian's bare python3 (no pytest there).
"""Acceptance test of the ringd Debian package (`make deb-test`).

Installs the built package the way an operator would and checks what issue 6
asks for, on this machine, as root:

  install     apt-get install ./ringd_*.deb pulls Debian's dependencies, no pip
  files       binary, conffile, unit, sysctl.d, man pages, copyright, user
  unit        systemd-analyze verify passes on the installed unit
  check       ringd check -c /etc/ringd/ringd.toml passes (the unit's ExecStartPre)
  start       the unit's ExecStart, run by hand with the unit's capability
              bounding set and NoNewPrivileges and NOTIFY_SOCKET pointing at a
              datagram socket of ours, sends READY=1
  workers     every worker runs as user/group ringd, the master as root
  traffic     bytes through the listener to a local backend come back intact
              (SHA-256), small and bulk (spliced) transfers
  reload      SIGHUP: RELOADING=1 then READY=1, new workers, traffic still fine;
              the unit's ExecReload reports success and, for a broken file,
              rejection (exit 1) while the old generation keeps serving
  stop        the unit's KillSignal (SIGQUIT) drains: a connection open at the
              signal still completes, then the master exits 0
  upgrade     installing the next version while a master runs under load
              upgrades it in place (the postinst runs `ringd upgrade`):
              zero failed connections, a long stream intact, the master pid
              unchanged, the master and the workers of the new generation
              run the new package version, RELOADING=1/READY=1 around it,
              an edited conffile survives; a reinstall while the file has a
              key the new version rejects refuses the in-place upgrade, says
              so, does not restart, and the running master serves on
  remove      dpkg -r keeps the conffile; dpkg -P removes it, the user, logs,
              and leaves nothing behind that no package owns

There is no systemd as PID 1 here, so the service is never started through
systemctl; on a host where systemd runs, the package would start the
service itself on installation, so this test refuses to run there (exit 77).

Usage: deb_test.py --deb ringd_V1.deb --upgrade-deb ringd_V2.deb
Exit status: 0 all passed, 1 a check failed, 77 cannot run here.
"""
from __future__ import annotations

import argparse
import array
import hashlib
import json
import os
import pwd
import grp
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib

CONFFILE = "/etc/ringd/ringd.toml"
UNIT = "/lib/systemd/system/ringd.service"
SYSCTL = "/usr/lib/sysctl.d/60-ringd.conf"
DEPENDS = ["python3-structlog", "python3-setproctitle", "python3-prometheus-client",
           "python3-cffi-backend", "liburing2", "adduser"]
# The environment systemd gives a service, near enough: nothing from our shell.
SERVICE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LANG": "C.UTF-8"}
# Snapshot roots for the leftover check, and the package-manager state under
# them that changes with any installation and is not ringd's to clean up.
SNAP_ROOTS = ["/etc", "/usr", "/var", "/run", "/opt", "/srv"]
SNAP_SKIP = ["/var/lib/dpkg", "/var/lib/apt", "/var/cache/apt", "/var/cache/debconf",
             "/var/log/apt", "/var/cache/man", "/var/cache/ldconfig", "/var/tmp",
             "/run/user", "/run/lock", "/usr/src"]


class Failed(Exception):
    pass


class Test:
    def __init__(self, deb: str, upgrade_deb: str, keep: bool):
        self.deb = os.path.abspath(deb)
        self.upgrade_deb = os.path.abspath(upgrade_deb)
        self.keep = keep
        self.passed = 0
        self.failed = 0
        self.tmp = tempfile.mkdtemp(prefix="ringd-deb-test.")
        self.procs: list[subprocess.Popen] = []
        self.backend: Backend | None = None
        self.sysctl_saved: dict[str, str] = {}
        self.notify: Notify | None = None
        self.master: subprocess.Popen | None = None

    # ------------------------------------------------------------ reporting

    def step(self, name: str, fn) -> bool:
        t0 = time.monotonic()
        try:
            detail = fn()
        except Failed as e:
            self.failed += 1
            print(f"FAIL  {name}: {e}", flush=True)
            return False
        except Exception as e:  # a bug in a step is a failure, not a crash
            self.failed += 1
            print(f"FAIL  {name}: {type(e).__name__}: {e}", flush=True)
            return False
        self.passed += 1
        took = time.monotonic() - t0
        print(f"PASS  {name} ({took:.1f}s){': ' + detail if detail else ''}", flush=True)
        return True

    # ------------------------------------------------------------ helpers

    def run(self, argv, *, ok=(0,), env=None, timeout=300, cwd=None) -> subprocess.CompletedProcess:
        r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout,
                           cwd=cwd, stdin=subprocess.DEVNULL)
        if ok is not None and r.returncode not in ok:
            raise Failed(f"{' '.join(map(str, argv))} exited {r.returncode}\n"
                         f"{_indent(r.stdout)}{_indent(r.stderr)}")
        return r

    def apt_env(self) -> dict:
        return dict(SERVICE_ENV, DEBIAN_FRONTEND="noninteractive")

    def unit(self) -> dict[str, list[str]]:
        keys: dict[str, list[str]] = {}
        with open(UNIT) as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith(("#", ";", "[")) or "=" not in line:
                    continue
                k, v = line.split("=", 1)
                keys.setdefault(k.strip(), []).append(v.strip())
        return keys

    def unit_cmd(self, key: str) -> list[str]:
        values = self.unit().get(key)
        if not values:
            raise Failed(f"{UNIT} has no {key}=")
        argv = shlex.split(values[-1])
        while argv and argv[0][:1] in "-@+!:":   # systemd's command prefixes
            argv[0] = argv[0][1:]
        return argv

    def config(self) -> dict:
        with open(CONFFILE, "rb") as f:
            return tomllib.load(f)

    def addresses(self) -> tuple[tuple[str, int], tuple[str, int]]:
        cfg = self.config()
        lst = cfg["listener"][0]
        server = cfg["upstream"][lst["upstream"]]["servers"][0]
        if isinstance(server, dict):
            server = server["address"]
        return _split(lst["listen"]), _split(server)

    def ringd_ids(self) -> tuple[int, int]:
        return pwd.getpwnam("ringd").pw_uid, grp.getgrnam("ringd").gr_gid

    def dpkg_status(self) -> str:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status} ${Version}", "ringd"],
                           capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    # ------------------------------------------------------------ preflight

    def preflight(self) -> int | None:
        if os.geteuid() != 0:
            print("SKIP  deb-test must run as root (it installs and removes a package)")
            return 77
        for tool in ("dpkg", "dpkg-query", "apt-get", "setpriv"):
            if not shutil.which(tool, path=SERVICE_ENV["PATH"]):
                print(f"SKIP  {tool} not found: this test needs a Debian system")
                return 77
        if os.path.isdir("/run/systemd/system"):
            print("SKIP  systemd runs as PID 1 here: the package would start ringd.service "
                  "itself; run this test in a container without systemd")
            return 77
        for deb in (self.deb, self.upgrade_deb):
            if not os.path.isfile(deb):
                print(f"FAIL  no package at {deb} (run make deb first)")
                return 1
        if self.dpkg_status():
            print(f"NOTE  ringd is installed ({self.dpkg_status()}); purging it first")
            self.run(["dpkg", "--purge", "ringd"], env=self.apt_env())
        if not shutil.which("systemd-analyze", path=SERVICE_ENV["PATH"]):
            print("NOTE  installing systemd for systemd-analyze (the unit check)")
            self.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "systemd"],
                     env=self.apt_env(), timeout=900)
        return None

    # ------------------------------------------------------------ steps

    def s_install(self):
        self.snapshot_before = snapshot()
        for key in ("fs.pipe-user-pages-soft", "net.ipv4.tcp_migrate_req"):
            self.sysctl_saved[key] = _sysctl_read(key)
        d = os.path.dirname(self.deb)
        r = self.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                      "./" + os.path.basename(self.deb)], cwd=d, env=self.apt_env(), timeout=900)
        if r.returncode != 0 and "Unable to locate" in r.stderr:
            self.run(["apt-get", "update", "-q"], env=self.apt_env(), timeout=900)
            r = self.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                          "./" + os.path.basename(self.deb)], cwd=d, env=self.apt_env(),
                         timeout=900)
        bad = [ln for ln in (r.stdout + r.stderr).splitlines()
               if re.match(r"^(E|W):|dpkg: (error|warning)", ln)]
        if bad:
            raise Failed("apt-get install reported:\n" + _indent("\n".join(bad)))
        status = self.dpkg_status()
        if not status.startswith("install ok installed"):
            raise Failed(f"dpkg status after install: {status!r}")
        return status

    def s_dependencies(self):
        for pkg in DEPENDS:
            r = self.run(["dpkg-query", "-W", "-f=${Status} ${Version}", pkg], ok=None)
            if not r.stdout.startswith("install ok installed"):
                raise Failed(f"dependency {pkg} is not installed: {r.stdout!r}")
        # Debian's modules, seen exactly as /usr/bin/ringd sees them
        code = ("import structlog, setproctitle, prometheus_client, _cffi_backend, ringd, "
                "ringd._native as n; "
                "print('\\n'.join(m.__file__ for m in (structlog, setproctitle, "
                "prometheus_client, _cffi_backend, ringd, n)))")
        r = self.run(["/usr/bin/python3", "-I", "-c", code], env=SERVICE_ENV)
        files = r.stdout.split()
        for path in files:
            if not path.startswith("/usr/lib/python3/dist-packages/"):
                raise Failed(f"module loaded from outside Debian's dist-packages: {path}")
            owner = self.run(["dpkg-query", "-S", path], ok=None).stdout.split(":")[0]
            if not owner:
                raise Failed(f"{path} belongs to no Debian package (pip?)")
        depends = self.run(["dpkg-query", "-W", "-f=${Depends}", "ringd"]).stdout
        return f"Depends: {depends}"

    def s_files(self):
        listed = set(self.run(["dpkg-query", "-L", "ringd"]).stdout.split("\n"))
        want = ["/usr/bin/ringd", CONFFILE, UNIT, SYSCTL, "/usr/share/man/man8/ringd.8.gz",
                "/usr/share/man/man5/ringd.toml.5.gz", "/usr/share/doc/ringd/copyright",
                "/usr/share/doc/ringd/changelog.Debian.gz", "/etc/logrotate.d/ringd",
                "/usr/share/doc/ringd/examples/ringd.toml"]
        for path in want:
            if path not in listed or not os.path.exists(path):
                raise Failed(f"{path} is not installed by the package")
        conffiles = self.run(["dpkg-query", "-W", "-f=${Conffiles}", "ringd"]).stdout
        if CONFFILE not in conffiles:
            raise Failed(f"{CONFFILE} is not a conffile: {conffiles!r}")
        for page in ("/usr/share/man/man8/ringd.8.gz", "/usr/share/man/man5/ringd.toml.5.gz"):
            if shutil.which("man", path=SERVICE_ENV["PATH"]):
                r = self.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", page],
                             env=dict(SERVICE_ENV, MANWIDTH="80"))
                if r.stderr.strip():
                    raise Failed(f"man {page}: {r.stderr.strip()}")
        pw = pwd.getpwnam("ringd")
        if pw.pw_uid >= 1000 or pw.pw_uid == 0:
            raise Failed(f"user ringd has uid {pw.pw_uid}, not a system uid")
        if not pw.pw_shell.endswith("nologin") or pw.pw_dir != "/nonexistent":
            raise Failed(f"user ringd: shell {pw.pw_shell}, home {pw.pw_dir}")
        if os.path.exists(pw.pw_dir):
            raise Failed(f"home {pw.pw_dir} exists")
        gid = grp.getgrnam("ringd").gr_gid
        return f"{len(want)} files, conffile {CONFFILE}, user ringd uid {pw.pw_uid} gid {gid}"

    def s_sysctl(self):
        wanted = {}
        with open(SYSCTL) as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                if "=" in line:
                    k, v = (x.strip() for x in line.split("=", 1))
                    wanted[k] = v
        if set(wanted) != {"net.ipv4.tcp_migrate_req", "fs.pipe-user-pages-soft"}:
            raise Failed(f"unexpected keys in {SYSCTL}: {sorted(wanted)}")
        now = {k: _sysctl_read(k) for k in wanted}
        if now != wanted:
            if not os.access("/proc/sys/fs/pipe-user-pages-soft", os.W_OK):
                return f"/proc/sys is read-only here; not applied ({now})"
            raise Failed(f"postinst did not apply {SYSCTL}: running values {now}, file {wanted}")
        return ", ".join(f"{k} = {v}" for k, v in now.items())

    def s_unit(self):
        r = self.run(["systemd-analyze", "verify", UNIT], ok=None, env=SERVICE_ENV)
        mine = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
        if r.returncode != 0 or mine:
            raise Failed(f"systemd-analyze verify exited {r.returncode}:\n" + _indent("\n".join(mine)))
        u = self.unit()
        expect = {
            "Type": "notify",
            "ExecStartPre": "/usr/bin/ringd check -c /etc/ringd/ringd.toml",
            "ExecStart": "/usr/bin/ringd start -c /etc/ringd/ringd.toml",
            "ExecReload": "/usr/bin/ringd reload -c /etc/ringd/ringd.toml",
            "Restart": "on-failure", "RuntimeDirectory": "ringd", "NotifyAccess": "main",
            "KillSignal": "SIGQUIT",
        }
        for k, v in expect.items():
            if u.get(k, [None])[-1] != v:
                raise Failed(f"{k}={u.get(k)} in {UNIT}, expected {v}")
        return "verify clean; " + ", ".join(f"{k}={u[k][-1]}" for k in ("Type", "KillSignal",
                                                                         "TimeoutStopSec"))

    def s_check(self):
        r = self.run(self.unit_cmd("ExecStartPre"), env=SERVICE_ENV)
        return r.stdout.strip()

    def start_master(self, tag: str) -> subprocess.Popen:
        """ExecStart as the unit runs it: the same argv, the unit's capability
        bounding set and NoNewPrivileges (setpriv), a service-like environment,
        RuntimeDirectory created, NOTIFY_SOCKET at a datagram socket of ours."""
        u = self.unit()
        caps = u["CapabilityBoundingSet"][-1].split()
        bounding = "-all," + ",".join("+" + c.lower().removeprefix("cap_") for c in caps)
        wrapper = ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all"]
        if u.get("NoNewPrivileges", ["no"])[-1] == "yes":
            wrapper.append("--no-new-privs")
        os.makedirs("/run/ringd", mode=0o755, exist_ok=True)   # RuntimeDirectory=ringd
        path = os.path.join(self.tmp, "notify.sock")
        if self.notify is not None:
            self.notify.close()
        if os.path.exists(path):
            os.unlink(path)
        self.notify = Notify(path)
        env = dict(SERVICE_ENV, NOTIFY_SOCKET=path)
        self.log_path = os.path.join(self.tmp, f"ringd-{tag}.log")
        log = open(self.log_path, "w")
        argv = wrapper + ["--"] + self.unit_cmd("ExecStart")
        p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True)
        log.close()
        self.procs.append(p)
        self.master = p
        return p

    def wait_notify(self, want: str, timeout: float = 30.0) -> list[str]:
        """Datagrams (since the last wait) until one carries the line `want`;
        returns all of them."""
        def died():
            if self.master is not None and self.master.poll() is not None:
                raise Failed(f"master exited {self.master.returncode} before {want}\n"
                             + _indent(_tail(self.log_path)))
        got = self.notify.wait(want, timeout, died)
        if got is None:
            raise Failed(f"no {want} within {timeout:.0f}s (got {self.notify.unread()})\n"
                         + _indent(_tail(self.log_path)))
        return got

    def s_start(self):
        _, (bhost, bport) = self.addresses()
        self.backend = Backend(bhost, bport)
        p = self.start_master("v1")
        msgs = self.wait_notify("READY=1")
        with open("/run/ringd/ringd.pid") as f:
            pid = int(f.read())
        if pid != p.pid:
            # setpriv execs ringd, so the master has setpriv's pid
            raise Failed(f"pidfile says {pid}, the process we started is {p.pid}")
        caps = _status(p.pid).get("CapBnd", "")
        (lhost, lport), _ = self.addresses()
        want = {f"ringd/{lhost.replace(':', '_')}/{lport}/{i}"
                for i in range(len(os.sched_getaffinity(0)))}
        if set(self.notify.store) != want:
            raise Failed(f"fd store holds {sorted(self.notify.store)}, expected {sorted(want)}")
        return (f"master pid {p.pid}, CapBnd {caps}, notify: "
                f"{' | '.join(m.replace(chr(10), ' ') for m in msgs)}; "
                f"fd store: {len(want)} listening sockets")

    def workers(self) -> list[int]:
        return _children(self.master.pid)

    def check_workers(self, expect_n: int | None = None) -> str:
        uid, gid = self.ringd_ids()
        pids = self.workers()
        if not pids:
            raise Failed("no worker processes")
        if expect_n is not None and len(pids) != expect_n:
            raise Failed(f"{len(pids)} workers, expected {expect_n}")
        for pid in pids:
            st = _status(pid)
            uids = st["Uid"].split()
            gids = st["Gid"].split()
            groups = st.get("Groups", "").split()
            if set(uids) != {str(uid)} or set(gids) != {str(gid)} or set(groups) - {str(gid)}:
                raise Failed(f"worker {pid} ({st['Name']}): Uid {uids} Gid {gids} "
                             f"Groups {groups}, expected uid {uid} gid {gid}")
            if not _cmdline(pid).startswith("ringd: worker"):
                raise Failed(f"worker {pid} has title {_cmdline(pid)!r}")
        m = _status(self.master.pid)
        if m["Uid"].split()[0] != "0":
            raise Failed(f"master runs as uid {m['Uid']}")
        return f"{len(pids)} workers {pids} uid/gid {uid}/{gid} (ringd), master uid 0"

    def s_workers(self):
        n = len(os.sched_getaffinity(0))
        return self.check_workers(expect_n=n)

    def traffic(self) -> str:
        (lhost, lport), _ = self.addresses()
        results: list[str] = []
        errors: list[str] = []

        def one(size: int):
            try:
                results.append(_exchange(lhost, lport, size))
            except Exception as e:
                errors.append(f"{size} bytes: {e}")

        sizes = [64, 1000, 70_000, 1 << 20, 16 << 20, 16 << 20, 4 << 20, 300]
        threads = [threading.Thread(target=one, args=(s,)) for s in sizes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        if errors or len(results) != len(sizes):
            raise Failed(f"traffic through {lhost}:{lport}: {errors or 'timed out'}")
        total = sum(sizes)
        return f"{len(sizes)} connections, {total / (1 << 20):.1f} MiB each way, SHA-256 equal"

    def s_traffic(self):
        detail = self.traffic()
        st = self.run(["/usr/bin/ringd", "status", "-c", CONFFILE], env=SERVICE_ENV).stdout
        if "WORKER" not in st:
            raise Failed(f"ringd status printed no worker table:\n{_indent(st)}")
        return detail + "; ringd status ok"

    def s_reload_hup(self):
        before = set(self.workers())
        self.master.send_signal(signal.SIGHUP)
        msgs = self.wait_notify("RELOADING=1", timeout=10)
        msgs += self.wait_notify("READY=1", timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and set(self.workers()) & before:
            time.sleep(0.1)
        left = set(self.workers()) & before
        if left:
            raise Failed(f"old workers {sorted(left)} still running 20s after the reload")
        detail = self.check_workers()
        self.traffic()
        return f"{detail}; traffic ok after reload"

    def s_exec_reload(self):
        r = self.run(self.unit_cmd("ExecReload"), env=SERVICE_ENV, timeout=150)
        self.wait_notify("READY=1", timeout=30)
        self.check_workers()
        return r.stdout.strip()

    def s_exec_reload_rejected(self):
        with open(CONFFILE, "rb") as f:
            original = f.read()
        before = set(self.workers())
        try:
            with open(CONFFILE, "ab") as f:
                f.write(b"\n[ringd.bogus]\n")
            r = self.run(self.unit_cmd("ExecReload"), ok=(1,), env=SERVICE_ENV, timeout=150)
        finally:
            with open(CONFFILE, "wb") as f:
                f.write(original)
        if "reload rejected" not in r.stderr:
            raise Failed(f"ExecReload on a broken file said: {r.stdout}{r.stderr}")
        if set(self.workers()) != before:
            raise Failed("workers changed although the reload was rejected")
        self.traffic()
        return f"exit 1: {r.stderr.strip()[:160]}; old generation still serves"

    def s_stop(self):
        (lhost, lport), _ = self.addresses()
        kill = self.unit().get("KillSignal", ["SIGTERM"])[-1]
        sig = getattr(signal, kill)
        # a connection that is open when the stop begins must still complete
        s = socket.create_connection((lhost, lport), timeout=10)
        data = os.urandom(3 << 20)
        s.sendall(data[:1 << 20])
        _recv_exact(s, 1 << 20)
        t0 = time.monotonic()
        self.master.send_signal(sig)
        self.wait_notify("STOPPING=1", timeout=10)
        time.sleep(0.5)
        if self.master.poll() is not None:
            raise Failed(f"master exited at once ({self.master.returncode}) with a connection open")
        s.sendall(data[1 << 20:])
        rest = _recv_exact(s, len(data) - (1 << 20))
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        if s.recv(1) != b"":
            raise Failed("backend did not close after our FIN")
        s.close()
        if hashlib.sha256(rest).digest() != hashlib.sha256(data[1 << 20:]).digest():
            raise Failed("bytes sent after the stop signal came back changed")
        timeout = _seconds(self.unit().get("TimeoutStopSec", ["90s"])[-1])
        try:
            rc = self.master.wait(timeout)
        except subprocess.TimeoutExpired:
            raise Failed(f"master still running {timeout}s after {kill} (TimeoutStopSec)")
        took = time.monotonic() - t0
        if rc != 0:
            raise Failed(f"master exited {rc} after {kill}\n" + _indent(_tail(self.log_path)))
        for path in ("/run/ringd/ringd.pid", "/run/ringd/ringd.sock"):
            if os.path.exists(path):
                raise Failed(f"{path} left behind after the stop")
        shutil.rmtree("/run/ringd", ignore_errors=True)   # systemd removes RuntimeDirectory
        return f"{kill}: open connection completed, exit 0 after {took:.1f}s (TimeoutStopSec {timeout:g}s)"

    def status_json(self) -> dict:
        r = self.run(["/usr/bin/ringd", "status", "-c", CONFFILE, "--json"], env=SERVICE_ENV)
        return json.loads(r.stdout)

    def s_upgrade(self):
        with open(CONFFILE) as f:
            text = f.read()
        edited = text.replace('log_level = "info"', 'log_level = "warning"')
        if edited == text:
            raise Failed(f"cannot find log_level = \"info\" in {CONFFILE} to edit")
        edited = "# edited by deb-test before the upgrade\n" + edited
        with open(CONFFILE, "w") as f:
            f.write(edited)
        v1 = self.run(["dpkg-deb", "-f", self.deb, "Version"]).stdout.strip()
        want = self.run(["dpkg-deb", "-f", self.upgrade_deb, "Version"]).stdout.strip()
        # the version that is installed now runs, as systemd would have it
        p = self.start_master("v1-upgrade")
        self.wait_notify("READY=1")
        before = self.status_json()
        if before["package_version"] != v1:
            raise Failed(f"master runs package {before['package_version']!r}, expected {v1}")
        old_workers = {w["pid"] for w in before["workers"]}
        (lhost, lport), _ = self.addresses()
        load = Load(lhost, lport)
        load.start()
        try:
            load.wait_ok(40)
            d = os.path.dirname(self.upgrade_deb)
            r = self.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                          "./" + os.path.basename(self.upgrade_deb)], cwd=d,
                         env=self.apt_env(), timeout=900)
            out = r.stdout + r.stderr
            bad = [ln for ln in out.splitlines()
                   if re.match(r"^(E|W):|dpkg: (error|warning)", ln) or "did not complete" in ln]
            if bad:
                raise Failed("apt-get install (upgrade) reported:\n" + _indent("\n".join(bad)))
            if "upgrade ok" not in out:
                raise Failed("the postinst did not upgrade in place:\n" + _indent(out[-2000:]))
            self.wait_notify("RELOADING=1", timeout=10)
            self.wait_notify("READY=1", timeout=30)
            load.wait_ok(40)        # the new generation serves
        finally:
            load.stop()
        if load.failures:
            raise Failed(f"{len(load.failures)} failed connections during the upgrade "
                         f"(of {load.ok + len(load.failures)}): {load.failures[:3]}")
        if load.stream_error:
            raise Failed(f"the long stream across the upgrade: {load.stream_error}")
        after = self.status_json()
        status = self.dpkg_status()
        if status != f"install ok installed {want}":
            raise Failed(f"after the upgrade: {status!r}, expected version {want}")
        if after["pid"] != p.pid or p.poll() is not None:
            raise Failed(f"master pid {after['pid']} after the upgrade, was {p.pid}")
        if after["exec_started"] <= before["exec_started"] or after["upgrades"] != 1:
            raise Failed(f"no in-place exec: exec_started {before['exec_started']} -> "
                         f"{after['exec_started']}, upgrades {after['upgrades']}")
        if after["package_version"] != want:
            raise Failed(f"the master image runs package {after['package_version']!r}, not {want}")
        new = [w for w in after["workers"] if w["generation"] == after["generation"]]
        if not new or any(w["package_version"] != want or w["pid"] in old_workers for w in new):
            raise Failed(f"workers of generation {after['generation']}: "
                         f"{[(w['pid'], w['package_version']) for w in new]}, expected new "
                         f"processes running {want}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and set(self.workers()) & old_workers:
            time.sleep(0.1)
        if set(self.workers()) & old_workers:
            raise Failed(f"old workers {sorted(set(self.workers()) & old_workers)} still run")
        self.check_workers()
        with open(CONFFILE) as f:
            if f.read() != edited:
                raise Failed(f"{CONFFILE} changed by the upgrade")
        stray = [p for p in os.listdir("/etc/ringd") if p != "ringd.toml"]
        if stray:
            raise Failed(f"/etc/ringd has {stray} after the upgrade")
        self.run(self.unit_cmd("ExecStartPre"), env=SERVICE_ENV)
        self.traffic()
        self.master.send_signal(signal.SIGQUIT)
        if self.master.wait(60) != 0:
            raise Failed("the upgraded master did not exit 0 after SIGQUIT")
        shutil.rmtree("/run/ringd", ignore_errors=True)
        return (f"{status}; master pid {p.pid} kept, workers {sorted(w['pid'] for w in new)} "
                f"run {want}; {load.ok} short connections and a {load.stream_bytes >> 20} MiB "
                f"stream, none failed; edited conffile kept byte for byte")

    def s_upgrade_refused(self):
        """The postinst of a version that rejects the configuration (here: a
        reinstall with a key no version knows added to the file) refuses the
        in-place upgrade, does not restart, and the running master serves on."""
        with open(CONFFILE, "rb") as f:
            original = f.read()
        p = self.start_master("v2-refused")
        self.wait_notify("READY=1")
        before = self.status_json()
        try:
            with open(CONFFILE, "ab") as f:
                f.write(b"\n[ringd.bogus]\n")
            d = os.path.dirname(self.upgrade_deb)
            r = self.run(["apt-get", "install", "-y", "-q", "--reinstall",
                          "--no-install-recommends", "./" + os.path.basename(self.upgrade_deb)],
                         cwd=d, env=self.apt_env(), timeout=900)
        finally:
            with open(CONFFILE, "wb") as f:
                f.write(original)
        out = r.stdout + r.stderr
        for want in ("upgrade refused", "ringd.bogus", "the new version rejects"):
            if want not in out:
                raise Failed(f"the postinst did not say {want!r}:\n" + _indent(out[-2000:]))
        after = self.status_json()
        if after["pid"] != p.pid or p.poll() is not None:
            raise Failed(f"master pid {after['pid']} after the refused upgrade, was {p.pid}")
        if after["exec_started"] != before["exec_started"] or after["upgrades"] != 0:
            raise Failed("the master re-executed although the upgrade was refused")
        if {w["pid"] for w in after["workers"]} != {w["pid"] for w in before["workers"]}:
            raise Failed("workers changed although the upgrade was refused")
        self.traffic()
        self.master.send_signal(signal.SIGQUIT)
        if self.master.wait(60) != 0:
            raise Failed("the master did not exit 0 after SIGQUIT")
        shutil.rmtree("/run/ringd", ignore_errors=True)
        line = next(ln for ln in out.splitlines() if "the new version rejects" in ln)
        return f"master pid {p.pid} kept, same workers, no restart; postinst: {line[:160]}"

    def s_remove(self):
        r = self.run(["dpkg", "--remove", "ringd"], env=self.apt_env())
        _no_complaints("dpkg --remove", r)
        status = self.dpkg_status()
        if not status.startswith("deinstall ok config-files"):
            raise Failed(f"status after dpkg -r: {status!r}")
        if not os.path.exists(CONFFILE):
            raise Failed(f"dpkg -r removed the conffile {CONFFILE}")
        for path in ("/usr/bin/ringd", UNIT, SYSCTL, "/usr/lib/python3/dist-packages/ringd"):
            if os.path.exists(path):
                raise Failed(f"{path} still there after dpkg -r")
        return f"{status}; conffile kept"

    def s_purge(self):
        r = self.run(["dpkg", "--purge", "ringd"], env=self.apt_env())
        _no_complaints("dpkg --purge", r)
        if self.dpkg_status():
            raise Failed(f"dpkg still knows ringd: {self.dpkg_status()!r}")
        for path in ("/etc/ringd", "/var/log/ringd", "/run/ringd"):
            if os.path.exists(path):
                raise Failed(f"{path} still there after purge")
        for db in ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow"):
            with open(db) as f:
                if any(line.startswith("ringd:") for line in f):
                    raise Failed(f"ringd still in {db} after purge")
        return "conffile, logs, user and group gone"

    def s_leftovers(self):
        after = snapshot()
        owned = dpkg_owned()
        new = sorted(p for p in after - self.snapshot_before if p not in owned
                     and not _python_cache(p, owned))
        named = sorted(p for p in after if "ringd" in os.path.basename(p))
        problems = new + [p for p in named if p not in new]
        if problems:
            raise Failed("left behind:\n" + _indent("\n".join(problems[:50])))
        return f"no file or directory that no package owns is new under {' '.join(SNAP_ROOTS)}"

    # ------------------------------------------------------------ teardown

    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)
        if self.backend is not None:
            self.backend.close()
        if self.notify is not None:
            self.notify.close()
        if self.dpkg_status():
            print("NOTE  purging ringd left installed by a failed step", flush=True)
            subprocess.run(["dpkg", "--purge", "ringd"], env=self.apt_env(),
                           capture_output=True)
        shutil.rmtree("/run/ringd", ignore_errors=True)
        for key, value in self.sysctl_saved.items():
            if value and _sysctl_read(key) != value:
                _sysctl_write(key, value)
        if self.keep:
            print(f"NOTE  logs kept in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def main(self) -> int:
        rc = self.preflight()
        if rc is not None:
            return rc
        try:
            steps = [
                ("install: apt-get install ./" + os.path.basename(self.deb), self.s_install),
                ("dependencies from Debian, no pip", self.s_dependencies),
                ("files, conffile, man pages, system user", self.s_files),
                ("sysctl.d applied", self.s_sysctl),
                ("systemd-analyze verify ringd.service", self.s_unit),
                ("ExecStartPre: ringd check", self.s_check),
                ("ExecStart by hand: READY=1 on NOTIFY_SOCKET", self.s_start),
                ("workers run as user ringd", self.s_workers),
                ("traffic through the default listener", self.s_traffic),
                ("SIGHUP reload", self.s_reload_hup),
                ("ExecReload", self.s_exec_reload),
                ("ExecReload rejects a broken file", self.s_exec_reload_rejected),
                ("graceful stop (KillSignal)", self.s_stop),
                ("upgrade in place under load (postinst: ringd upgrade)", self.s_upgrade),
                ("a rejected file refuses the in-place upgrade, no restart",
                 self.s_upgrade_refused),
                ("dpkg -r", self.s_remove),
                ("dpkg -P", self.s_purge),
                ("no leftovers", self.s_leftovers),
            ]
            for i, (name, fn) in enumerate(steps):
                if not self.step(name, fn) and i < 7:
                    # without an installed, running ringd the rest means nothing
                    remaining = [n for n, _ in steps[i + 1:]]
                    for n in remaining:
                        if n in ("dpkg -r", "dpkg -P"):
                            continue
                        print(f"SKIP  {n}: an earlier step failed")
                    self.step("dpkg -r", self.s_remove)
                    self.step("dpkg -P", self.s_purge)
                    break
        finally:
            self.cleanup()
        print(f"deb-test: {self.passed} passed, {self.failed} failed")
        return 0 if self.failed == 0 else 1


# ---------------------------------------------------------------- notify, load

class Notify:
    """$NOTIFY_SOCKET, read all the time (a queue of unread datagrams would
    make the master wait): the messages, and the fd store as systemd keeps it
    (FDSTORE=1 by FDNAME, FDSTOREREMOVE=1)."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.msgs: list[str] = []
        self.cursor = 0
        self.store: dict[str, int] = {}
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.closed:
            try:
                msg, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
            except socket.timeout:
                continue
            except OSError:
                return
            fds = array.array("i")
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            text = msg.decode(errors="replace")
            fields = dict(ln.split("=", 1) for ln in text.split("\n") if "=" in ln)
            with self.cond:
                name = fields.get("FDNAME", "stored")
                if fields.get("FDSTORE") == "1" and fds:
                    if name in self.store:
                        os.close(self.store.pop(name))
                    self.store[name] = fds.pop(0)
                elif fields.get("FDSTOREREMOVE") == "1" and name in self.store:
                    os.close(self.store.pop(name))
                for fd in fds:
                    os.close(fd)
                self.msgs.append(text)
                self.cond.notify_all()

    def wait(self, want: str, timeout: float, check) -> list[str] | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(self.cursor, len(self.msgs)):
                    if want in self.msgs[i].split("\n"):
                        got, self.cursor = self.msgs[self.cursor:i + 1], i + 1
                        return got
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.2))
                check()

    def unread(self) -> list[str]:
        with self.cond:
            return self.msgs[self.cursor:]

    def close(self):
        self.closed = True
        self.thread.join(5)
        self.sock.close()
        for fd in self.store.values():
            os.close(fd)
        self.store.clear()


class Load:
    """Four loops of short echo exchanges and one long stream, until stop():
    what failed, and whether the stream's bytes came back intact."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.ok = 0
        self.failures: list[str] = []
        self.stream_error = ""
        self.stream_bytes = 0
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._short, args=(i,), daemon=True)
                        for i in range(4)] + [threading.Thread(target=self._stream, daemon=True)]

    def start(self):
        for t in self.threads:
            t.start()

    def _short(self, i: int):
        k = 0
        while not self.stopping.is_set() and k < 200000:
            k += 1
            data = os.urandom(64 + (k * 37) % 2000)
            try:
                got = _echo_once(self.host, self.port, data)
                if got != data:
                    raise Failed(f"{len(got)} bytes back for {len(data)}, or different")
                with self.lock:
                    self.ok += 1
            except Exception as e:
                with self.lock:
                    self.failures.append(f"loop {i} #{k}: {type(e).__name__}: {e}")

    def _stream(self):
        sent, got = hashlib.sha256(), hashlib.sha256()
        n = {"got": 0}
        try:
            s = socket.create_connection((self.host, self.port), timeout=30)
            s.settimeout(60)

            def reader():
                while True:
                    b = s.recv(1 << 20)
                    if not b:
                        return
                    got.update(b)
                    n["got"] += len(b)
            t = threading.Thread(target=reader, daemon=True)
            t.start()
            while not self.stopping.is_set():
                chunk = os.urandom(64 << 10)
                s.sendall(chunk)
                sent.update(chunk)
                self.stream_bytes += len(chunk)
                time.sleep(0.01)
            s.shutdown(socket.SHUT_WR)
            t.join(60)
            s.close()
            if t.is_alive():
                self.stream_error = "no EOF after the stream's end"
            elif n["got"] != self.stream_bytes or got.digest() != sent.digest():
                self.stream_error = (f"sent {self.stream_bytes} bytes, got {n['got']} back, "
                                     "hashes differ")
        except Exception as e:
            self.stream_error = f"{type(e).__name__}: {e}"

    def wait_ok(self, more: int, timeout: float = 30):
        start, deadline = self.ok, time.monotonic() + timeout
        while self.ok < start + more:
            if time.monotonic() > deadline:
                raise Failed(f"load: only {self.ok - start} of {more} exchanges in {timeout:.0f}s "
                             f"({self.failures[:3]})")
            time.sleep(0.05)

    def stop(self):
        self.stopping.set()
        for t in self.threads:
            t.join(90)


def _echo_once(host: str, port: int, data: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=10) as s:
        s.settimeout(10)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = bytearray()
        while True:
            b = s.recv(65536)
            if not b:
                return bytes(out)
            out.extend(b)


# ---------------------------------------------------------------- backend

class Backend:
    """Echo server: returns every byte, and a FIN after the client's FIN."""

    def __init__(self, host: str, port: int):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            raise Failed(f"cannot run the test backend on {host}:{port}: {e.strerror}")
        self.sock.listen(128)
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    @staticmethod
    def _echo(c: socket.socket):
        c.settimeout(120)
        try:
            while True:
                b = c.recv(1 << 20)
                if not b:
                    break
                c.sendall(b)
            c.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        self.closed = True
        self.sock.close()


def _exchange(host: str, port: int, size: int) -> str:
    data = os.urandom(size)
    s = socket.create_connection((host, port), timeout=30)
    s.settimeout(60)
    got = bytearray()
    err: list[Exception] = []

    def reader():
        try:
            while True:
                b = s.recv(1 << 20)
                if not b:
                    return
                got.extend(b)
        except OSError as e:
            err.append(e)

    t = threading.Thread(target=reader)
    t.start()
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    t.join(90)
    s.close()
    if err:
        raise err[0]
    if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
        raise Failed(f"sent {size} bytes, got {len(got)} back, hashes differ")
    return hashlib.sha256(data).hexdigest()


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    s.settimeout(30)
    while len(buf) < n:
        b = s.recv(min(1 << 20, n - len(buf)))
        if not b:
            raise Failed(f"connection closed after {len(buf)} of {n} bytes")
        buf.extend(b)
    return bytes(buf)


# ---------------------------------------------------------------- system helpers

def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def _status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace").strip()


def _children(ppid: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == ppid:
            kids.append(int(name))
    return sorted(kids)


def _sysctl_path(key: str) -> str:
    return "/proc/sys/" + key.replace(".", "/")


def _sysctl_read(key: str) -> str:
    try:
        with open(_sysctl_path(key)) as f:
            return f.read().strip()
    except OSError:
        return ""


def _sysctl_write(key: str, value: str) -> None:
    try:
        with open(_sysctl_path(key), "w") as f:
            f.write(value)
    except OSError:
        pass


def _seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min|m)?", text.strip())
    if not m:
        return 90.0
    return float(m.group(1)) * (60 if m.group(2) in ("min", "m") else 1)


def _no_complaints(what: str, r: subprocess.CompletedProcess) -> None:
    out = r.stdout + r.stderr
    bad = [ln for ln in out.splitlines() if re.search(r"\b(warning|error)\b", ln, re.I)]
    if bad:
        raise Failed(f"{what} printed:\n" + _indent("\n".join(bad)))


def snapshot() -> set[str]:
    seen: set[str] = set()
    for root in SNAP_ROOTS:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames
                           if os.path.join(dirpath, d) not in SNAP_SKIP
                           and not os.path.ismount(os.path.join(dirpath, d))]
            for name in dirnames + filenames:
                seen.add(os.path.join(dirpath, name))
    return seen


def dpkg_owned() -> set[str]:
    owned: set[str] = set()
    info = "/var/lib/dpkg/info"
    for name in os.listdir(info):
        if name.endswith(".list"):
            with open(os.path.join(info, name), errors="replace") as f:
                owned.update(line.rstrip("\n") for line in f)
    # /lib and /usr/lib are one directory on a merged-/usr system
    owned |= {"/usr" + p for p in owned if p.startswith(("/lib/", "/bin/", "/sbin/"))}
    return owned


def _python_cache(path: str, owned: set[str]) -> bool:
    """Byte code that py3compile writes for a package's modules on install."""
    parts = path.split("/")
    if "__pycache__" not in parts:
        return False
    i = parts.index("__pycache__")
    return "/".join(parts[:i]) in owned


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path) as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def _indent(text: str) -> str:
    text = text.rstrip("\n")
    return "".join("      " + line + "\n" for line in text.splitlines()) if text else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--deb", required=True)
    ap.add_argument("--upgrade-deb", required=True)
    ap.add_argument("--keep", action="store_true", help="keep the logs of the test")
    args = ap.parse_args()
    return Test(args.deb, args.upgrade_deb, args.keep).main()


if __name__ == "__main__":
    sys.exit(main())
