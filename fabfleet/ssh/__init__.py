"""SSH: connections and host keys, the liveness watchdog, commands, quoting and the one
launcher of host-side Python, tunnels, and mirroring remote output. Fabric and Paramiko
are used here and nowhere above (errors are translated in :func:`fabfleet.errors.host_errors`)."""
