"""Tools around memfs, not memfs itself: setting a checkout up (bootstrap), the
tests that need a VM (vm), a daemon in a subprocess (localdaemon) and the demo."""
