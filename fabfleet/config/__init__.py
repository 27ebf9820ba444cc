"""Data and resolution: inventory records (:mod:`.inventory`), the one resolver of the
project, its settings, the inventory path and the remote layout (:mod:`.settings`), and
every deadline (:mod:`.deadlines`). Pure: no connections."""
