"""The libvirt wing's pure parts and the service unit: domain XML rewriting, the hook's answers without a
daemon, and p2pvbd.service as systemd reads it."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from p2pvbd.base.home import Home
from p2pvbd.libvirt import domxml, hook
from tests.daemons import BIN

XML = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web</name>
  <memory unit='MiB'>512</memory>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' discard='unmap'/>
      <source file='/var/lib/libvirt/images/web.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/base.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/debian.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <interface type='network'><source network='default'/></interface>
  </devices>
  <qemu:commandline><qemu:arg value='-no-reboot'/></qemu:commandline>
</domain>"""


def test_adoption_rewrites_only_the_image_disks() -> None:
    assert domxml.name(XML) == "web"
    assert domxml.image_disks(XML) == [domxml.ImageDisk("vda", "/var/lib/libvirt/images/web.qcow2", "qcow2")]
    new = domxml.adopt(XML, {"vda": "web-vda"}, "/srv/p2p/nbd.sock")
    assert domxml.nbd_disks(new) == {"vda": ("web-vda", "/srv/p2p/nbd.sock")}
    root = ET.fromstring(new)
    disk = root.find("devices/disk[@device='disk']")
    assert disk is not None and disk.get("type") == "network" and disk.find("backingStore") is None
    driver = disk.find("driver")
    assert driver is not None and driver.attrib == {"name": "qemu", "type": "raw", "cache": "none", "discard": "unmap"}
    assert root.find("devices/disk[@device='cdrom']/source").get("file") == "/iso/debian.iso"  # type: ignore[union-attr]
    assert root.find("devices/interface/source").get("network") == "default"  # type: ignore[union-attr]
    assert "qemu:commandline" in new and "-no-reboot" in new  # extensions keep their prefix


def test_an_arriving_domain_is_pointed_at_this_hosts_socket() -> None:
    adopted = domxml.adopt(XML, {"vda": "web-vda"}, "/office/nbd.sock")
    moved = domxml.point_at(adopted, {"web-vda"}, "/car/nbd.sock")
    assert domxml.nbd_disks(moved) == {"vda": ("web-vda", "/car/nbd.sock")}
    assert domxml.nbd_disks(domxml.point_at(adopted, {"other"}, "/car/nbd.sock"))["vda"][1] == "/office/nbd.sock"


def test_not_a_domain_is_a_clear_error() -> None:
    with pytest.raises(domxml.DomainXmlError, match="not a libvirt domain"):
        domxml.image_disks("<network/>")


def test_the_hook_refuses_a_migration_when_no_daemon_runs_here(tmp_path: Path) -> None:
    """A domain on p2pvbd disks cannot arrive where no daemon serves them: libvirt is told so at
    `migrate begin` and keeps the domain at its source. A domain with no NBD disk is left alone."""
    home = Home(tmp_path)
    adopted = domxml.adopt(XML, {"vda": "web-vda"}, "/office/nbd.sock")
    status, out, err = hook.handle(home, "web", "migrate", "begin", adopted)
    assert status == 1 and out == "" and "no p2pvbd daemon runs on this host" in err
    assert hook.handle(home, "web", "migrate", "begin", XML) == (0, "", "")
    status, _, err = hook.handle(home, "web", "prepare", "begin", adopted)
    assert status == 1 and "no p2pvbd daemon runs on this host" in err
    assert hook.handle(home, "web", "prepare", "begin", XML) == (0, "", "")
    assert hook.handle(home, "web", "stopped", "end", adopted) == (0, "", "")


def test_install_hook_keeps_another_programs_hook(tmp_path: Path) -> None:
    other = tmp_path / "qemu"
    other.write_text("#!/bin/sh\nexit 0\n")
    with pytest.raises(Exception, match="another program's hook"):
        hook.install(tmp_path, tmp_path / "home")
    other.unlink()
    path = hook.install(tmp_path, tmp_path / "home")
    assert path.stat().st_mode & 0o111 and "p2pvbd.libvirt.hook" in path.read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_service_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`p2pvbd install-service` writes a unit systemd accepts, for this home and this p2pvbd. verify reads the
    unit and checks its executables without a running systemd."""
    home = tmp_path / "home"
    subprocess.run([BIN, "init", "unit-pc", "--home", str(home)], check=True, capture_output=True)
    units = tmp_path / "units"
    subprocess.run([BIN, "install-service", "--home", str(home), "--unit-dir", str(units)], check=True,
                   capture_output=True)
    unit = units / "p2pvbd.service"
    text = unit.read_text()
    assert f"ExecStart={BIN} daemon --home {home}" in text and "LimitNOFILE=65536" in text
    assert "Before=libvirtd.service virtqemud.service libvirt-guests.service" in text
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert res.returncode == 0 and "p2pvbd.service" not in res.stderr, res.stderr
