"""Scheduler directives (``sbatch:``/``qsub:`` in the inventory, ``--sbatch``/``--qsub``).

Each directive is a word of the submit command's own command line (``--time=10``,
``-p gpu``), handed to ``sbatch``/``qsub`` as an argument vector: no shell and no
``#SBATCH`` line ever parses them. The options fabfleet sets itself (the job's name,
output file, work dir, ``--parsable``) and those that would change what a job is
(``--wrap``, arrays, ``--wait``) are refused with the reason.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

SCHEDULERS = ("slurm", "pbs")
FLAG = {"slurm": "sbatch", "pbs": "qsub"}

# option -> why it is refused
_OURS = {
    "slurm": {"--output": "fabfleet sets the job's output file (its run dir)",
              "-o": "fabfleet sets the job's output file (its run dir)",
              "--error": "the job's stderr goes with its output, in its run dir",
              "-e": "the job's stderr goes with its output, in its run dir",
              "--job-name": "fabfleet names the job after its run id",
              "-J": "fabfleet names the job after its run id",
              "--chdir": "the job runs in the pushed project (run from another local dir)",
              "-D": "the job runs in the pushed project (run from another local dir)",
              "--parsable": "fabfleet reads the job id with it already",
              "--wrap": "the command comes after `--` (fabfleet run) or as the script",
              "--array": "one run is one job; use `map` or the queue for many",
              "-a": "one run is one job; use `map` or the queue for many",
              "--wait": "fabfleet follows the job itself (use --detach to return at once)",
              "-W": "fabfleet follows the job itself (use --detach to return at once)"},
    "pbs": {"-o": "fabfleet sets the job's output file (its run dir)",
            "-e": "the job's stderr goes with its output, in its run dir",
            "-j": "the job's stderr goes with its output, in its run dir",
            "-N": "fabfleet names the job after its run id",
            "-J": "one run is one job; use `map` or the queue for many",
            "-I": "interactive jobs are not batch jobs"},
}


class DirectiveError(ValueError):
    pass


def parse(scheduler: str, value: str | Sequence[str] | None, where: str) -> tuple[str, ...]:
    """The words of ``value`` (a string split as a shell would, or a list of such
    strings); raises :class:`DirectiveError` naming ``where`` for a word that is not an
    option or its value, or an option fabfleet owns."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    words: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise DirectiveError(f"{where}: expected {FLAG[scheduler]} options as strings, "
                                 f"got {item!r}")
        try:
            words += shlex.split(item)
        except ValueError as exc:
            raise DirectiveError(f"{where}: {item!r}: {exc}") from None
    for i, word in enumerate(words):
        if any(ch in word for ch in "\n\r\0"):
            raise DirectiveError(f"{where}: {word!r}: a directive is one line")
        if i == 0 and not word.startswith("-"):
            raise DirectiveError(f"{where}: {word!r} is not a {FLAG[scheduler]} option "
                                 "(options start with '-', e.g. --time=10)")
        name = word.split("=", 1)[0]
        if word.startswith("-") and name in _OURS[scheduler]:
            raise DirectiveError(f"{where}: {name} is not accepted: "
                                 f"{_OURS[scheduler][name]}")
    return tuple(words)
