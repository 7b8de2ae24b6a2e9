"""The MURA data layer: reading, checking, splitting, decoding and caching radiographs."""
