#!/usr/bin/env bash
# A real single-node SLURM cluster with a preemptible QoS, for the end-to-end tests.
#
#   tests/cluster/slurm-cluster.sh up [REQUEUE|CANCEL]   install (apt), configure, start; idempotent
#   tests/cluster/slurm-cluster.sh mode REQUEUE|CANCEL   switch PreemptMode (restarts slurmctld)
#   tests/cluster/slurm-cluster.sh status                exit 0 when the cluster answers
#   tests/cluster/slurm-cluster.sh down                  stop every daemon
#
# Daemons: munged (as munge), MariaDB, slurmdbd (as slurm), slurmctld and
# slurmd (as root). Accounting is on; QoS "preemptible" (GraceTime) is
# preempted by QoS "normal"; account "research" gives root both QoS.
# Needs root and Debian's packages (apt-get).
set -euo pipefail

CLUSTER=hpcluster
ACCOUNT=research
GRACE_S=${HP_GRACE_S:-30}
DB_PASS=hydra-preempt-test
HOST=$(hostname -s)
LOG_DIR=/var/log/slurm
CONF=/etc/slurm/slurm.conf

log() { printf '[slurm-cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

require_root() { [ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"; }

install_packages() {
  local missing=()
  for bin in slurmctld slurmd slurmdbd munged mysqld sbatch; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("$bin")
  done
  [ ${#missing[@]} -eq 0 ] && return
  command -v apt-get >/dev/null || die "apt-get not found: install slurm-wlm slurmdbd munge mariadb-server yourself"
  log "installing slurm-wlm slurmdbd munge mariadb-server (missing: ${missing[*]})"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm slurmdbd munge mariadb-server >/dev/null
}

node_line() {
  # slurmd -C describes this machine; keep 1 GiB of memory for the system.
  local line mem
  line=$(slurmd -C | head -1)
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$line")
  sed "s/RealMemory=[0-9]*/RealMemory=$((mem > 2048 ? mem - 1024 : mem))/" <<<"$line"
}

write_configs() {
  local mode=$1
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR" /run/munge
  cat >"$CONF" <<EOF
# Written by hydra_preempt's tests/cluster/slurm-cluster.sh
ClusterName=$CLUSTER
SlurmctldHost=$HOST
AuthType=auth/munge
SlurmUser=root
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
# pgid, not linuxproc: linuxproc lost children whose parent shell died
ProctrackType=proctrack/pgid
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
PreemptType=preempt/qos
PreemptMode=$mode
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageEnforce=associations,limits,qos
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=10
MinJobAge=600
InactiveLimit=0
$(node_line) State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  cat >/etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
PidFile=/run/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  chown slurm:slurm /etc/slurm/slurmdbd.conf "$LOG_DIR"
  chmod 600 /etc/slurm/slurmdbd.conf
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  for _ in $(seq "$((limit * 2))"); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  die "$what did not come up within ${limit}s"
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
  if ! pgrep -x munged >/dev/null; then
    chown munge:munge /run/munge /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged
  fi
  wait_for 10 munged bash -c 'munge -n | unmunge'
}

start_mariadb() {
  if ! mysqladmin ping >/dev/null 2>&1; then
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    (mysqld_safe >/dev/null 2>&1 &)
    wait_for 60 MariaDB mysqladmin ping
  fi
  mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

start_slurmdbd() {
  running /run/slurmdbd.pid || /usr/sbin/slurmdbd
  wait_for 60 slurmdbd sacctmgr -n list cluster
}

sacctmgr_add() {  # tolerate "already exists" so that `up` is idempotent
  local out
  if ! out=$(sacctmgr -i "$@" 2>&1); then
    grep -qiE "nothing new added|already exists" <<<"$out" || die "sacctmgr $*: $out"
  fi
}

setup_accounting() {
  sacctmgr_add add cluster "$CLUSTER"
  sacctmgr_add add qos preemptible
  sacctmgr -i modify qos preemptible set GraceTime="$GRACE_S" UsageFactor=0.25 Priority=0 >/dev/null
  sacctmgr -i modify qos normal set Preempt=preemptible Priority=100 >/dev/null
  sacctmgr_add add account "$ACCOUNT" Cluster="$CLUSTER" Description=tests Organization=tests
  sacctmgr_add add user root Account="$ACCOUNT" Cluster="$CLUSTER"
  sacctmgr -i modify user root where account="$ACCOUNT" set QOS=normal,preemptible DefaultQOS=normal >/dev/null
  sacctmgr -i modify user root set DefaultAccount="$ACCOUNT" >/dev/null
}

start_slurm() {
  running /run/slurmctld.pid || /usr/sbin/slurmctld
  wait_for 30 slurmctld scontrol ping
  running /run/slurmd.pid || /usr/sbin/slurmd
  wait_for 30 "node $HOST" bash -c "sinfo -h -n $HOST -o %t | grep -qE '^(idle|mix|alloc)'"
}

stop_pidfile() {
  local pidfile=$1 pid
  running "$pidfile" || return 0
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
  kill -9 "$pid" 2>/dev/null || true
}

current_mode() { sed -n 's/^PreemptMode=//p' "$CONF" 2>/dev/null; }

cmd_up() {
  local mode=${1:-REQUEUE}
  require_root
  install_packages
  write_configs "$mode"
  start_munge
  start_mariadb
  start_slurmdbd
  setup_accounting
  if running /run/slurmctld.pid; then
    stop_pidfile /run/slurmctld.pid  # pick up the configuration just written
  fi
  start_slurm
  log "up: cluster $CLUSTER, node $HOST, PreemptMode=$(current_mode), preemptible GraceTime=${GRACE_S}s"
}

cmd_mode() {
  local mode=${1:?usage: mode REQUEUE|CANCEL}
  case $mode in REQUEUE|CANCEL) ;; *) die "PreemptMode must be REQUEUE or CANCEL, got $mode";; esac
  require_root
  [ "$(current_mode)" = "$mode" ] && running /run/slurmctld.pid && { log "PreemptMode is already $mode"; return; }
  sed -i "s/^PreemptMode=.*/PreemptMode=$mode/" "$CONF"
  stop_pidfile /run/slurmctld.pid
  start_slurm
  log "PreemptMode=$mode"
}

cmd_status() {
  scontrol ping >/dev/null 2>&1 && sinfo -h -o '%P %t %C' && echo "PreemptMode=$(current_mode)"
}

cmd_down() {
  require_root
  stop_pidfile /run/slurmd.pid
  stop_pidfile /run/slurmctld.pid
  stop_pidfile /run/slurmdbd.pid
  mysqladmin shutdown >/dev/null 2>&1 || true
  pkill -x munged 2>/dev/null || true
  log "down"
}

case ${1:-} in
  up) shift; cmd_up "$@" ;;
  mode) shift; cmd_mode "$@" ;;
  status) cmd_status ;;
  down) cmd_down ;;
  *) echo "usage: $0 up [REQUEUE|CANCEL] | mode REQUEUE|CANCEL | status | down" >&2; exit 2 ;;
esac
