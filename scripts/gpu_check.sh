#!/usr/bin/env bash
# What to run on a GPU machine when one is lent (issue #14 item 8): the GPU paths that CPU tests cannot reach.
#
#   1. LESS extraction in bf16 against the floor of a plain forward+backward of the same batches;
#   2. sparse DELIFT kernel throughput (model tokens/s);
#   3. `torchrun -m slimtune select` on 2 GPUs selects exactly what 1 GPU selects (loss, LESS);
#   4. online selection (UDS, SLAP under global selection) trains under accelerate launch with FSDP2 and FSDP1.
#
# The GPU machine has torch/transformers/peft but no model and no network, so the model is randomly initialised
# with SmolLM2-135M-Instruct's config (the embedded default's shape; timings, not quality, are measured) and the
# tokenizer comes in a folder carried from a CPU checkout:
#
#   here:   .venv/bin/python -c "from slimtune.models import load_tokenizer; \
#               load_tokenizer('tiny').save_pretrained('.gpu/tokenizer')"
#   there:  run(command="bash scripts/gpu_check.sh", carry=[".gpu"])
#
# Expected output (not yet seen on a GPU: no session that built this was lent one): a table with
# 'less extraction / plain fwd+bwd' near 1.0-1.2 (LESS features cost one backward plus a projection per layer),
# 'delift tokens/s' in the tens of thousands, and 'selection 2 GPUs == 1 GPU: True' for loss and less.
# Results go to $OUT/gpu_check/gpu_check.json (or ./gpu_check/) as well. GPU_CHECK_ROWS (default 256) sets the
# pool size; GPU_CHECK_ROWS=8 runs the script through on a CPU in a few minutes (its timings mean nothing there).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TOKENIZER=${1:-.gpu/tokenizer}
WORK=${OUT:-$PWD}/gpu_check
mkdir -p "$WORK"
export SLIMTUNE_CACHE="$WORK/cache"

