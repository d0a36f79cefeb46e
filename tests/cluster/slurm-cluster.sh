#!/usr/bin/env bash
# A real SLURM cluster on one machine, with a preemptible QoS, for the end-to-end tests.
#
#   tests/cluster/slurm-cluster.sh up [--nodes N] [--partitions P] [REQUEUE|CANCEL]
#       install (apt), configure, start; idempotent (a running cluster of the same shape is left alone)
#   tests/cluster/slurm-cluster.sh mode REQUEUE|CANCEL   switch the cluster's PreemptMode (restarts slurmctld)
#   tests/cluster/slurm-cluster.sh status                exit 0 when the cluster answers
#   tests/cluster/slurm-cluster.sh down                  stop every daemon, remove the nodes' namespaces
#
# The controller (slurmctld, slurmdbd, MariaDB, munged) runs on this machine. Each compute node
# hpnode<i> is a slurmd in a network namespace of its own (a veth pair to the bridge hpbr0, address
# 10.233.77.<10+i>; the controller is 10.233.77.1) and a UTS namespace (its own hostname), sharing the
# file system and munge's socket; each also has a mount namespace with a private tmpfs at
# /var/tmp/node-local, which stands for a node's local disk. Jobs really span nodes: srun across
# them, gloo over the veths, SIGTERM per node. Every node has this machine's CPUs (they share them).
#
# Partitions: "debug" (default) holds every node; with --partitions P > 1 the nodes are also split
# into p1..pP of N/P nodes each, so that concurrent tests never preempt each other's jobs.
# QoS: "preemptible" (GraceTime; the cluster's PreemptMode) and "preemptible_cancel" (PreemptMode
# CANCEL: the job must requeue itself) are preempted by "normal"; account "research" may use all three.
# Needs root, iproute2, util-linux's unshare and Debian's packages (apt-get).
set -euo pipefail

CLUSTER=hpcluster
ACCOUNT=research
GRACE_S=${HP_GRACE_S:-15}
DB_PASS=hydra-preempt-test
HOST=$(hostname -s)
LOG_DIR=/var/log/slurm
CONF=/etc/slurm/slurm.conf
NET=10.233.77          # the nodes' network: the controller at .1, hpnode<i> at .<10+i>
BRIDGE=hpbr0
NODE_LOCAL=/var/tmp/node-local
HOSTS_MARK="# hydra_preempt test cluster"

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

node_hardware() {  # node_hardware NODES
  # slurmd -C describes this machine; every node gets its CPUs and an equal share of its memory,
  # less 1 GiB for the system.
  local line mem
  line=$(slurmd -C | head -1)
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$line")
  mem=$(( (mem > 2048 ? mem - 1024 : mem) / $1 ))
  sed -e 's/^NodeName=[^ ]* //' -e "s/RealMemory=[0-9]*/RealMemory=$mem/" <<<"$line"
}

node_name() { echo "hpnode$1"; }
node_addr() { echo "$NET.$((10 + $1))"; }

cluster_config() {  # cluster_config MODE NODES PARTITIONS: slurm.conf on stdout
  local mode=$1 nodes=$2 partitions=$3 hw i p per
  hw=$(node_hardware "$nodes")
  cat <<EOF
# Written by hydra_preempt's tests/cluster/slurm-cluster.sh
ClusterName=$CLUSTER
SlurmctldHost=$HOST($NET.1)
AuthType=auth/munge
SlurmUser=root
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
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
AccountingStorageHost=$NET.1
AccountingStorageEnforce=associations,limits,qos
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=10
MinJobAge=600
InactiveLimit=0
EOF
  for i in $(seq "$nodes"); do
    echo "NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") $hw State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  if [ "$partitions" -gt 1 ]; then
    per=$((nodes / partitions))
    for p in $(seq "$partitions"); do
      echo "PartitionName=p$p Nodes=hpnode[$(((p - 1) * per + 1))-$((p * per))] MaxTime=INFINITE State=UP"
    done
  fi
}

