"""Apps handed the fleet: Dask (:mod:`.dask`) and Jupyter (:mod:`.jupyter`), each run as
fabfleet jobs and reached through tunnels over verified connections."""