python - "$TOKENIZER" "$WORK" <<'EOF'
import importlib.util, sys
missing = [m for m in ("accelerate", "datasets", "rich", "typer", "pyarrow", "yaml", "sacrebleu", "pandas")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"install first (pip install {' '.join(missing)}): slimtune imports them")
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
tokenizer_dir, work = sys.argv[1], sys.argv[2]
print(f"torch {torch.__version__}, {torch.cuda.device_count()} GPU(s): "
      f"{[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                     tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
torch.manual_seed(0)
LlamaForCausalLM(config).save_pretrained(f"{work}/smollm2-shape")
tokenizer.save_pretrained(f"{work}/smollm2-shape")
EOF

python - "$WORK" <<'EOF'
import json, os, sys, time
import torch

def sync():
    if torch.cuda.is_available():  # timings of queued GPU work need the queue drained
        torch.cuda.synchronize()
from slimtune.data import load_examples
from slimtune.data.tokenize import Collator, TokenizedDataset
from slimtune.models import load_model
from slimtune.select import get_selector

work = sys.argv[1]
model_dir = f"{work}/smollm2-shape"
pool = load_examples("gsm8k:train", limit=int(os.environ.get("GPU_CHECK_ROWS", 256))).examples
target = load_examples("gsm8k:test", limit=4).examples
results = {}

# 1. the floor: forward + backward of the pool's batches in bf16, LoRA on, as extraction runs them
from slimtune.models import LoraSettings, apply_lora
model, tokenizer = load_model(model_dir, dtype="bf16")
model = apply_lora(model, LoraSettings(r=128, alpha=512))
data = TokenizedDataset(pool, tokenizer, 512)
collate = Collator(tokenizer.pad_token_id)
batches = [collate([data[i] for i in range(s, min(s + 8, len(data)))]) for s in range(0, len(data), 8)]
sync(); start = time.perf_counter()
for batch in batches:
    out = model(**{k: v.to(model.device) for k, v in batch.items()})
    out.loss.backward()
    model.zero_grad(set_to_none=True)
sync(); floor = time.perf_counter() - start
del model

selector = get_selector("less", model=model_dir, warmup=False, proj_dim=8192, cache_dir=f"{work}/less")
selection = selector.select(pool, 0.05, target=target)
extraction = selection.cost.seconds
results["less"] = {"rows": len(pool), "plain_fwd_bwd_s": floor, "less_select_s": extraction,
                   "ratio": extraction / floor}

# 2. sparse DELIFT kernel throughput
delift = get_selector("delift", model=model_dir, sparse_k=8, cache_dir=f"{work}/delift")
chosen = delift.select(pool[:128], 0.1)
results["delift"] = {"rows": len(pool[:128]), "seconds": chosen.cost.seconds, "forward_tokens": chosen.cost.forward_tokens,
                     "tokens_per_s": chosen.cost.forward_tokens / max(chosen.cost.seconds, 1e-9)}
json.dump(results, open(f"{work}/gpu_check.json", "w"), indent=1)
print(f"less extraction / plain fwd+bwd: {results['less']['ratio']:.2f} "
      f"({extraction:.1f} s against {floor:.1f} s for {len(pool)} rows, bf16)")
print(f"delift tokens/s: {results['delift']['tokens_per_s']:,.0f} (sparse k=8, {results['delift']['rows']} rows)")
EOF

# 3. two GPUs select what one GPU selects
if python -c "import torch, sys; sys.exit(torch.cuda.device_count() < 2)"; then
    python -c "import json; json.dump([{'instruction': f'What is {i} plus {3 * i}?', 'output': str(4 * i)} \
        for i in range(64)], open('$WORK/pool.json', 'w'))"
    for method in loss less; do
        extra=(); [ "$method" = less ] && extra=(--target gsm8k:test -p warmup=false -p proj_dim=1024)
        for n in 1 2; do
            python -m torch.distributed.run --standalone --nproc-per-node "$n" -m slimtune --quiet select \
                --method "$method" --model "$WORK/smollm2-shape" --budget 8 --data "$WORK/pool.json" \
                --out "$WORK/sel-$method-$n" "${extra[@]}"
        done
        python - "$WORK" "$method" <<'EOF'
import json, sys
work, method = sys.argv[1], sys.argv[2]
one, two = (json.load(open(f"{work}/sel-{method}-{n}/manifest.json")) for n in (1, 2))
kept = lambda m: [r["id"] for r in m["examples"] if r["kept"]]
print(f"selection 2 GPUs == 1 GPU ({method}): {kept(one) == kept(two)}")
EOF
    done
else
    echo "one GPU: the 2-GPU selection check is skipped"
fi

# 4. online selection under FSDP (issue #15): the CPU suite checks the scoring of 2 gloo processes with FSDP2 and
# FSDP1 (tests/test_online_distributed.py::test_uds_and_slap_score_an_fsdp_sharded_model_as_the_whole_one); here
# the whole online trainer (UDS per micro-batch, SLAP under global selection) trains a few steps under
# `accelerate launch` with FSDP2 (the LM head it scores with is a DTensor) and with FSDP1 (the head lives in a
# flat parameter), both of which online.trainer.full_head_weight gathers.
# One GPU: one process (NCCL refuses two ranks on one device), still a sharded head.
# Expected, for FSDP 2 then 1: "online under FSDP: ok uds ..." and "online under FSDP: ok slap ...".
data=$([ -d ../shared/data ] && echo ../shared/data || echo src/slimtune/data/samples)
cat > "$WORK/online_fsdp.py" <<'PYEOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from helpers import gsm8k_examples
from slimtune.models import LoraSettings
from slimtune.online.trainer import read_selection_log, train_online
from slimtune.train import TrainSettings

out, policy, data, model = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
settings = TrainSettings(output_dir=str(out / policy), epochs=1, batch_size=8, max_length=256, progress=False,
                         lora=LoraSettings(r=4, alpha=8, dropout=0.0), logging_steps=1)
train_online(gsm8k_examples(data, 32), policy, keep=0.25, model=model, settings=settings,
             global_selection=policy == "slap")
log = read_selection_log(out / policy)
assert len(log) == 4 and all(len(step["chosen"]) == 2 for step in log), log
print("online under FSDP: ok", policy, json.dumps([step["chosen"] for step in log]))
PYEOF
# FSDP1 takes its sharding strategy where FSDP2 takes a boolean, and needs the original parameters kept for
# LoRA's mix of frozen and trainable weights in one unit; every rank loads the whole (small) model itself, so
# nothing is broadcast from rank 0, which FSDP1 cannot do on a CPU (GPU_CHECK_ROWS=8 runs this part there too).
for fsdp in "2 true" "1 FULL_SHARD"; do
    set -- $fsdp
    for policy in uds slap; do
        timeout 600 python -m accelerate.commands.launch --num_processes 1 --use_fsdp --fsdp_version "$1" \
            --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_reshard_after_forward "$2" \
            --fsdp_use_orig_params true --fsdp_sync_module_states false --fsdp_cpu_ram_efficient_loading false \
            "$WORK/online_fsdp.py" "$WORK/online-fsdp$1" "$policy" "$data" "$WORK/smollm2-shape"
    done
done
