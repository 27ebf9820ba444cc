"""Code that runs on the hosts. Standard library only; each module is sent to a host as
its own source and run there by the host's Python (:mod:`fabfleet.ssh.launch`), and must
compile for the oldest Python a host may have (3.6: an old interpreter is reported with
its version, never crashed on). Locally these modules are imported only for their
constants, and by the tests, which run them in local subprocesses.

==============  ==============================================================
``runner``      script and command runs: tee output, record the run, timeouts,
                detached jobs, job status, logs, kill, stop
``worker``      the payload worker: pickled calls over a framed protocol
``probe``       the environment probe behind check-env and top
``versions``    installed package versions (the Dask preflight)
``dask_app``    the Dask scheduler and workers, started as detached jobs
``jupyter_app`` finding, launching and waiting for a Jupyter server
``pip_main``    the entry point of the pip zip app lent to venvs without pip
==============  ==============================================================
"""
