"""Many hosts at once: fan-out with per-host deadlines, check-env/top over hosts, runs
over hosts, the one scheduler behind ``map`` and the Executor, and :class:`Inventory`."""