write_dbd_config() {
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

write_hosts() {  # write_hosts NODES: the nodes' names in /etc/hosts (a rank finds its rendezvous host by name)
  local i
  sed -i "/$HOSTS_MARK/d" /etc/hosts
  for i in $(seq "$1"); do
    echo "$(node_addr "$i") $(node_name "$i") $HOSTS_MARK" >>/etc/hosts
  done
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
  sacctmgr_add add qos preemptible_cancel
  sacctmgr -i modify qos preemptible set GraceTime="$GRACE_S" UsageFactor=0.25 Priority=0 >/dev/null
  sacctmgr -i modify qos preemptible_cancel set GraceTime="$GRACE_S" UsageFactor=0.25 Priority=0 \
    PreemptMode=cancel >/dev/null
  sacctmgr -i modify qos normal set Preempt=preemptible,preemptible_cancel Priority=100 >/dev/null
  sacctmgr_add add account "$ACCOUNT" Cluster="$CLUSTER" Description=tests Organization=tests
  sacctmgr_add add user root Account="$ACCOUNT" Cluster="$CLUSTER"
  sacctmgr -i modify user root where account="$ACCOUNT" \
    set QOS=normal,preemptible,preemptible_cancel DefaultQOS=normal >/dev/null
  sacctmgr -i modify user root set DefaultAccount="$ACCOUNT" >/dev/null
}

node_count() { grep -c '^NodeName=' "$CONF" 2>/dev/null || echo 0; }

start_network() {  # start_network NODES: the bridge, and each node's namespace with its veth
  local i name
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  # no `ip ... | grep -q` under pipefail: grep's early exit fails the pipeline (SIGPIPE)
  [[ $(ip -4 addr show dev "$BRIDGE") == *"inet $NET.1/"* ]] || ip addr add "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for i in $(seq "$1"); do
    name=$(node_name "$i")
    [ -e "/run/netns/$name" ] && continue
    ip netns add "$name"
    ip link add "hpv$i" type veth peer name eth0 netns "$name"
    ip link set "hpv$i" master "$BRIDGE" up
    ip -n "$name" addr add "$(node_addr "$i")/24" dev eth0
    ip -n "$name" link set eth0 up
    ip -n "$name" link set lo up
  done
}

start_node() {  # start_node I: slurmd in the node's network, UTS and mount namespaces
  local name
  name=$(node_name "$1")
  running "/run/slurmd-$name.pid" && return
  mkdir -p "/var/spool/slurmd/$name" "$NODE_LOCAL"
  # --propagation slave: the node still sees what is mounted on this machine later; its own
  # tmpfs at $NODE_LOCAL stays its own. slurmd daemonizes and keeps the namespaces.
  # nsenter, not `ip netns exec`: that remounts /sys, which hides the cgroup file system slurmd needs.
  nsenter --net="/run/netns/$name" unshare --uts --mount --propagation slave \
    sh -c "hostname $name && mount -t tmpfs -o size=256m node-local $NODE_LOCAL && exec /usr/sbin/slurmd"
}

start_slurm() {  # start_slurm NODES
  local i
  running /run/slurmctld.pid || /usr/sbin/slurmctld
  wait_for 30 slurmctld scontrol ping
  for i in $(seq "$1"); do start_node "$i"; done
  wait_for 60 "$1 node(s)" bash -c \
    "[ \$(sinfo -h -N -p debug -o '%N %t' | grep -cE ' (idle|mix|alloc)\$') -ge $1 ]"
}

stop_pidfile() {
  local pidfile=$1 pid
  running "$pidfile" || return 0
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
  kill -9 "$pid" 2>/dev/null || true
}

stop_nodes() {
  local pidfile
  for pidfile in /run/slurmd-*.pid /run/slurmd.pid; do
    [ -e "$pidfile" ] && stop_pidfile "$pidfile"
  done
  return 0
}

current_mode() { sed -n 's/^PreemptMode=//p' "$CONF" 2>/dev/null; }

cmd_up() {
  local mode=REQUEUE nodes=2 partitions=1 wanted
  while [ $# -gt 0 ]; do
    case $1 in
      --nodes) nodes=${2:?--nodes needs a number}; shift 2 ;;
      --partitions) partitions=${2:?--partitions needs a number}; shift 2 ;;
      REQUEUE|CANCEL) mode=$1; shift ;;
      *) die "unknown argument to up: $1" ;;
    esac
  done
  [[ $nodes =~ ^[1-9][0-9]?$ ]] || die "--nodes must be 1 to 99, got $nodes"
  [[ $partitions =~ ^[1-9][0-9]?$ ]] && [ $((nodes % partitions)) -eq 0 ] ||
    die "--partitions must divide the node count ($nodes), got $partitions"
  require_root
  install_packages
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR" /run/munge
  write_dbd_config
  wanted=$(cluster_config "$mode" "$nodes" "$partitions")
  if [ "$wanted" != "$(cat "$CONF" 2>/dev/null)" ]; then
    # another shape: stop what runs (jobs stay in slurmctld's state) and start from the new file
    stop_nodes
    stop_pidfile /run/slurmctld.pid
    printf '%s\n' "$wanted" >"$CONF"
  fi
  write_hosts "$nodes"
  start_network "$nodes"
  start_munge
  start_mariadb
  start_slurmdbd
  setup_accounting
  start_slurm "$nodes"
  log "up: cluster $CLUSTER, $nodes node(s) hpnode1..$nodes, $partitions partition(s)," \
    "PreemptMode=$(current_mode), GraceTime=${GRACE_S}s"
}

cmd_mode() {
  local mode=${1:?usage: mode REQUEUE|CANCEL}
  case $mode in REQUEUE|CANCEL) ;; *) die "PreemptMode must be REQUEUE or CANCEL, got $mode";; esac
  require_root
  [ "$(current_mode)" = "$mode" ] && running /run/slurmctld.pid && { log "PreemptMode is already $mode"; return; }
  sed -i "s/^PreemptMode=.*/PreemptMode=$mode/" "$CONF"
  stop_pidfile /run/slurmctld.pid
  start_slurm "$(node_count)"
  log "PreemptMode=$mode"
}

cmd_status() {
  scontrol ping >/dev/null 2>&1 && sinfo -h -N -o '%N %P %t %C' && echo "PreemptMode=$(current_mode)"
}

cmd_down() {
  local ns
  require_root
  stop_nodes
  stop_pidfile /run/slurmctld.pid
  stop_pidfile /run/slurmdbd.pid
  mysqladmin shutdown >/dev/null 2>&1 || true
  pkill -x munged 2>/dev/null || true
  for ns in $(ip netns list | awk '/^hpnode[0-9]+/ {print $1}'); do ip netns del "$ns"; done
  ip link del "$BRIDGE" 2>/dev/null || true
  sed -i "/$HOSTS_MARK/d" /etc/hosts
  log "down"
}

case ${1:-} in
  up) shift; cmd_up "$@" ;;
  mode) shift; cmd_mode "$@" ;;
  status) cmd_status ;;
  down) cmd_down ;;
  *) echo "usage: $0 up [--nodes N] [--partitions P] [REQUEUE|CANCEL] | mode REQUEUE|CANCEL | status | down" >&2
     exit 2 ;;
esac
