"""p2pvbd: peer-to-peer versioned virtual block devices with live migration."""

__version__ = "0.1.0"
