# Container entrypoint: fresh host keys per container, then sshd on $LISTEN:$SSH_PORT.
#
# Knobs (environment): LISTEN (default 127.0.0.1), STOCK=1 for Debian's stock sshd
# limits (MaxSessions 10, MaxStartups 10:30:100) instead of raised ones, HOSTKEYS (key
# types to generate, e.g. "ecdsa"; default: every type), EXTRA_HOSTS ("name=addr ..."
# lines only this container resolves), LOGIN_SHELL (the dev user's login shell),
# NO_ENSUREPIP=1 (Python without ensurepip: `python3 -m venv` fails), NO_FORWARDING=1
# (AllowTcpForwarding no: a bastion that refuses to forward), NO_CONDA=1 (micromamba only),
# SLURM=1 (start the single-node Slurm of the slurm image first), FAKE_PBS=1 (put the PBS
# stand-in's qsub/qstat/qdel on PATH).
set -e
echo "${FABFLEET_HOST:-unknown}" > /etc/fabfleet-host
if [ -n "${HOSTKEYS:-}" ]; then
    for t in $HOSTKEYS; do
        [ -f "/etc/ssh/ssh_host_${t}_key" ] || ssh-keygen -q -t "$t" -N "" -f "/etc/ssh/ssh_host_${t}_key"
    done
else
    ssh-keygen -A >/dev/null
fi
for pair in ${EXTRA_HOSTS:-}; do
    echo "${pair#*=} ${pair%%=*}" >> /etc/hosts
done
[ -z "${LOGIN_SHELL:-}" ] || usermod -s "$LOGIN_SHELL" dev
# A micromamba-only host: no conda installation
[ "${NO_CONDA:-0}" = 1 ] && rm -rf /opt/conda
# A Python without ensurepip, as Debian/Ubuntu servers without python3-venv have
[ "${NO_ENSUREPIP:-0}" = 1 ] && rm -rf /usr/lib/python3*/ensurepip
[ "${SLURM:-0}" = 1 ] && /opt/slurm-testbed/start.sh
if [ "${FAKE_PBS:-0}" = 1 ]; then
    for t in qsub qstat qdel; do ln -sf /usr/local/lib/fake-pbs/$t /usr/local/bin/$t; done
fi
install -m 600 -o dev -g dev /testbed/authorized_keys /home/dev/.ssh/authorized_keys
keys=""
for k in /etc/ssh/ssh_host_*_key; do keys="$keys -o HostKey=$k"; done
limits="-o MaxSessions=64 -o MaxStartups=100:30:200"
[ "${STOCK:-0}" = 1 ] && limits=""
# A bastion whose admin forbids forwarding
[ "${NO_FORWARDING:-0}" = 1 ] && limits="$limits -o AllowTcpForwarding=no"
exec /usr/sbin/sshd -D -e -p "${SSH_PORT:?}" -o ListenAddress="${LISTEN:-127.0.0.1}" \
    -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no -o UsePAM=no \
    $keys $limits
