#!/bin/bash
# Torch-side CUDA checks of the trainer on a GPU machine that has torch but no internet.
# Prepare here, then carry runs/gpu: Fashion-MNIST IDX files in runs/gpu/data/fashion-mnist/,
# wheels for pydantic, pyyaml and tqdm (matching the GPU machine's Python) in runs/gpu/wheels/.
# Writes $OUT/gpu.json (three 9-epoch runs) and $OUT/ddp.log (torchrun + NCCL, 2 epochs).
set -u
export PYTHONPATH=$PWD CONVSERVE_DATA=$PWD/runs/gpu/data PYTHONUNBUFFERED=1
PY=python3
$PY -c "import pydantic, yaml, tqdm" 2>/dev/null || $PY -m pip install -q --no-index --find-links runs/gpu/wheels pydantic pyyaml tqdm 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY - <<'PY'
import json, os, time, traceback, shutil
import torch
from trainer.run import fit
from trainer.recipe import load_recipe
out = os.environ["OUT"]
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0)}
print(info, flush=True)
runs = {
    "bf16_channels_last": ["train.device=cuda", "data.download=false"],
    "fp32_nchw": ["train.device=cuda", "data.download=false", "train.bf16_autocast=false", "train.channels_last=false"],
    "bf16_compile": ["train.device=cuda", "data.download=false", "train.compile=true"],
}
res = {}
for name, ov in runs.items():
    t0 = time.time()
    try:
        r = fit(load_recipe("fashion_mnist", ov), f"runs/gpu/out/{name}", quiet=True)
        res[name] = {"test_accuracy": r.test_accuracy, "best_val": r.best_val_accuracy, "epochs": r.epochs_run,
                     "train_seconds": r.train_seconds, "images_per_s": r.images_per_s, "wall_s": time.time() - t0}
    except Exception as e:
        res[name] = {"error": repr(e)[:2000], "wall_s": time.time() - t0}
        traceback.print_exc()
    print(name, res[name], flush=True)
    json.dump({"info": info, "runs": res}, open(f"{out}/gpu.json", "w"), indent=1)
os.makedirs(f"{out}/bf16_channels_last", exist_ok=True)
for f in ("checkpoints/best.pt", "results.json", "recipe.yaml"):
    p = f"runs/gpu/out/bf16_channels_last/{f}"
    if os.path.exists(p):
        shutil.copy(p, f"{out}/bf16_channels_last/{os.path.basename(f)}")
PY
ls runs/gpu/out/bf16_channels_last 2>/dev/null
# The DDP path with NCCL (one process per GPU; here one GPU), 2 epochs.
timeout 150 $PY -c "from trainer.cli import train_main; train_main()" --recipe fashion_mnist --out runs/gpu/out/ddp --nproc 1 --quiet --no-export train.device=cuda data.download=false train.epochs=2 > $OUT/ddp.log 2>&1; echo "ddp rc=$?" | tee -a $OUT/ddp.log
tail -5 $OUT/ddp.log; cat runs/gpu/out/ddp/results.json 2>/dev/null | head -c 600 > $OUT/ddp_results.json
