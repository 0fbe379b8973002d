"""Disks and chains out of libvirt domain XML."""

from __future__ import annotations

from virt_bitmapd.domain_xml import parse_domain

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
    assert domain.unsupported == ("vdb",)


def test_inactive_xml_names_only_the_top() -> None:
    vdc = parse_domain(LIVE).disks[1]
    assert vdc.paths == ("/images/data.qcow2",)
    assert not vdc.complete and vdc.layers[0].index is None and vdc.layers[0].format_node is None
