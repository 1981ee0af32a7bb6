"""Pure codecs of what travels between hosts: no sockets, no clocks."""
