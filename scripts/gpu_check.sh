#!/usr/bin/env bash
# What to run on a GPU machine when one is lent (issue #14 item 8): the GPU paths that CPU tests cannot reach.
#
#   1. LESS extraction in bf16 against the floor of a plain forward+backward of the same batches;
#   2. sparse DELIFT kernel throughput (model tokens/s);
#   3. `torchrun -m slimtune select` on 2 GPUs selects exactly what 1 GPU selects (loss, LESS).
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
