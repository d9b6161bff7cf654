"""Host checks at start and reload: kernel settings that change what ringd
does, said once in the log with what to set (nothing here refuses to run)."""
from __future__ import annotations


def sysctl(name: str) -> str | None:
    """The value of /proc/sys/NAME ("net/ipv4/tcp_migrate_req"), or None."""
    try:
        with open(f"/proc/sys/{name}", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def migrate_hint(log) -> None:
    """At start: say that net.ipv4.tcp_migrate_req=0 resets what is queued
    on a listening socket that closes."""
    if sysctl("net/ipv4/tcp_migrate_req") == "0":
        log.info("hint", setting="net.ipv4.tcp_migrate_req=0",
                 hint="set it to 1 so that connections queued on a listening socket "
                      "that closes (fewer workers, a removed listener) move to the "
                      "remaining sockets instead of being reset")


def check_buffer_caps(cfg, log) -> None:
    """rcvbuf/sndbuf above net.core.rmem_max/wmem_max are capped by the
    kernel without an error (workers may not be root); say so once per load."""
    caps = {key: (name, sysctl(name.replace(".", "/")))
            for key, name in (("rcvbuf", "net.core.rmem_max"), ("sndbuf", "net.core.wmem_max"))}
    for kind, items in (("listener", cfg.listeners), ("upstream", cfg.upstreams)):
        for item in items:
            for key, (name, cap) in caps.items():
                want = getattr(item, key)
                if want and cap and cap.isdigit() and want > int(cap):
                    log.warning("socket_buffer_capped", where=f"{kind} {item.name}",
                                key=key, configured=want, effective=int(cap),
                                hint=f"the kernel caps it at {name}; raise that "
                                     "sysctl to get the configured size")
