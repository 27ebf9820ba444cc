# conda's shell hook (stand-in): defines the `conda` shell function, as real conda's
# etc/profile.d/conda.sh does; `conda activate NAME` changes this shell's environment.
export CONDA_EXE=/opt/conda/bin/conda
conda() {
    case "$1" in
        activate|deactivate)
            __conda_out=$("$CONDA_EXE" shell.posix "$@") || return $?
            eval "$__conda_out" ;;
        *) "$CONDA_EXE" "$@" ;;
    esac
}
