"""What is there now, read: a disk's chain (at rest or live), a domain's checkpoints, the disks
of the whole host.  Blocking I/O, reads only; used by the daemon's looks and by the one-shot
commands alike, so both judge from the same facts."""
