"""Every remote command line is built here, with every value ``shlex.quote``d.

Commands are POSIX ``sh``: they are wrapped in ``sh -c '…'`` so that a user whose login
shell is fish or tcsh gets the same behaviour. :func:`in_env` is the one way into a
host's environment (``env`` vars, venv or conda env, the interpreter check); the one
launcher of host-side Python built on it is :mod:`fabfleet.ssh.launch`.
"""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

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
# Where micromamba usually lives (a single binary, often on hosts without conda).
_MAMBA_GUESSES = ("$MAMBA_EXE", "$HOME/.local/bin/micromamba", "$HOME/micromamba/bin/micromamba",
                  "$HOME/bin/micromamba", "/opt/micromamba/bin/micromamba",
                  "/usr/local/bin/micromamba")


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
        env = q(host.conda_env)
        conda = " ".join(f'"{g}"' for g in _CONDA_GUESSES)
        mamba = " ".join(f'"{g}"' for g in _MAMBA_GUESSES)
        missing = q("fabfleet: neither conda nor micromamba found (tried PATH, $CONDA_EXE, "
                    "$MAMBA_EXE, ~/miniforge3, ~/miniconda3, ~/anaconda3, /opt/conda, "
                    "~/.local/bin/micromamba, /opt/micromamba)")
        failed = q(f"fabfleet: `conda activate {host.conda_env}` failed")
        return (
            'fabfleet_conda=$(command -v conda 2>/dev/null); '
            f'for c in {conda}; do [ -z "$fabfleet_conda" ] && [ -x "$c" ] && '
            'fabfleet_conda=$c; done; '
            'if [ -n "$fabfleet_conda" ]; then '
            '. "$("$fabfleet_conda" info --base)/etc/profile.d/conda.sh" && '
            f'{{ conda activate {env} || {{ echo {failed} >&2; false; }}; }}; '
            'else fabfleet_mamba=$(command -v micromamba 2>/dev/null); '
            f'for m in {mamba}; do [ -z "$fabfleet_mamba" ] && [ -x "$m" ] && '
            'fabfleet_mamba=$m; done; '
            f'if [ -z "$fabfleet_mamba" ]; then echo {missing} >&2; false; '
            'else eval "$("$fabfleet_mamba" shell hook -s posix)" && '
            f'{{ micromamba activate {env} || {{ echo {failed} >&2; false; }}; }}; fi; fi'
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


def _setup(host: Host, report: bool) -> str:
    """The host's ``setup:`` lines, in this shell (so what they change stays). A failing
    line stops the command with exit 97 and ``fabfleet-error: setup: LINE`` on stderr;
    with ``report`` (the probe), it is noted in ``$fabfleet_env_err`` instead."""
    out = ""
    for line in host.setup:
        said = q(f"{ERR} setup: {line}")
        if report:
            out += (f'[ -n "$fabfleet_env_err" ] || {{ {line}\n}} 2>"$fabfleet_t" || '
                    f'fabfleet_env_err="setup line failed: "{q(line)}": $(cat "$fabfleet_t")"; ')
        else:
            out += f"{{ {line}\n}} || {{ echo {said} >&2; exit 97; }}; "
    return out


def workdir_guard(host: Host, project: str | None = None) -> str:
    """Shell that refuses (exit 97, ``fabfleet-error: workdir: …``) a work dir — or, with
    ``project``, one of that project's dirs (code, runs, venv) — that exists but is not
    the user's own, or that group or others can write, as OpenSSH's StrictModes refuses
    such a home: whoever can write there could put an ``activate`` script or a module in
    your runs' way. Runs before anything is sourced."""
    wd = host.work_dir.rstrip("/") or "/"
    paths = [wd]
    if project:
        lay = layout(host, project)
        paths += [lay["project"], posixpath.dirname(lay["runs"]), lay["runs"],
                  posixpath.dirname(lay["venv"]), lay["venv"]]
    said = q(f"{ERR} workdir: ") + '"$fabfleet_bad"' + q(
        " is not yours alone (owned by another user, or writable by group or others)")
    return ('fabfleet_bad=$(find ' + " ".join(path(p) for p in paths)
            + ' -maxdepth 0 \\( ! -user "$(id -un)" -o -perm -020 -o -perm -002 \\) -print '
            "2>/dev/null | head -n 1); "
            f'if [ -n "$fabfleet_bad" ]; then echo {said} >&2; exit 97; fi; ')


@dataclass(frozen=True)
class Remote:
    """A remote command whose substance travels on stdin: ``command`` is the command line
    every user of the host can read in ``/proc/PID/cmdline`` (nothing secret or large);
    ``stdin`` is what it reads first (the rest of the channel's stdin is left to the
    program). :func:`fabfleet.ssh.exec.execute` sends it."""
    command: str
    stdin: bytes = b""

    def then(self, other: "Remote") -> "Remote":
        """Both, one after the other, in one round trip (the first must read all of its
        stdin: the probe does)."""
        return Remote(f"{self.command} ; {other.command}", self.stdin + other.stdin)


# Reads a shell script of N lines from stdin (the first line is N) and runs it. `read`
# takes a pipe one byte at a time, so nothing after the script is consumed.
_READER = ('fabfleet_n=; IFS= read -r fabfleet_n || { echo ' + q(f"{ERR} boot: no command on "
           "stdin") + ' >&2; exit 95; }; fabfleet_s=; while [ "$fabfleet_n" -gt 0 ] 2>/dev/null; '
           'do IFS= read -r fabfleet_l || exit 95; fabfleet_s="$fabfleet_s$fabfleet_l\n"; '
           'fabfleet_n=$((fabfleet_n-1)); done; eval "$fabfleet_s"')


def from_stdin(guard: str, script: str, then: bytes = b"") -> Remote:
    """``sh -c 'GUARD READER'`` reading ``script`` (and leaving ``then`` for it) on stdin."""
    text = script if script.endswith("\n") else script + "\n"
    return Remote(sh(guard + _READER), f"{text.count(chr(10))}\n{text}".encode() + then)


def in_env(host: Host, script: str, *, project: str | None = None, activate: bool = True,
           report_env_error: bool = False, stdin: bytes = b"") -> Remote:
    """The whole remote command for ``script`` (POSIX sh) inside the host's environment:
    ``env`` vars exported, ``setup:`` lines run, the venv/conda env activated (see
    :func:`run_activation`; not with ``activate=False``), the interpreter checked.

    With ``shell: login`` the ``setup:`` lines run in the user's own login shell started
    as a login shell (its profile scripts define ``module`` and friends), which then
    hands over to ``sh`` with the environment it built.

    Fails with exit 97 (``fabfleet-error: setup: LINE`` or ``fabfleet-error: env``) when
    a setup line fails or the env does not activate, and 127 (``fabfleet-error:
    python``) when the interpreter is missing. With ``report_env_error`` (the
    environment probe), a failed setup or activation does not stop the command: its
    message is left in ``$fabfleet_env_err`` for the program to report.

    Only the work-dir guard and a reader are on the command line: the script itself,
    with the ``env`` values, comes on stdin (followed by ``stdin``), so other users of
    the host never see a secret in ``/proc/PID/cmdline``. With ``shell: login`` the
    values reach the login shell in its environment (private to the user), not its
    argv."""
    return from_stdin(workdir_guard(host, project),
                      env_script(host, script, project=project, activate=activate,
                                 report_env_error=report_env_error), stdin)


def env_script(host: Host, script: str, *, project: str | None = None, activate: bool = True,
               report_env_error: bool = False, values: str | None = None) -> str:
    """The shell text :func:`in_env` runs after its guard: ``values`` (the statement that
    sets the ``env`` values; default: their ``export``), setup lines, activation, the
    interpreter check, then ``script``. A batch job's script is built from it too."""
    act = (run_activation(host, project) if activate else "") or "true"
    py = q(host.python)
    first = ""
    values = exports(host.env) if values is None else values
    if report_env_error:
        first = 'fabfleet_env_err=; fabfleet_t=$(mktemp) || fabfleet_t=/dev/null; '
        # Activate in this shell (a subshell would not keep it); keep its stderr.
        activation_part = (f'[ -n "$fabfleet_env_err" ] || {{ {{ {act}; }} >/dev/null '
                           '2>"$fabfleet_t" || { fabfleet_env_err=$(cat "$fabfleet_t"); '
                           '[ -n "$fabfleet_env_err" ] || fabfleet_env_err="activation '
                           'failed"; }; }; rm -f "$fabfleet_t" 2>/dev/null; ')
    else:
        activation_part = f"{{ {act}; }} || {{ echo {q(ERR + ' env')} >&2; exit 97; }}; "
    check = (f"command -v {py} >/dev/null 2>&1 || {{ echo "
             f"{q(f'{ERR} python: {host.python} not found on this host')} >&2; exit 127; }}; ")
    setup = _setup(host, report_env_error)
    if host.shell != "login":
        return first + values + setup + activation_part + check + script
    # The login shell runs the setup lines, then becomes sh (exec) with their environment.
    # The env values go to it in the environment (re-applied after its profile scripts).
    inner = ('eval "$fabfleet_exports"; unset fabfleet_exports; ' + first + setup
             + ("export fabfleet_env_err fabfleet_t; " if report_env_error else "")
             + 'exec /bin/sh -c "$1"')
    return (f"fabfleet_exports={q(values)}; " + values
            + f'export fabfleet_exports; exec "${{SHELL:-/bin/sh}}" -l -c {q(inner)} '
            + "fabfleet-login " + q(activation_part + check + script))


#: In a batch job's script, replaced by the run dir (quoted) on the login node.
RUN_DIR_SLOT = "@FABFLEET_RUN_DIR@"


def batch_script(host: Host, project: str, run: str) -> str:
    """A batch job's script (``#!/bin/sh``, run by the scheduler on a compute node): the
    work-dir guard, the ``env`` values from ``env.sh`` in the (0700) run dir — never in
    the script, which the scheduler keeps and shows — the setup lines, the activation,
    the interpreter check, then ``run``, which may use ``"$fabfleet_run_dir"``. No
    ``#SBATCH``/``#PBS`` lines: directives go on the submit command line as words."""
    values = '. "$fabfleet_run_dir/env.sh"; '
    return ("#!/bin/sh\n# a fabfleet run (see job.json next to this file)\n"
            f"fabfleet_run_dir={RUN_DIR_SLOT}; export fabfleet_run_dir\n"
            + workdir_guard(host, project) + "\n"
            + env_script(host, run, project=project, values=values) + "\n")


def env_failure(host: Host, stderr: str) -> str:
    """What a failed setup line or activation said (``stderr`` of a command that exited
    97), as one sentence with the fix, naming the setup line that failed."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    owner = next((ln for ln in lines if ln.startswith(f"{ERR} workdir: ")), None)
    if owner is not None:
        return (owner[len(f"{ERR} workdir: "):] + ". Nothing was run: someone else could "
                "have put code there. Use a `work_dir` of your own (the default ~/fabfleet), "
                "or fix its owner and mode (chmod 700).")
    marker = next((ln for ln in lines if ln.startswith(f"{ERR} setup: ")), None)
    said = "; ".join(ln for ln in lines if not ln.startswith(ERR))[-500:]
    if marker is not None:
        line = marker[len(f"{ERR} setup: "):]
        return (f"the setup line `{line}` failed" + (f" ({said})" if said else "")
                + ". " + setup_hint(host, said))
    return (f"the host's environment did not activate ({said or 'no message'}). Fix `venv` / "
            "`conda_env` in the inventory or run `fabfleet setup-workdir`.")


def setup_hint(host: Host, said: str) -> str:
    """The fix for a failed setup line: ``module`` (and conda's, micromamba's shell
    functions) exist only where a login shell's profile defined them."""
    missing = "not found" in said or "command not found" in said
    if missing and host.shell != "login" and any(w in " ".join(host.setup) for w in
                                                 ("module", "ml ", "conda", "micromamba")):
        return ("`module` (like conda's shell function) is defined by login-shell profile "
                "scripts: set `shell: login` for this host so setup runs in your login shell.")
    return "Fix that line in the inventory's `setup:`, or run it by hand on the host to see why."
