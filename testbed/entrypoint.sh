# Container entrypoint: fresh host keys per container, then sshd on 127.0.0.1:$SSH_PORT.
set -e
echo "${FABFLEET_HOST:-unknown}" > /etc/fabfleet-host
ssh-keygen -A >/dev/null
install -m 600 -o dev -g dev /testbed/authorized_keys /home/dev/.ssh/authorized_keys
exec /usr/sbin/sshd -D -e -p "${SSH_PORT:?}" -o ListenAddress=127.0.0.1 \
    -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no -o UsePAM=no \
    -o MaxSessions=64 -o MaxStartups=100:30:200
