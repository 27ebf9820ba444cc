"""The ``fabfleet`` command: an Invoke ``Program`` over :data:`fabfleet.tasks.ns`.

As Fabric's ``fab`` is to its collection: the same tasks and flags as ``inv`` with a
``tasks.py`` that imports ``ns``, from any directory, without a ``tasks.py``. Invoke
configuration is loaded as ``inv`` would: ``/etc/invoke.yaml``, ``~/.invoke.yaml``,
``INVOKE_*`` variables, ``-f FILE`` — and the project's own ``invoke.yaml`` (at the
project root, where ``inv`` would find it next to ``tasks.py``).
"""

from __future__ import annotations

from invoke import Program

from .. import __version__
from ..config.settings import find_project
from .options import set_raw_command
from .tasks import ns


class FleetProgram(Program):
    """Invoke's Program with the project's ``invoke.yaml`` loaded as project config."""

    def run(self, argv=None, exit: bool = True):  # noqa: A002 - Invoke's signature
        import sys
        argv = list(sys.argv if argv is None else (argv.split() if isinstance(argv, str)
                                                   else argv))
        return super().run(set_raw_command(argv), exit=exit)

    def parse_collection(self) -> None:
        super().parse_collection()
        self.config.set_project_location(str(find_project()))
        self.config.load_project()


program = FleetProgram(name="fabfleet", binary="fabfleet", binary_names=["fabfleet"],
                       version=__version__, namespace=ns)


def main() -> None:
    """Console-script entry point."""
    try:
        program.run()
    except BrokenPipeError:  # `fabfleet --list | head`: the reader left; not an error
        import os
        import sys
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    main()
