"""The node runtime: torchrun for one node, the ranks' signals and beacons, the watchdog."""
