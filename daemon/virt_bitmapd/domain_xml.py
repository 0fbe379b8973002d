"""Disks and their backing chains from libvirt domain XML.  Pure.

A running domain's live XML lists the whole chain: ``<source file index=N>`` for the top and
nested ``<backingStore index=N>`` below it.  The index is an identifier (with -blockdev, libvirt
names the layer's QEMU nodes ``libvirt-N-format`` and ``libvirt-N-storage``), not a position.
A shut-off domain's XML usually names only the top image; the rest comes from the image headers.

Formats come from the XML alone, never from an image's bytes: a disk whose ``<driver type>`` is
not qcow2 (libvirt's default is raw) is not followed at all, and its file is remembered as one
whose first bytes belong to a guest (``raw_files``), so that no header in it is ever believed.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from .errors import DomainXMLInvalid

__all__ = [
    "Disk",
    "DomainDisks",
    "Layer",
    "SkippedDisk",
    "disks_of_element",
    "libvirt_root",
    "parse_domain",
]

QCOW2 = "qcow2"
NOT_FILE_BACKED = "not a file-backed disk (network, block device or volume)"
ALSO_RAW = "its file is also a raw disk of the domain (a guest's bytes); never opened"


@dataclass(frozen=True, slots=True, kw_only=True)
class Layer:
    path: str
    format: str | None
    index: int | None
    #: What libvirt gave this layer's QEMU node that a reopen could not give it again
    #: (encryption, an external data file), for refusing one.
    unreproducible: tuple[str, ...] = ()

    @property
    def format_node(self) -> str | None:
        return None if self.index is None else f"libvirt-{self.index}-format"

    @property
    def storage_node(self) -> str | None:
        return None if self.index is None else f"libvirt-{self.index}-storage"


@dataclass(frozen=True, slots=True, kw_only=True)
class Disk:
    """A file-backed qcow2 disk.  ``layers`` is top first; ``complete`` says whether the XML
    listed the chain to its end (``<backingStore/>``) or only its top part."""

    target: str
    layers: tuple[Layer, ...]
    complete: bool
    #: The ``<driver discard>`` libvirt applies to every layer's node ("unmap", "ignore").
    discard: str | None = None
    #: ``<driver><metadata_cache>`` was set: a qcow2 option libvirt passes that QEMU hides.
    metadata_cache: bool = False

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(layer.path for layer in self.layers)

    @property
    def formats(self) -> dict[str, str]:
        """Each layer's format where libvirt names it: what the images are opened as."""
        return {layer.path: layer.format for layer in self.layers if layer.format}

    def layer(self, path: str) -> Layer | None:
        for layer in self.layers:
            if layer.path == path:
                return layer
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class SkippedDisk:
    target: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DomainDisks:
    name: str
    uuid: str
    disks: tuple[Disk, ...]
    #: Disks that cannot hold checkpoints or cannot be followed, with the reason, for the logs.
    skipped: tuple[SkippedDisk, ...] = ()
    #: Files a disk (cdroms included) uses in a format other than qcow2: their guests wrote them.
    raw_files: tuple[str, ...] = ()


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def _unreproducible(element: ET.Element) -> tuple[str, ...]:
    source = element.find("source")
    found = []
    if source is not None and source.find("encryption") is not None:
        found.append("encryption")
    if element.find("encryption") is not None:
        found.append("encryption")
    if element.find("dataStore") is not None:
        found.append("external data file")
    return tuple(dict.fromkeys(found))


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
        unreproducible=_unreproducible(element),
    )


def _disk(element: ET.Element, target: str, top: Layer) -> Disk:
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
        if layer.format != QCOW2:  # a raw layer has no backing file
            complete = layer.format is not None
            break
        store = store.find("backingStore")
    driver = element.find("driver")
    return Disk(
        target=target,
        layers=tuple(layers),
        complete=complete,
        discard=None if driver is None else driver.get("discard"),
        metadata_cache=driver is not None and driver.find("metadata_cache") is not None,
    )


def libvirt_root(xml: str, tag: str, what: str) -> ET.Element:
    """The root element of libvirt's XML describing a ``what``, which must be ``<tag>``;
    DomainXMLInvalid if not."""
    try:
        root = ET.fromstring(xml)  # noqa: S314 - libvirt's own output; expat limits entities
    except ET.ParseError as error:
        raise DomainXMLInvalid(f"the {what} XML cannot be parsed: {error}") from error
    if root.tag != tag:
        raise DomainXMLInvalid(f"the XML describes a <{root.tag}>, not a <{tag}>")
    return root


def parse_domain(xml: str) -> DomainDisks:
    """Raises DomainXMLInvalid when ``xml`` is not a domain description."""
    return disks_of_element(libvirt_root(xml, "domain", "domain"))


def disks_of_element(root: ET.Element) -> DomainDisks:
    """The disks of a ``<domain>`` element (one embedded in a checkpoint's XML, say)."""
    disks = []
    skipped = []
    raw_files = []
    for element in root.findall("./devices/disk"):
        target = element.find("target")
        name = None if target is None else target.get("dev")
        source = element.find("source")
        top = _layer(element, None if source is None else source.get("index"))
        if top is not None and top.format != QCOW2:
            raw_files.append(top.path)
        if element.get("device", "disk") != "disk" or not name:
            continue  # cdrom, floppy, lun: no checkpoints
        if top is None:
            skipped.append(SkippedDisk(target=name, reason=NOT_FILE_BACKED))
        elif top.format != QCOW2:
            skipped.append(
                SkippedDisk(
                    target=name,
                    reason=f"a {top.format or 'raw'} disk holds no checkpoints; never opened",
                )
            )
        else:
            disks.append(_disk(element, name, top))
    raw = set(raw_files)
    for disk in [disk for disk in disks if disk.layers[0].path in raw]:
        # the same file is another disk's raw bytes: its "qcow2 header" is a guest's
        disks.remove(disk)
        skipped.append(SkippedDisk(target=disk.target, reason=ALSO_RAW))
    return DomainDisks(
        name=root.findtext("name", default=""),
        uuid=root.findtext("uuid", default=""),
        disks=tuple(disks),
        skipped=tuple(skipped),
        raw_files=tuple(raw_files),
    )
