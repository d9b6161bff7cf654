"""What the master tells the parts that live beside it.

The lame duck, the server registry, the health checks, the admin endpoint
and the access log are components: the master calls every hook below on
each of them, in the order they were added, and a component overrides only
the hooks it needs (the rest do nothing). The master's own lifecycle stays
in ringd.master; a component never forks, reaps or signals workers.

A component with state that must outlive `ringd upgrade` (the master
re-executing itself in place, see ringd.upgrade) sets ``state_key`` and
implements export_state/import_state; descriptors it names there (a
listening socket, a memfd holding a shared-memory table the workers map)
stay open across the exec and come back under the same names.
"""
from __future__ import annotations


class Component:
    # The key of this component's entry in the state an in-place upgrade
    # hands to the next image of the master (ringd.upgrade); "" for a
    # component with nothing to hand over.
    state_key = ""

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

    def export_state(self) -> tuple[dict, dict[str, int]]:
        """`ringd upgrade` is about to exec the new image: what must survive
        it, as (JSON-able dict, {name: fd} of descriptors to keep open, a
        memfd segment for instance). Read by a newer image, and maybe by an
        older one after a downgrade: add keys freely, never change what an
        existing key means."""
        return {}, {}

    def import_state(self, state: dict, fds: dict[str, int]) -> None:
        """The new image, before any generation is prepared: take back what
        export_state gave (unknown keys ignored, missing ones defaulted;
        `fds` holds the named descriptors that arrived, close-on-exec again)."""
