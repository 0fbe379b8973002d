"""Disks and chains out of libvirt domain XML."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virt_bitmapd.domain_xml import parse_domain
from virt_bitmapd.errors import DomainXMLInvalid

LIVE = """
<domain type='kvm'>
  <name>vm1</name>
  <uuid>0b3f7e9c-4b8e-4c57-9f38-1a2b3c4d5e6f</uuid>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/images/active.qcow2' index='4'/>
      <backingStore type='file' index='2'>
        <format type='qcow2'/>
        <source file='/images/s1.qcow2'/>
        <backingStore type='file' index='1'>
          <format type='raw'/>
          <source file='/images/base.raw'/>
          <backingStore/>
        </backingStore>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/isos/install.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='nbd' name='x'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/images/data.qcow2'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""


def test_live_chain_with_indexes() -> None:
    domain = parse_domain(LIVE)
    assert (domain.name, domain.uuid) == ("vm1", "0b3f7e9c-4b8e-4c57-9f38-1a2b3c4d5e6f")
    vda = domain.disks[0]
    assert vda.target == "vda" and vda.complete
    assert vda.paths == ("/images/active.qcow2", "/images/s1.qcow2", "/images/base.raw")
    assert [layer.index for layer in vda.layers] == [4, 2, 1]
    assert [layer.format for layer in vda.layers] == ["qcow2", "qcow2", "raw"]
    assert vda.layers[1].format_node == "libvirt-2-format"
    assert vda.layers[1].storage_node == "libvirt-2-storage"


def test_cdroms_are_ignored_and_network_disks_reported() -> None:
    domain = parse_domain(LIVE)
    assert [disk.target for disk in domain.disks] == ["vda", "vdc"]
    assert [disk.target for disk in domain.skipped] == ["vdb"]
    assert domain.raw_files == ("/isos/install.iso",)  # no driver type: libvirt's raw


def test_inactive_xml_names_only_the_top() -> None:
    vdc = parse_domain(LIVE).disks[1]
    assert vdc.paths == ("/images/data.qcow2",)
    assert not vdc.complete and vdc.layers[0].index is None and vdc.layers[0].format_node is None


def test_a_raw_disk_is_skipped_and_its_file_remembered_as_a_guests() -> None:
    domain = parse_domain(
        """<domain><name>vm</name><uuid>u</uuid><devices>
        <disk type='file' device='disk'><driver name='qemu' type='raw'/>
          <source file='/images/guest.img'/><target dev='vda'/></disk>
        <disk type='file' device='disk'><source file='/images/noformat.img'/>
          <target dev='vdb'/></disk>
        </devices></domain>"""
    )
    assert domain.disks == ()
    assert [(d.target, "holds no checkpoints" in d.reason) for d in domain.skipped] == [
        ("vda", True),
        ("vdb", True),
    ]
    assert domain.raw_files == ("/images/guest.img", "/images/noformat.img")


def test_options_a_reopen_cannot_repeat_are_noted() -> None:
    domain = parse_domain(
        """<domain><devices><disk type='file' device='disk'>
          <driver name='qemu' type='qcow2' discard='unmap'><metadata_cache/></driver>
          <source file='/i/top' index='2'><encryption format='luks'/></source>
          <backingStore type='file' index='1'><format type='qcow2'/><source file='/i/base'/>
            <dataStore type='file'><format type='raw'/><source file='/i/data'/></dataStore>
            <backingStore/></backingStore>
          <target dev='vda'/></disk></devices></domain>"""
    )
    vda = domain.disks[0]
    assert vda.discard == "unmap" and vda.metadata_cache and vda.complete
    assert vda.layers[0].unreproducible == ("encryption",)
    assert vda.layers[1].unreproducible == ("external data file",)


def test_text_that_is_not_domain_xml_is_a_named_error() -> None:
    for text in ("", "<domain>", "<network/>", "\0"):
        with pytest.raises(DomainXMLInvalid):
            parse_domain(text)


_words = st.sampled_from(["file", "block", "network", "qcow2", "raw", "", "1", "x", "vda"])


@st.composite
def _layer_xml(draw: st.DrawFn, depth: int) -> str:
    attributes = draw(st.dictionaries(st.sampled_from(["type", "index"]), _words, max_size=2))
    attrs = "".join(f" {k}='{v}'" for k, v in attributes.items())
    parts = []
    if draw(st.booleans()):
        parts.append(f"<format type='{draw(_words)}'/>")
    if draw(st.booleans()):
        source = draw(st.sampled_from(["", "/i/a", "/i/b", "rel", "/i/a b"]))
        parts.append(f"<source file='{source}' index='{draw(_words)}'/>")
    if depth and draw(st.booleans()):
        parts.append(draw(_layer_xml(depth - 1)))
    return f"<backingStore{attrs}>{''.join(parts)}</backingStore>"


@st.composite
def _domain_xml(draw: st.DrawFn) -> str:
    disks = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["file", "block", "network", ""]))
        device = draw(st.sampled_from(["disk", "cdrom", ""]))
        driver = draw(st.one_of(st.none(), _words))
        parts = [] if driver is None else [f"<driver type='{driver}'/>"]
        if draw(st.booleans()):
            parts.append(f"<source file='{draw(st.sampled_from(['/i/t', '', 'x']))}'/>")
        if draw(st.booleans()):
            parts.append(f"<target dev='{draw(_words)}'/>")
        if draw(st.booleans()):
            parts.append(draw(_layer_xml(3)))
        disks.append(f"<disk type='{kind}' device='{device}'>{''.join(parts)}</disk>")
    return f"<domain><name>n</name><devices>{''.join(disks)}</devices></domain>"


@settings(max_examples=300, deadline=None)
@given(_domain_xml())
def test_any_domain_xml_gives_qcow2_chains_or_skips(xml: str) -> None:
    domain = parse_domain(xml)
    for disk in domain.disks:
        assert disk.layers and disk.layers[0].format == "qcow2"
        assert all(layer.path for layer in disk.layers)
        # only a qcow2 layer can have a layer below it
        assert all(layer.format == "qcow2" for layer in disk.layers[:-1])
    tops = {disk.layers[0].path for disk in domain.disks}
    assert not tops & set(domain.raw_files)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_parsed_or_refused_by_name(text: str) -> None:
    with contextlib.suppress(DomainXMLInvalid):
        parse_domain(text)


def test_a_file_that_is_also_a_raw_disk_is_never_taken_for_qcow2() -> None:
    xml = (
        "<domain><name>n</name><devices>"
        "<disk type='file' device='disk'><driver type='qcow2'/><source file='/i/x'/>"
        "<target dev='vda'/></disk>"
        "<disk type='file' device='disk'><source file='/i/x'/><target dev='vdb'/></disk>"
        "</devices></domain>"
    )
    domain = parse_domain(xml)
    assert domain.disks == ()
    assert {skip.target for skip in domain.skipped} == {"vda", "vdb"}
    assert "raw disk" in next(s.reason for s in domain.skipped if s.target == "vda")
