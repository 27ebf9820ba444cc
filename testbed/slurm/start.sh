#!/bin/sh
# Start a single-node Slurm on loopback (host networking: the machine's own name), then
# return; the entrypoint goes on to sshd. Knobs: SLURMCTLD_PORT, SLURMD_PORT, SLURM_CPUS,
# SLURM_PARTITION, MIN_JOB_AGE (seconds a finished job stays known to scontrol).
set -e
host=$(hostname -s)
grep -q " $host\$" /etc/hosts || echo "127.0.0.1 $host" >> /etc/hosts
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
chown slurm:slurm /var/spool/slurmctld /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=fabtest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:?}
SlurmdPort=${SLURMD_PORT:?}
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
MpiDefault=none
ReturnToService=2
MinJobAge=${MIN_JOB_AGE:-5}
KillWait=5
InactiveLimit=0
SchedulerType=sched/backfill
NodeName=$host NodeAddr=127.0.0.1 CPUs=${SLURM_CPUS:-2} RealMemory=2000 State=UNKNOWN
PartitionName=${SLURM_PARTITION:-debug} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
[ -f /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key /run/munge
chmod 0400 /etc/munge/munge.key
runuser -u munge -- /usr/sbin/munged
slurmctld
slurmd
for _ in $(seq 1 60); do
    sinfo -h -o %T 2>/dev/null | grep -qE '^idle' && exit 0
    sleep 0.5
done
echo "slurm did not come up:" >&2
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2
exit 1
