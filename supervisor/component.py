"""What the master tells the parts that live beside it.

The lame duck, the server registry, the health checks, the admin endpoint
and the access log are components: the master calls every hook below on
each of them, in the order they were added, and a component overrides only
the hooks it needs (the rest do nothing). The master's own lifecycle stays
in ringd.master; a component never forks, reaps or signals workers.
"""
from __future__ import annotations


class Component:
    async def start(self) -> None:
        """The first generation accepts: begin work."""

    async def stop(self) -> None:
        """The master is exiting: end work, within a bounded time."""

    def prepare_generation(self, gen) -> None:
        """Generation `gen` exists (its shared memory too); its workers are
        not forked yet. Called for every generation, the first included."""

    def on_generation(self, new, old) -> None:
        """A reload activated `new`; `old` (None if there was none) drains next."""

    def fold_generation(self, gen) -> None:
        """`gen` has drained and is about to be dropped with its shared memory:
        take what must outlive it."""

    def on_passive_down(self, gen, server_index: int) -> None:
        """A worker of `gen` marked server `server_index` of its table down
        (max_fails failed connects within fail_timeout)."""
