"""Disks and their backing chains from libvirt domain XML.  Pure.

A running domain's live XML lists the whole chain: ``<source file index=N>`` for the top and
nested ``<backingStore index=N>`` below it.  The index is an identifier (with -blockdev, libvirt
names the layer's QEMU nodes ``libvirt-N-format`` and ``libvirt-N-storage``), not a position.
A shut-off domain's XML usually names only the top image; the rest comes from the image headers.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

__all__ = ["Disk", "DomainDisks", "Layer", "parse_domain"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Layer:
    path: str
    format: str | None
    index: int | None

    @property
    def format_node(self) -> str | None:
        return None if self.index is None else f"libvirt-{self.index}-format"

    @property
    def storage_node(self) -> str | None:
        return None if self.index is None else f"libvirt-{self.index}-storage"


@dataclass(frozen=True, slots=True, kw_only=True)
class Disk:
    """A file-backed disk.  ``layers`` is top first; ``complete`` says whether the XML listed the
    chain to its end (``<backingStore/>``) or only its top."""

    target: str
    layers: tuple[Layer, ...]
    complete: bool

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(layer.path for layer in self.layers)

    def layer(self, path: str) -> Layer | None:
        for layer in self.layers:
            if layer.path == path:
                return layer
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class DomainDisks:
    name: str
    uuid: str
    disks: tuple[Disk, ...]
    #: Targets of disks we cannot follow (network, block devices, volumes), for the logs.
    unsupported: tuple[str, ...] = ()


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def _layer(element: ET.Element, index: str | None) -> Layer | None:
    """The layer described by a <disk> or <backingStore> element, if it is a plain file."""
    if element.get("type", "file") != "file":
        return None
    source = element.find("source")
    if source is None or not source.get("file"):
        return None
    fmt = element.find("driver") if element.tag == "disk" else element.find("format")
    return Layer(
        path=str(source.get("file")),
        format=None if fmt is None else fmt.get("type"),
        index=_int(index),
    )


def _disk(element: ET.Element) -> Disk | None:
    target = element.find("target")
    if target is None or not target.get("dev"):
        return None
    source = element.find("source")
    top = _layer(element, None if source is None else source.get("index"))
    if top is None:
        return None
    layers = [top]
    complete = False
    store = element.find("backingStore")
    while store is not None:
        if store.find("source") is None:  # <backingStore/>: the chain ends here
            complete = True
            break
        layer = _layer(store, store.get("index"))
        if layer is None:  # a layer that is not a plain file: we cannot follow it
            break
        layers.append(layer)
        store = store.find("backingStore")
    return Disk(target=str(target.get("dev")), layers=tuple(layers), complete=complete)


def parse_domain(xml: str) -> DomainDisks:
    root = ET.fromstring(xml)  # noqa: S314 - libvirt's own output, not untrusted input
    disks = []
    unsupported = []
    for element in root.findall("./devices/disk"):
        if element.get("device", "disk") != "disk":
            continue  # cdrom, floppy, lun: no checkpoints
        disk = _disk(element)
        if disk is not None:
            disks.append(disk)
        else:
            target = element.find("target")
            unsupported.append("?" if target is None else str(target.get("dev", "?")))
    return DomainDisks(
        name=root.findtext("name", default=""),
        uuid=root.findtext("uuid", default=""),
        disks=tuple(disks),
        unsupported=tuple(unsupported),
    )
