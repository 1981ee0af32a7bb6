"""Who is who in the swarm and how hosts talk: this host's node and the version-map exchange."""
