"""A libvirt domain's XML, read and rewritten as pure functions over xml.etree: which disks are image files
(to adopt), which are p2pvbd NBD disks, and pointing those at a host's p2pvbd socket. Everything else in
the domain is kept as it was."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

# Image formats adoption reads: raw as is, qcow2 through qemu-img (sparse regions stay sparse).
IMAGE_FORMATS = ("raw", "qcow2")
# Namespaces libvirt domains use for extensions, kept under their usual prefixes when written back.
NAMESPACES = {"qemu": "http://libvirt.org/schemas/domain/qemu/1.0",
              "metadata": "http://libvirt.org/schemas/domain/metadata/1.0"}
for _prefix, _uri in NAMESPACES.items():
    ET.register_namespace(_prefix, _uri)


class DomainXmlError(ValueError):
    """The XML is not a domain definition this module can work with; the message is for the user."""


@dataclass(frozen=True)
class ImageDisk:
    """A disk of the domain backed by a local image file."""

    target: str  # the guest's device name (vda, sda, …): stable across the rewrite
    path: str
    fmt: str


def _root(xml: str) -> ET.Element:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise DomainXmlError(f"not valid XML: {e}") from None
    if root.tag != "domain":
        raise DomainXmlError(f"not a libvirt domain definition (root element <{root.tag}>)")
    return root


def _disks(root: ET.Element) -> list[ET.Element]:
    devices = root.find("devices")
    return [] if devices is None else [d for d in devices.findall("disk") if d.get("device", "disk") == "disk"]


def _target(disk: ET.Element) -> str:
    target = disk.find("target")
    dev = target.get("dev") if target is not None else None
    if not dev:
        raise DomainXmlError("a disk has no <target dev=…>")
    return dev


def name(xml: str) -> str:
    el = _root(xml).find("name")
    if el is None or not el.text:
        raise DomainXmlError("the domain has no <name>")
    return el.text


def image_disks(xml: str) -> list[ImageDisk]:
    """The domain's disks that are local image files (type='file' or 'block'), to be adopted."""
    out = []
    for disk in _disks(_root(xml)):
        if disk.get("type") not in ("file", "block"):
            continue
        source = disk.find("source")
        path = source.get("file") or source.get("dev") if source is not None else None
        if not path:
            continue  # an empty drive
        driver = disk.find("driver")
        fmt = (driver.get("type") if driver is not None else None) or "raw"
        out.append(ImageDisk(_target(disk), path, fmt))
    return out


def nbd_disks(xml: str) -> dict[str, tuple[str, str]]:
    """Target -> (export name, Unix socket path) of every NBD disk on a Unix socket: p2pvbd's disks are
    among them (the daemon tells which)."""
    out = {}
    for disk in _disks(_root(xml)):
        source = disk.find("source")
        if disk.get("type") != "network" or source is None or source.get("protocol") != "nbd":
            continue
        host = source.find("host")
        if host is None or host.get("transport") != "unix" or not source.get("name"):
            continue
        out[_target(disk)] = (source.get("name", ""), host.get("socket", ""))
    return out


def _serialize(root: ET.Element) -> str:
    return ET.tostring(root, encoding="unicode")


def adopt(xml: str, disks: dict[str, str], socket: str) -> str:
    """The domain with each image disk of ``disks`` (target -> p2pvbd disk name) made an NBD network disk
    on ``socket``. Driver options (cache, io, discard) are kept; the format becomes raw (p2pvbd serves
    the guest's bytes, not an image format), and backing chains go."""
    root = _root(xml)
    for disk in _disks(root):
        target = _target(disk)
        if target not in disks or disk.get("type") not in ("file", "block"):
            continue
        disk.set("type", "network")
        for child in list(disk):
            if child.tag in ("source", "backingStore"):
                disk.remove(child)
        source = ET.Element("source", {"protocol": "nbd", "name": disks[target]})
        ET.SubElement(source, "host", {"transport": "unix", "socket": socket})
        disk.insert(0, source)
        driver = disk.find("driver")
        if driver is None:
            driver = ET.Element("driver", {"name": "qemu"})
            disk.insert(0, driver)
        driver.set("type", "raw")
    return _serialize(root)


def point_at(xml: str, disks: set[str], socket: str) -> str:
    """The domain with its NBD disks named in ``disks`` (p2pvbd disk names) on ``socket``: how a domain
    arriving at a host is made to use that host's daemon."""
    root = _root(xml)
    for disk in _disks(root):
        source = disk.find("source")
        host = source.find("host") if source is not None else None
        if (disk.get("type") == "network" and source is not None and source.get("protocol") == "nbd"
                and source.get("name") in disks and host is not None and host.get("transport") == "unix"):
            host.set("socket", socket)
    return _serialize(root)
