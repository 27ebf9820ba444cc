"""``from fabfile.tasks import ns``: fabfleet's task collection under its old import name
(the same object as :data:`fabfleet.tasks.ns`)."""

from fabfleet.tasks import ns

__all__ = ["ns"]
