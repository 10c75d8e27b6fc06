#!/usr/bin/env bash
# GPU runbook: checks that need an accelerator, each section delimited and owned by whoever wrote it.
# Run from anywhere: scripts/gpu_check.sh  (PY: the interpreter, default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false

# ==== online under FSDP (owner: online) ======================================================================
# The CPU suite checks 2 gloo processes with FSDP2 (tests/test_online_distributed.py::test_uds_and_slap_score_an
# _fsdp2_sharded_model_as_the_whole_one). Here: the whole online trainer (UDS per micro-batch, SLAP under global
# selection) trains a few steps under `accelerate launch` with FSDP2 on the GPU, so the LM head it scores with is
# a DTensor that full_head_weight gathers, and the run writes its selection log. One GPU: one process (NCCL
# refuses two ranks on one device), still a sharded head. Pass: "online under FSDP: ok" for both policies.
online_fsdp_dir=$(mktemp -d)
online_fsdp_data=$([ -d shared/data ] && echo shared/data || echo ../shared/data)
cat > "$online_fsdp_dir/run.py" <<'PYEOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from helpers import gsm8k_examples
from slimtune.models import LoraSettings
from slimtune.online.trainer import read_selection_log, train_online
from slimtune.train import TrainSettings

out, policy, data = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
settings = TrainSettings(output_dir=str(out / policy), epochs=1, batch_size=8, max_length=256, progress=False,
                         lora=LoraSettings(r=4, alpha=8, dropout=0.0), logging_steps=1)
train_online(gsm8k_examples(data, 32), policy, keep=0.25, model="smollm2", settings=settings,
             global_selection=policy == "slap")
log = read_selection_log(out / policy)
assert len(log) == 4 and all(len(step["chosen"]) == 2 for step in log), log
print("online under FSDP: ok", policy, json.dumps([step["chosen"] for step in log]))
PYEOF
for policy in uds slap; do
  timeout 600 "$PY" -m accelerate.commands.launch --num_processes 1 --use_fsdp --fsdp_version 2 \
    --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_reshard_after_forward true \
    "$online_fsdp_dir/run.py" "$online_fsdp_dir" "$policy" "$online_fsdp_data"
done
rm -rf "$online_fsdp_dir"
# ==== end online under FSDP ===================================================================================
