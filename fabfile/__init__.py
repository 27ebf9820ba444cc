"""The Fabric/Invoke face of fabfleet, kept for projects written against its old name.

``import fabfile`` gives the very objects of :mod:`fabfleet` (not copies), and
``from fabfile.tasks import ns`` the same collection as ``from fabfleet.tasks import
ns``. New code imports ``fabfleet``: a project with its own ``fabfile.py`` (Fabric's
default collection name) cannot import a package called ``fabfile``.
"""

import fabfleet
from fabfleet import __all__, __version__  # noqa: F401


def __getattr__(name):
    return getattr(fabfleet, name)


def __dir__():
    return dir(fabfleet)
