"""Generates the golden file for the CPU golden test (tests/model/golden_test.cpp): loads the
initial Tessera checkpoint of a tiny model (tests/fixtures/golden/<family>/init, written by
tessera_golden_init), and in FP32 records the logits and every parameter gradient of the first
batch, then the losses of 10 AdamW steps (fresh batch each, global-norm clipping), into
tests/fixtures/golden/<family>/golden.h5.

Run on the GPU machine (PyTorch + h5py):  python3 bench/torch/make_golden.py tests/fixtures/golden
It computes on the CPU in float32 (deterministic, no TF32), so the device does not matter.
"""
import json
import os
import sys

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import Config, Transformer, load_tessera_weights, read_checkpoint  # noqa: E402


def make(root, family):
    step_dir = os.path.join(root, family, "init", "checkpoints", "step_0")
    tensors, meta = read_checkpoint(step_dir)
    cfg = Config(json.loads(meta["model_json"]))
    setup = json.loads(meta["golden"])
    torch.manual_seed(0)
    model = Transformer(cfg).float()
    load_tessera_weights(model, tensors)
    tokens = tensors["golden.tokens"].long()
    targets = tensors["golden.targets"].long()

    decay = {p["name"]: p["decay"] for p in setup["params"]}
    named = model.tessera_names()
    groups = [
        {"params": [p for n, p in named.items() if decay[n]], "weight_decay": setup["weight_decay"]},
        {"params": [p for n, p in named.items() if not decay[n]], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=setup["lr"], betas=(setup["beta1"], setup["beta2"]),
                            eps=setup["eps"], foreach=False, fused=False)
    out = os.path.join(root, family, "golden.h5")
    losses, norms = [], []
    with h5py.File(out + ".tmp", "w") as f:
        for step in range(setup["steps"]):
            opt.zero_grad(set_to_none=False)
            logits, loss = model(tokens[step], targets[step])
            loss.backward()
            if step == 0:
                f["logits"] = logits.detach().reshape(-1, cfg.padded_vocab_size).numpy()
                g = f.create_group("grads")
                for n, p in named.items():
                    g[n] = p.grad.detach().numpy()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), setup["grad_clip"])
            opt.step()
            losses.append(loss.item())
            norms.append(norm.item())
        f["losses"] = np.array(losses, dtype=np.float64)
        f["grad_norms"] = np.array(norms, dtype=np.float64)
        p = f.create_group("params_after")
        for n, t in named.items():
            p[n] = t.detach().numpy()
        f.attrs["torch_version"] = str(torch.__version__)
    os.replace(out + ".tmp", out)
    print(f"{family}: losses {[round(x, 6) for x in losses]}")


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/golden"
    torch.set_num_threads(1)
    for fam in ("gpt2", "llama"):
        make(root, fam)
