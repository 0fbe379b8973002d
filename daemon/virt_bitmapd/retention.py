"""How long what waits for a domain or for the daemon is kept."""

from __future__ import annotations

__all__ = ["RETENTION"]

#: Seconds: the chains of a domain libvirt no longer lists (a stopped transient domain comes
#: back), and the records `virt-bitmapd reconcile` leaves for the daemon.
RETENTION = 90 * 86400
