# visible_gpus: how many GPUs this process may use. nvidia-smi lists every GPU of the machine, so
# CUDA_VISIBLE_DEVICES (when set) limits the count, as CUDA does: its entries up to the first
# invalid one ("-1" or empty: none).
visible_gpus() {
  local listed entries n=0 entry
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
