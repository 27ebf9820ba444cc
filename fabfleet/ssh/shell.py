"""Every remote command line is built here, with every value ``shlex.quote``d.

Commands are POSIX ``sh``: they are wrapped in ``sh -c '…'`` so that a user whose login
shell is fish or tcsh gets the same behaviour. :func:`env_prefix` is the one way into a
host's environment (``env`` vars, venv or conda env, the interpreter check); the one
launcher of host-side Python built on it is :mod:`fabfleet.ssh.launch`.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping

from ..config.inventory import Host
from ..config.settings import layout

q = shlex.quote


def path(p: str) -> str:
    """Quote a remote path, keeping a leading ``~`` meaning the remote home. A relative
    path starting with ``-`` gets ``./`` so no command can read it as an option."""
    if p == "~":
        return '"$HOME"'
    if p.startswith("~/"):
        return '"$HOME"/' + q(p[2:])
    if p.startswith("-"):
        p = "./" + p
    return q(p)


def home_relative(p: str) -> str:
    """``~/x`` → ``x``: SFTP and rsync paths are relative to the login (home) dir
    (``./-x`` for a path starting with ``-``)."""
    if p == "~":
        return "."
    p = p[2:] if p.startswith("~/") else p
    return "./" + p if p.startswith("-") else p


def join(parts: Iterable[str]) -> str:
    """Quote each word and join them: ``join(["ls", "a b"]) == "ls 'a b'"``."""
    return " ".join(q(p) for p in parts)


def sh(script: str) -> str:
    """``sh -c SCRIPT`` so the remote login shell does not matter."""
    return f"sh -c {q(script)}"


def exports(env: Mapping[str, str]) -> str:
    """``export A='x' B='y';`` (names were validated by the inventory)."""
    if not env:
        return ""
    return "export " + " ".join(f"{k}={q(v)}" for k, v in env.items()) + "; "


# Where conda usually lives when it is not on a non-interactive PATH.
_CONDA_GUESSES = ("$CONDA_EXE", "$HOME/miniforge3/bin/conda", "$HOME/mambaforge/bin/conda",
                  "$HOME/miniconda3/bin/conda", "$HOME/anaconda3/bin/conda",
                  "/opt/conda/bin/conda", "/opt/miniconda3/bin/conda")


def activation(host: Host, venv: str | None = None) -> str:
    """Shell that activates the host's venv or conda env (``""`` if it has none).

    Fails (non-zero) with a message on stderr when the env does not activate. ``venv``
    overrides the inventory's (e.g. the one ``setup-workdir --requirements`` made).
    """
    venv = venv or host.venv
    if venv:
        activate = f"{path(venv.rstrip('/'))}/bin/activate"
        return (f"{{ [ -f {activate} ] && . {activate}; }} || "
                f"{{ echo {q(f'fabfleet: venv {venv} does not exist or does not activate')} >&2;"
                " false; }")
    if host.conda_env:
        guesses = " ".join(f'"{g}"' for g in _CONDA_GUESSES)
        missing = q("fabfleet: conda not found (tried PATH, $CONDA_EXE, ~/miniforge3, "
                    "~/miniconda3, ~/anaconda3, /opt/conda)")
        failed = q(f"fabfleet: `conda activate {host.conda_env}` failed")
        return (
            'fabfleet_conda=$(command -v conda 2>/dev/null); '
            f'for c in {guesses}; do [ -z "$fabfleet_conda" ] && [ -x "$c" ] && '
            'fabfleet_conda=$c; done; '
            f'{{ [ -n "$fabfleet_conda" ] || {{ echo {missing} >&2; false; }}; }} && '
            '. "$("$fabfleet_conda" info --base)/etc/profile.d/conda.sh" && '
            f'{{ conda activate {q(host.conda_env)} || {{ echo {failed} >&2; false; }}; }}'
        )
    return ""


def run_activation(host: Host, project: str | None = None) -> str:
    """The env runs, payloads and check-env use: the inventory's venv/conda env, else the
    project's venv (``<work_dir>/.venvs/<project>``) when ``setup-workdir
    --requirements`` made one, else none."""
    act = activation(host)
    if act or not project:
        return act
    activate = path(f"{layout(host, project)['venv']}/bin/activate")
    return f"if [ -f {activate} ]; then . {activate}; fi"


ERR = "fabfleet-error:"  # marks our own failures on stderr, apart from the user's program


def env_prefix(host: Host, project: str | None = None, *, report_env_error: bool = False) -> str:
    """Shell that sets the host's ``env`` vars, activates its env (see
    :func:`run_activation`) and checks the interpreter exists, before ``exec PYTHON …``.

    Fails with exit 97 (``fabfleet-error: env``) when the env does not activate and 127
    (``fabfleet-error: python``) when the interpreter is missing. With
    ``report_env_error`` (the environment probe), a failed activation does not stop the
    command: its message is left in ``$fabfleet_env_err`` for the program to report."""
    act = run_activation(host, project) or "true"
    py = q(host.python)
    if report_env_error:
        # Activate in this shell (a subshell would not keep it); keep its stderr.
        activate = ('fabfleet_env_err=; fabfleet_t=$(mktemp) && '
                    f'{{ {{ {act}; }} >/dev/null 2>"$fabfleet_t" || '
                    '{ fabfleet_env_err=$(cat "$fabfleet_t"); '
                    '[ -n "$fabfleet_env_err" ] || fabfleet_env_err="activation failed"; }; '
                    'rm -f "$fabfleet_t"; }; ')
    else:
        activate = f"{{ {act}; }} || {{ echo {q(ERR + ' env')} >&2; exit 97; }}; "
    return (exports(host.env) + activate
            + f"command -v {py} >/dev/null 2>&1 || {{ echo "
            f"{q(f'{ERR} python: {host.python} not found on this host')} >&2; "
            "exit 127; }; ")
