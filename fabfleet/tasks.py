"""fabfleet's task collection for ``inv`` and Fabric: ``from fabfleet.tasks import ns``.

The tasks themselves are :mod:`fabfleet.cli.tasks`; this is the name projects import
(``fabfleet init`` writes a one-line ``tasks.py`` that does), the same object the
``fabfleet`` command runs.
"""

from .cli.tasks import ns

__all__ = ["ns"]
