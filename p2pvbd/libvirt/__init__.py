"""libvirt's domains on p2pvbd disks: adopting a domain, the qemu hook that moves its disks whenever libvirt
migrates it, and the daemon's side of that (see docs/DESIGN.md, "With libvirt")."""
