"""The vsock device's own epoll set: host sockets come and go while the device runs.

The VirtioDevice base watches a fixed set of fds chosen at activation; vsock connections
are opened and closed all the time. So the device watches one fd, this epoll instance
(an epoll fd is readable while any fd in its set is ready), and changes the set inside it.

Everything is level-triggered. An owner keeps a socket registered only for the events it
can act on now (no EPOLLIN while the guest has no credit or no rx buffer), and a socket
with nothing to wait for is not registered at all: otherwise a hung-up peer (EPOLLHUP is
always reported) would wake the I/O thread in a loop.
"""

from __future__ import annotations

import select

# Events taken per wakeup; the rest stay ready (level-triggered) for the next round.
MAX_EVENTS = 64


class Poller:
    def __init__(self) -> None:
        self._ep = select.epoll()
        self._masks: dict[int, int] = {}
        self._owners: dict[int, object] = {}

    def fileno(self) -> int:
        return self._ep.fileno()

    def set(self, fd: int, mask: int, owner: object) -> None:
        """Watch `fd` for `mask` on behalf of `owner`; a mask of 0 stops watching it."""
        cur = self._masks.get(fd)
        if mask == 0:
            if cur is not None:
                self.drop(fd)
            return
        if cur is None:
            self._ep.register(fd, mask)
        elif cur != mask:
            self._ep.modify(fd, mask)
        self._masks[fd] = mask
        self._owners[fd] = owner

    def drop(self, fd: int) -> None:
        """Forget `fd`; call it before closing the fd (the number may be reused at once)."""
        if self._masks.pop(fd, None) is not None:
            self._owners.pop(fd, None)
            try:
                self._ep.unregister(fd)
            except OSError:
                pass  # already gone from the set

    def watching(self, fd: int) -> int:
        """The mask `fd` is watched for (0: not watched)."""
        return self._masks.get(fd, 0)

    def poll(self) -> list[tuple[object, int]]:
        """Ready (owner, events) pairs, without blocking."""
        ready = []
        for fd, events in self._ep.poll(0, MAX_EVENTS):
            owner = self._owners.get(fd)
            if owner is not None:
                ready.append((owner, events))
        return ready

    def close(self) -> None:
        self._masks.clear()
        self._owners.clear()
        self._ep.close()
