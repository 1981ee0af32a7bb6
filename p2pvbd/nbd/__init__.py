"""The guest-facing NBD server over wire/nbd_codec, and its TLS."""
