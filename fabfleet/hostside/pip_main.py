"""The ``__main__`` of the pip zip app fabfleet lends to a venv made without pip (a host
whose Python has no ensurepip): ``python pip-X.pyz install …`` runs pip from the zip,
installing into the interpreter that runs it."""

import runpy

if __name__ == "__main__":
    runpy.run_module("pip", run_name="__main__", alter_sys=True)
