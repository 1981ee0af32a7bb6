"""`p2pvbd libvirt adopt DOMAIN`: a shut-off libvirt domain's image files become p2pvbd disks owned by
this host, and the domain is redefined with NBD network disks on this host's p2pvbd socket. Everything
else in the domain stays. Runs in the CLI: it drives virsh and qemu-img, and the daemon over its
control socket (which writes every block, like any guest)."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from p2pvbd.base.control import ControlError, call
from p2pvbd.base.home import NAME_RE, Home
from p2pvbd.libvirt import book, domxml
from p2pvbd.libvirt.virsh import Virsh, VirshError

# Disk sizes are whole 512-byte sectors (daemon.SECTOR): a qcow2's virtual size is rounded up to them.
SECTOR = 512
# An import copies the whole image; this bounds a stuck qemu-img, not a slow disk (1 TiB at 100 MB/s).
CONVERT_SECONDS = 3 * 3600.0
# qemu-img's info answers at once.
INFO_SECONDS = 60.0


class AdoptError(Exception):
    """The domain cannot be adopted; the message is for the user."""


def disk_name(domain: str, target: str) -> str:
    """The p2pvbd disk of a domain's ``target`` (vda): both names, made safe for a disk name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{domain}-{target}")[:64]


def adopt(home: Home, domain: str, virsh: Virsh, delete_images: bool = False) -> dict[str, Any]:
    if not NAME_RE.fullmatch(domain):
        raise AdoptError(f"domain name {domain!r}: p2pvbd adopts domains named with 1-64 letters, digits, '.', "
                         "'_' or '-' (rename it with 'virsh domrename')")
    try:
        state = virsh.run("domstate", domain).strip()
        if state != "shut off":
            raise AdoptError(f"domain {domain} is {state}: shut it down first ('virsh shutdown {domain}'); "
                             "its images are copied while nothing writes them")
        xml = virsh.run("dumpxml", "--inactive", domain)
    except VirshError as e:
        raise AdoptError(str(e)) from None
    if book.load(home.path, domain) is not None:
        raise AdoptError(f"domain {domain} is adopted already (see 'p2pvbd libvirt list')")
    images = domxml.image_disks(xml)
    if not images:
        raise AdoptError(f"domain {domain} has no disk image file to adopt")
    for img in images:
        if img.fmt not in domxml.IMAGE_FORMATS:
            raise AdoptError(f"{img.path} is a {img.fmt} image: adopt takes {' or '.join(domxml.IMAGE_FORMATS)}")
        if not Path(img.path).is_file():
            raise AdoptError(f"{img.path} ({img.target}) is not an image file here")
    disks: dict[str, str] = {}
    for img in images:
        disks[img.target] = name = disk_name(domain, img.target)
        if img.fmt == "raw":
            call(home.control_socket, "disk_import", {"name": name, "path": img.path})
        else:
            _import_qcow2(home, name, img.path)
    new_xml = domxml.adopt(xml, disks, str(home.nbd_socket))
    with tempfile.NamedTemporaryFile("w", suffix=".xml") as f:
        f.write(new_xml)
        f.flush()
        try:
            virsh.run("define", f.name)
        except VirshError as e:
            raise AdoptError(f"libvirt refused the adopted definition: {e}") from None
    rec = book.DomainRecord(domain, disks, {img.target: img.path for img in images})
    if delete_images:
        for img in images:
            Path(img.path).unlink(missing_ok=True)
        rec.images = {}
    book.save(home.path, rec)
    return {"domain": domain, "disks": disks, "images": rec.images, "socket": str(home.nbd_socket)}


def _import_qcow2(home: Home, name: str, path: str) -> None:
    """A new disk of the image's virtual size, written by qemu-img over NBD: only the clusters holding
    data (``--target-is-zero``: the new disk reads as zeros, so zero and unallocated clusters stay holes)."""
    try:
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", path], capture_output=True,
                                         text=True, check=True, timeout=INFO_SECONDS).stdout)
    except (subprocess.CalledProcessError, ValueError) as e:
        raise AdoptError(f"qemu-img cannot read {path}: {getattr(e, 'stderr', '') or e}") from None
    # qemu-img convert reads through any backing chain: the disk gets the guest's whole view
    size = -(-int(info["virtual-size"]) // SECTOR) * SECTOR
    call(home.control_socket, "disk_create", {"name": name, "size": size})
    res = subprocess.run(["qemu-img", "convert", "-n", "--target-is-zero", "-f", "qcow2", "-O", "raw", path,
                          home.nbd_uri(name)], capture_output=True, text=True, timeout=CONVERT_SECONDS)
    if res.returncode != 0:
        raise AdoptError(f"copying {path} into disk {name} failed: {res.stderr.strip()}")


def list_domains(home: Home) -> list[dict[str, Any]]:
    return [{"domain": r.domain, "disks": r.disks, "images": r.images} for r in book.all_records(home.path)]


__all__ = ["AdoptError", "ControlError", "adopt", "disk_name", "list_domains"]
