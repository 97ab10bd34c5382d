# visible_gpus: how many GPUs this process may use. nvidia-smi lists every GPU of the machine, so
# CUDA_VISIBLE_DEVICES (when set) limits the count, as CUDA does: its entries up to the first
# invalid one ("-1" or empty: none).
# Without nvidia-smi (some containers have none) CUDA counts them, CUDA_VISIBLE_DEVICES applied:
# a GPU machine must not fall back to one process, or to CPU processes.
visible_gpus() {
  local listed entries n=0 entry
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    "${PY:-python3}" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
    return
  fi
  listed=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  if [[ -z "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    echo "$listed"
    return
  fi
  IFS=, read -ra entries <<< "$CUDA_VISIBLE_DEVICES"
  for entry in "${entries[@]}"; do
    entry="${entry// /}"
    [[ -z "$entry" || "$entry" == -* ]] && break
    n=$((n + 1))
  done
  echo $(( n < listed ? n : listed ))
}
