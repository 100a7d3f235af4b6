"""IOC side (EPICS): filter IOC and simulated camera."""
