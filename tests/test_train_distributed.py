"""Training under torchrun: each rank builds its Trainer arguments first (they set up the process group and the
rank's device) and loads the model straight onto ``args.device``, not every copy onto the first GPU."""

import json
import os
import subprocess
import sys
import textwrap

import torch

WORKER = '''
    import json
    import sys
    from pathlib import Path

    import torch
    from transformers import TrainerCallback

    import slimtune.train as training
    from slimtune.data.example import make_example

    out = Path(sys.argv[1])
    loads = []
    load_model = training.load_model


    def recorded_load_model(*args, **kwargs):
        loads.append({"device": kwargs.get("device"), "group_ready": torch.distributed.is_initialized()})
        return load_model(*args, **kwargs)


    training.load_model = recorded_load_model


    class Where(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.seen = {"rank": args.process_index, "world": args.world_size, "device": str(args.device),
                         "model_device": str(next(model.parameters()).device)}


    examples = [make_example([{"role": "user", "content": f"What is {i} plus {i}?"},
                              {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]) for i in range(8)]
    where = Where()
    settings = training.TrainSettings(output_dir=str(out / "run"), epochs=1, batch_size=2, max_length=64,
                                      logging_steps=1, progress=False)
    result = training.train(examples, model="tiny", settings=settings, callbacks=[where])
    report = {**where.seen, "loads": loads, "steps": len([r for r in result.log_history if "loss" in r])}
    (out / f"rank-{where.seen['rank']}.json").write_text(json.dumps(report))
'''


def same_device(a: str, b: str) -> bool:
    """Equal devices; a CPU is one device whatever its index (accelerate calls it ``cpu:0``, torch ``cpu``)."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.type == "cpu" or a.index == b.index)


def test_two_torchrun_ranks_train_each_with_the_model_on_its_own_device(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(script), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    for rank, report in enumerate(reports):
        assert report["rank"] == rank and report["world"] == 2
        # one load, after the process group was up, onto the device the Trainer gave this rank
        assert report["loads"] == [{"device": report["device"], "group_ready": True}]
        assert same_device(report["model_device"], report["device"])
        assert report["steps"] == 2  # 8 rows, 2 per rank per step, over 2 ranks
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
