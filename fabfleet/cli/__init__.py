"""The command line: the ``fabfleet`` program (:mod:`.program`), how tasks take their
arguments (:mod:`.options`), the tasks (:mod:`.tasks`) and what ``init`` writes
(:mod:`.starter`). It only wraps the library: parse, call, render, exit."""
