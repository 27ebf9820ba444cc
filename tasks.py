"""This repo's tasks for ``inv``: fabfleet's own collection plus the development-only
``testbed.up`` / ``testbed.down``. Users get the same collection from the installed
package: ``fabfleet TASK`` or a one-line ``tasks.py`` (``fabfleet init`` writes it)."""

from invoke import Collection, task

from fabfleet import render
from fabfleet.tasks import ns as fleet


@task(help={"prefix": "port prefix: hosts listen on 127.0.0.1:<prefix>01… (default 22)"})
def testbed_up(c, prefix=22):
    """Start the local SSH testbed (Docker) and write testbed/state/inventory.yaml."""
    import testbed
    inv = testbed.up(int(prefix))
    render.say(f"testbed is up; its inventory: {inv}\n"
                    f"use it with:  export FABFLEET_INVENTORY={inv}")


@task(help={"prefix": "port prefix given to testbed.up"})
def testbed_down(c, prefix=22):
    """Stop and remove the local SSH testbed's containers."""
    import testbed
    testbed.down(int(prefix))


ns = Collection()
for name, t in fleet.tasks.items():
    ns.add_task(t, name=name)
ns.configure(fleet.configuration())
ns.add_collection(Collection("testbed", up=testbed_up, down=testbed_down))
